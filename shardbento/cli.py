"""`python -m shardbento <command>`: a registry of subcommands, each registered by its own module."""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]
Register = Callable[[argparse._SubParsersAction], None]

# Modules that define `register(subparsers)`; each adds its subcommands and sets `handler` on them.
# Imported lazily so `--help` and light commands never pay for torch or bentoml.
COMMAND_MODULES: tuple[str, ...] = (
    "shardbento.deploy.commands",
    "shardbento.plan.cli",
    "shardbento.bench.commands",
)


def build_parser(modules: tuple[str, ...] = COMMAND_MODULES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shardbento", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return handler(args)
