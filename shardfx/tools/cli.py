"""The `shardfx` command.

    shardfx train --world-size 4          # train the built-in GPT on 4 local ranks
    shardfx estimate --params 7.5e9 --world-size 64

Each subcommand lives in its own module with `add_parser(subparsers)`, which
registers its options and sets `run` as the parser default, and
`run(args) -> int`. Adding a subcommand means adding its module to COMMANDS.

Exit codes: 0 success; 2 bad input (bad option, bad config, unsupported
request), printed as one line on stderr; 1 a graph problem (ShardfxError),
printed with the node and source line it names.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from shardfx.errors import ShardfxError
from shardfx.runtime.launch import WorkerFailed
from shardfx.tools import bisect, calibrate, estimate, export, passes_cmd, plan_cmd, prepare_data, train, viz

COMMANDS = (train, prepare_data, estimate, passes_cmd, plan_cmd, viz, bisect, calibrate, export)

EXIT_OK = 0
EXIT_GRAPH_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (with a pointer to --help) instead of the full usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="shardfx",
        description="shardfx: compile PyTorch training steps into distributed programs.",
        epilog="Run 'shardfx COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback when a command fails")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in COMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.run(args)
    except (ValueError, TypeError, NotImplementedError) as exc:
        if args.debug:
            raise
        # A user's bad input or config, or a feature that is not built yet: the message says what to change.
        print(f"shardfx {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except ShardfxError as exc:
        if args.debug:
            raise
        print(f"shardfx {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_GRAPH_ERROR
    except WorkerFailed as exc:
        if args.debug:
            for rank, text in exc.tracebacks.items():
                print(f"--- rank {rank}:\n{text}", file=sys.stderr)
            raise
        print(f"shardfx {args.command}: worker failed: {exc}", file=sys.stderr)
        return EXIT_GRAPH_ERROR
    except KeyboardInterrupt:
        print(f"shardfx {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`, which stopped reading: not an error of the command.
        # Point stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
