"""``kt``: the command-line entry point.

Each sub-command lives in its own module exposing ``add_parser(subparsers)``; the parser it
adds sets ``func(args) -> int``. User errors (``KtError``) are printed as one message and exit
non-zero without a traceback; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ktcore import __version__
from ktcore.errors import KtError

#: Modules that contribute sub-commands, in the order ``kt --help`` lists them.
COMMAND_MODULES = ("ktcore.cli.backends_cmd", "ktcore.cli.rules_cmd", "ktcore.cli.demo_cmd",
                   "ktcore.cli.generate_cmd", "ktcore.cli.make_model_cmd", "ktcore.cli.bench_cmd")

log = logging.getLogger("ktcore")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kt", description="ktcore: MoE inference with pluggable kernels")
    parser.add_argument("--version", action="version", version=f"ktcore {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KtError as exc:
        if args.debug:
            raise
        print(f"kt {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
