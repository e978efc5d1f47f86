"""`fedlesion simulate`: a multi-center study of aggregation rules against centralized and local training, run by
the real coordinator and one real site process per center on loopback (training/study/)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
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
    parser.add_argument("--parallel", type=int, default=1, metavar="N",
                        help="federations run side by side (default 1: each arm's wall time is its own; with more, "
                             "compare the arms' CPU seconds)")
    parser.set_defaults(func=run)


class Display:
    """Progress on stderr: on a terminal one line, rewritten in place, with each running federation's round and
    sites; elsewhere a line each time a federation reaches another round. Federations report from their own
    threads."""

    def __init__(self) -> None:
        self.terminal = sys.stderr.isatty()
        self.lock = threading.Lock()
        self.lines: dict[str, str] = {}  # label → its status, for the federations running now
        self.rounds: dict[str, int] = {}

    def note(self, text: str) -> None:
        with self.lock:
            label = text.split(":", 1)[0]
            self.lines.pop(label, None)
            print(("\r\033[K" if self.terminal else "") + text, file=sys.stderr, flush=True)
            self._redraw()

    def status(self, label: str, round_: int, rounds: int, activity: Mapping[str, str]) -> None:
        sites = ", ".join(f"{site} {what}" for site, what in activity.items())
        with self.lock:
            self.lines[label] = f"{label} round {round_}/{rounds} ({sites})"
            if self.terminal:
                self._redraw()
            elif self.rounds.get(label) != round_:
                print(self.lines[label], file=sys.stderr, flush=True)
            self.rounds[label] = round_

    def _redraw(self) -> None:
        if self.terminal and self.lines:
            width = shutil.get_terminal_size().columns - 1
            print("\r\033[K" + " | ".join(self.lines.values())[:width], end="", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from training.study.config import StudyConfig
    from training.study.runner import Launcher, run_study

    config = StudyConfig.read(args.study)
    out = args.out or Path(config.path.stem)
    root = str(Path(fedlesion.__file__).resolve().parents[1])  # the processes run this very fedlesion
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=root if not path else f"{root}{os.pathsep}{path}", PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # a process per center on a few cores: no thread oversubscription
    run_study(config, out, Launcher((sys.executable, "-m", "fedlesion"), env), Display(), workers=args.workers,
              parallel=args.parallel)
    return print_report(out)
