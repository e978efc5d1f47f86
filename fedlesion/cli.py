"""The one fedlesion command line: parse, load settings, call into the packages.

Every subcommand lives in `fedlesion/commands/<name>.py` and exposes `register(subparsers)`, which adds its
parser and sets `func` to a `run(args) -> int`. Library code signals bad input with `ValueError` (or `OSError` for
files); this module turns those into one line on stderr and a non-zero exit, never a traceback
(set FEDLESION_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn, Sequence

from fedlesion.commands import COMMANDS
from fedlesion.settings import SettingsError
from models.version import distribution_version

EXIT_USAGE = 2
EXIT_FAILURE = 1


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus an error; a bad argument should cost the user one line, not a screen."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="fedlesion",
        description="Brain-MRI lesion segmentation: DICOM node, ONNX inference and federated training.",
    )
    parser.add_argument("--version", action="version", version=f"fedlesion {distribution_version()}")
    parser.add_argument("--config", metavar="TOML", help="settings file (default: $FEDLESION_CONFIG if set)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=OneLineParser)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except (SettingsError, ValueError, OSError) as error:
        if os.environ.get("FEDLESION_DEBUG"):
            raise
        print(f"fedlesion: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedlesion: interrupted", file=sys.stderr)
        return 130


def _one_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
