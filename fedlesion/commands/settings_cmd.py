"""`fedlesion settings`: validate the settings file and overrides, print what the node would use."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedlesion.settings import load_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("settings", help="check the settings and print the effective values as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(Path(args.config) if args.config else None)
    print(json.dumps(settings.as_dict(), indent=2))
    return 0
