"""The ``graft`` command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from tasks.config import DEFAULT_PARAMS, load_params
from tasks.errors import run_main


def _check(arguments: argparse.Namespace) -> None:
    load_params(arguments.params)
    print(f"{arguments.params}: all settings valid")


def _demo(arguments: argparse.Namespace) -> None:
    from tasks.demo import write_demo  # scikit-learn only when asked for

    counts = write_demo(arguments.out)
    print(f"demo written to {arguments.out}: {counts}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graft", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="validate params.yaml without running anything")
    check.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    check.set_defaults(handler=_check)

    demo = commands.add_parser("demo", help="(re)write the built-in digits demo images")
    demo.add_argument("--out", type=Path, default=Path("data/demo"))
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    arguments = build_parser().parse_args(argv)
    run_main(lambda: arguments.handler(arguments))


if __name__ == "__main__":
    main()
