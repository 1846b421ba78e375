"""Command line: ``sinkdlm demo`` / ``python3 -m sinkdlm demo`` (see sinkdlm.demo)."""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    """Entry point of the ``sinkdlm`` console script."""
    parser = argparse.ArgumentParser(prog="sinkdlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import demo

    demo_parser = sub.add_parser(
        "demo",
        help="train a baseline and a one-sink model and compare their attention sinks",
        description=demo.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_arguments(demo_parser)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo.run_demo(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
