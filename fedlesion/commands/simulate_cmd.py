"""`fedlesion simulate`: a multi-center study of aggregation rules against centralized and local training, run by
the real coordinator and one real site process per center on loopback (training/study/)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

import fedlesion
from fedlesion.commands.report_cmd import print_report


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate", help="compare aggregation rules with centralized and local training over simulated centers",
        description="Runs every rule and baseline the study file names, each as a federation of real processes on "
                    "loopback, then writes DIR/report.md. Running it again with the same --out resumes.",
    )
    parser.add_argument("--config", dest="study", required=True, type=Path, metavar="STUDY.toml",
                        help="the study: [study] and one [centers.NAME] table per center (examples/study-small.toml)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="the study folder (default: the study file's name without .toml, here)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="processes that generate synthetic centers (default: the CPU count)")
    parser.set_defaults(func=run)


class Display:
    """Progress on stderr: on a terminal one status line rewritten in place; elsewhere a line per round."""

    def __init__(self) -> None:
        self.terminal = sys.stderr.isatty()
        self.shown: tuple[str, int] | None = None

    def note(self, text: str) -> None:
        print(("\r\033[K" if self.terminal else "") + text, file=sys.stderr, flush=True)

    def status(self, label: str, round_: int, rounds: int, activity: Mapping[str, str]) -> None:
        line = f"{label}: round {round_}/{rounds} · " + " · ".join(f"{site} {what}" for site, what in activity.items())
        if self.terminal:
            width = shutil.get_terminal_size().columns - 1
            print(f"\r\033[K{line[:width]}", end="", file=sys.stderr, flush=True)
        elif self.shown != (label, round_):
            print(line, file=sys.stderr, flush=True)
        self.shown = (label, round_)


def run(args: argparse.Namespace) -> int:
    from training.study.config import StudyConfig
    from training.study.runner import Launcher, run_study

    config = StudyConfig.read(args.study)
    out = args.out or Path(config.path.stem)
    root = str(Path(fedlesion.__file__).resolve().parents[1])  # the processes run this very fedlesion
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=root if not path else f"{root}{os.pathsep}{path}", PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # a process per center on a few cores: no thread oversubscription
    run_study(config, out, Launcher((sys.executable, "-m", "fedlesion"), env), Display(), workers=args.workers)
    return print_report(out)
