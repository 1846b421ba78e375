"""Command line: ``sinkdlm demo`` / ``python3 -m sinkdlm demo`` (see sinkdlm.demo) and
``sinkdlm reproduce`` (see sinkdlm.reproduce)."""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    """Entry point of the ``sinkdlm`` console script."""
    parser = argparse.ArgumentParser(prog="sinkdlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import demo, reproduce

    demo_parser = sub.add_parser(
        "demo",
        help="train a baseline and a one-sink model and compare their attention sinks",
        description=demo.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_arguments(demo_parser)
    reproduce_parser = sub.add_parser(
        "reproduce",
        help="the sink paper's comparisons over several seeds, with 95% intervals",
        description=reproduce.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    reproduce.add_arguments(reproduce_parser)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo.run_demo(args)
    else:
        reproduce.run_reproduce(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
