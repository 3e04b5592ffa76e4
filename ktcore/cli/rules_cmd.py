"""``kt rules check|explain|list``: validate rule files and show where every module goes."""

from __future__ import annotations

import argparse
import json
import sys

from ktcore.backends.registry import Registry


def load_registry() -> Registry:
    """The backends installed here (tests replace this function)."""
    return Registry.from_entry_points()


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("rules", help="check and explain placement rule files",
                                   description="Check and explain YAML placement rule files (docs/rules.md).")
    actions = parser.add_subparsers(dest="rules_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: _usage(parser))

    devices_help = ("check as if exactly these devices were visible, e.g. cuda:0,cuda:1,cpu (cpu always is); "
                    "backend availability probes are then not run")
    check = actions.add_parser("check", help="validate a rule file (exit 1 on any error)",
                               description="Validate a rule file; with --model also against a model's modules.")
    check.add_argument("file", metavar="FILE", help="rule file, or the name of a shipped one (see 'kt rules list')")
    check.add_argument("--model", metavar="PATH", help="HF model directory or config.json")
    check.add_argument("--devices", metavar="LIST", help=devices_help)
    check.set_defaults(func=run_check)

    explain = actions.add_parser("explain", help="show each module's operator, backend and device, and bytes per device",
                                 description="Show where every module of a model goes and the bytes each device holds.")
    explain.add_argument("file", metavar="FILE", help="rule file, or the name of a shipped one")
    explain.add_argument("--model", metavar="PATH", required=True, help="HF model directory or config.json")
    explain.add_argument("--devices", metavar="LIST", help=devices_help)
    explain.add_argument("--json", action="store_true", help="print a JSON document instead of a table")
    explain.add_argument("--all", action="store_true", dest="all_modules",
                         help="one row per module, containers included (layers still folded)")
    explain.set_defaults(func=run_explain)

    listing = actions.add_parser("list", help="list the rule files shipped with ktcore")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=run_list)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _check(args):
    """The Plan, or None after printing every error (one per line) to stderr."""
    from ktcore.rules import RuleErrors, check_rules, load_model, resolve_rule_path

    path = resolve_rule_path(args.file)
    model = load_model(args.model) if args.model else None
    try:
        return check_rules(path, load_registry(), model=model, devices=args.devices)
    except RuleErrors as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return None


def run_check(args) -> int:
    plan = _check(args)
    if plan is None:
        return 1
    rules = plan.rules.rule_count
    if plan.model is not None:
        print(f"ok: {rules} rule{'' if rules == 1 else 's'}, {plan.module_count} modules placed")
    else:
        print(f"ok: {rules} rule{'' if rules == 1 else 's'} (no --model given: checks that need a model were skipped)")
    for note in plan.notes:
        print(f"note: {note}")
    return 0


def run_explain(args) -> int:
    from ktcore.rules.explain import to_json_text, to_text

    plan = _check(args)
    if plan is None:
        return 1
    print(to_json_text(plan, args.all_modules) if args.json else to_text(plan, args.all_modules))
    return 0


def run_list(args) -> int:
    from ktcore.rules.shipped import describe, shipped_rule_files

    files = shipped_rule_files()
    if args.json:
        print(json.dumps([{"name": stem, "path": str(path), "description": describe(path)}
                          for stem, path in files.items()], indent=2))
        return 0
    if not files:
        print("no shipped rule files found")
        return 0
    width = max(len(stem) for stem in files)
    for stem, path in files.items():
        print(f"{stem.ljust(width)}  {describe(path)}")
    return 0
