"""``kt backends [--json]``: every backend the installed plugins register, and why a backend
cannot run on this host."""

from __future__ import annotations

import argparse
import json
import sys

from ktcore.backends.registry import Registry


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("backends", help="list backends: operators, distribution, availability")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)


def describe(registry: Registry) -> dict:
    """The JSON document of ``kt backends --json``."""
    backends = []
    for spec in registry.specs():
        reason = registry.unavailable_reason(spec)
        backends.append({
            "name": spec.name,
            "op": spec.op,
            "distribution": spec.distribution,
            "version": spec.version,
            "devices": list(spec.devices),
            "formats": list(spec.formats),
            "options": [o.name for o in spec.options],
            "available": reason is None,
            "reason": reason,
            "description": spec.description,
        })
    failures = [
        {"entry_point": f.entry_point, "distribution": f.distribution, "version": f.version, "error": f.error}
        for f in registry.failures.values()
    ]
    return {"backends": backends, "failed_plugins": failures}


def _table(doc: dict) -> str:
    rows = [("BACKEND", "OP", "DISTRIBUTION", "DEVICES", "STATUS")]
    for b in doc["backends"]:
        status = "available" if b["available"] else f"unavailable: {b['reason']}"
        rows.append((b["name"], b["op"], f"{b['distribution']} {b['version']}".strip(),
                     ",".join(b["devices"]), status))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r[:4])) + "  " + r[4] for r in rows]
    for f in doc["failed_plugins"]:
        lines.append(f"failed plugin {f['entry_point']!r} ({f['distribution']} {f['version']}): {f['error']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    doc = describe(Registry.from_entry_points())
    sys.stdout.write((json.dumps(doc, indent=2) if args.json else _table(doc)) + "\n")
    return 0
