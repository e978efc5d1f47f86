"""A study's report (`DIR/report.md` and its PNGs), rendered from the files the study wrote: `study.json`, and per arm
`result.json` (time, each round's aggregates as the coordinator received them) and `cases.csv` (per case, the final
model as a node runs it). `fedlesion report DIR` renders it again from those files alone.

Every mean ± SD is over cases (design.md §9: per case, then mean ± sample SD; NaN ratios left out), pooled over the
centers of a group: all centers, the large ones, the limited ones, and the ISLES'22 lesion-size classes of
`models.metrics.size_category` (small < 5 ml ≤ medium ≤ 70 ml < large, by the case's total lesion volume). A case
scored by several models (a limited center under `local`: one model per large center) counts once, with the mean of
those models' values.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.durable import write_text_atomic
from models.metrics import NUMERIC_METRICS, CaseMetrics, MetricSummary, summarize
from training.federation.monitoring import plot_site_dice
from training.study.runner import CASES_FILE, RESULT_FILE, STUDY_FILE, arm_dir
from training.study.scoring import read_case_rows

__all__ = ["GROUPS", "METRICS", "REPORT_FILE", "ArmCases", "comparison_table", "load_arm_cases", "write_report"]

REPORT_FILE = "report.md"
ROUNDS_PLOT = "validation_dice.png"
CASES_PLOT = "case_dice.png"
METRICS = {"dice": "DSC", "avd_ml": "AVD (ml)", "ald": "ALD", "lf1": "LF1"}
SIZE_CLASSES = ("small", "medium", "large")
GROUPS = ("all centers", "large centers", "limited centers", *(f"{size} lesions" for size in SIZE_CLASSES))


@dataclass(frozen=True)
class ArmCases:
    """One arm's cases, each once: (center, case id) → the case's metrics (the mean over the models that scored
    it), and which centers are large."""

    arm: str
    cases: dict[tuple[str, str], CaseMetrics]
    large: dict[str, bool]

    def group(self, name: str) -> list[CaseMetrics]:
        if name == "all centers":
            return list(self.cases.values())
        if name in ("large centers", "limited centers"):
            wanted = name == "large centers"
            return [m for (center, _), m in self.cases.items() if self.large[center] == wanted]
        size = name.removesuffix(" lesions")
        return [m for m in self.cases.values() if m.size_category == size]

    def summary(self, group: str) -> dict[str, MetricSummary]:
        return summarize(self.group(group))


def load_arm_cases(path: Path, arm: str) -> ArmCases:
    """`cases.csv` with each case once: a case scored by several models gets the mean of their values."""
    by_case: dict[tuple[str, str], list[CaseMetrics]] = defaultdict(list)
    large: dict[str, bool] = {}
    for row in read_case_rows(path):
        by_case[(row.center, row.case_id)].append(row.metrics)
        large[row.center] = row.large
    return ArmCases(arm, {key: _mean_case(rows) for key, rows in sorted(by_case.items())}, large)


def _mean_case(rows: Sequence[CaseMetrics]) -> CaseMetrics:
    if len(rows) == 1:
        return rows[0]
    values: dict[str, Any] = {name: float(np.nanmean([getattr(r, name) for r in rows]))
                              if not all(math.isnan(getattr(r, name)) for r in rows) else math.nan
                              for name in NUMERIC_METRICS}
    return CaseMetrics(**values, size_category=rows[0].size_category)


def _cell(summary: MetricSummary, digits: int) -> str:
    if summary.n == 0:
        return "–"
    sd = "" if math.isnan(summary.sd) else f" ± {summary.sd:.{digits}f}"
    return f"{summary.mean:.{digits}f}{sd}"


def comparison_table(arms: Sequence[ArmCases], metric: str = "dice") -> list[str]:
    """A markdown table: one row per arm, one column per group, `metric` as mean ± SD (n cases in the header)."""
    digits = 3 if metric in ("dice", "lf1") else 2
    counts = [len(arms[0].group(group)) if arms else 0 for group in GROUPS]
    header = "| " + METRICS[metric] + " | " + " | ".join(f"{g} (n={n})" for g, n in zip(GROUPS, counts)) + " |"
    lines = [header, "|" + "---|" * (len(GROUPS) + 1)]
    for arm in arms:
        lines.append(f"| {arm.arm} | " + " | ".join(_cell(arm.summary(group)[metric], digits) for group in GROUPS)
                     + " |")
    return lines


def write_report(out: Path) -> tuple[Path, list[str]]:
    """report.md and its plots from the study folder's files: the report's path and the comparison to print (DSC
    per arm and group, and each arm's wall time)."""
    study = json.loads((out / STUDY_FILE).read_text(encoding="utf-8"))
    finished = [name for name in study["arms"] if (arm_dir(out, name) / RESULT_FILE).is_file()]
    results = {name: json.loads((arm_dir(out, name) / RESULT_FILE).read_text(encoding="utf-8")) for name in finished}
    arms = [load_arm_cases(arm_dir(out, name) / CASES_FILE, name) for name in finished]
    lines = [f"# Multi-center study: {Path(study['config']).name}", ""]
    lines += _setup(study, finished)
    comparison = comparison_table(arms) + [""] + _cost(results) if arms else ["no arm has finished yet"]
    if arms:
        lines += ["", "## Final models per case", "",
                  "Each arm's final model (the last round's candidate, released) scored on every center's held-out "
                  "test cases through the node's ONNX engine and pipeline. Mean ± SD over cases (n in the header); "
                  "lesion sizes are ISLES'22's by total lesion volume (small < 5 ml ≤ medium ≤ 70 ml < large).", ""]
        for metric in METRICS:
            lines += comparison_table(arms, metric) + [""]
        lines += _per_center(arms)
        _plot_cases(arms, study, out / CASES_PLOT)
        lines += ["", f"![per-case Dice per center]({CASES_PLOT})", ""]
        lines += ["## Validation during training", "",
                  "What each site reported to the coordinator after each round (aggregates only): a training site its "
                  "own validation cases (under `centralized`, the one site's pooled validation of every large "
                  "center), an evaluator site its cases. A site with too few cases for an aggregate reports none.", "",
                  f"![validation Dice per center over rounds]({ROUNDS_PLOT})", ""]
        _plot_rounds(results, out / ROUNDS_PLOT)
        lines += ["## Cost", "", *_cost(results), "",
                  "Wall time: each federation's processes from their start to the last evaluation (earlier attempts "
                  "of an interrupted study included; without the per-case scoring). CPU: the user and system time "
                  "of those processes, the number to compare when federations ran side by side (--parallel). "
                  "Weights: the bytes of the model streams as the coordinator counted them, each round's weights to "
                  "the sites that trained it and its candidate to those that scored it, and the updates back "
                  "(encrypted chunks as serialized, without gRPC's and TLS's framing; task, heartbeat and metrics "
                  "calls left out)."]
    path = out / REPORT_FILE
    write_text_atomic(path, "\n".join(lines).rstrip() + "\n")
    return path, comparison


def _setup(study: Mapping[str, Any], finished: Sequence[str]) -> list[str]:
    lines = [f"Task {study['task']}, seed {study['seed']}, network `{study['network']}` on {study['device']}, "
             f"{study['rounds']} rounds of {study['local_epochs']} local epoch(s). Arms: " + ", ".join(
                 name if name in finished else f"{name} (not finished)" for name in study["arms"]) + ".", "",
             "| center | role | train | val | test | note |", "|---|---|---|---|---|---|"]
    for center in study["centers"]:
        counts = center["counts"]
        role = "large (trains)" if center["role"] == "train" else "limited (evaluates)"
        lines.append(f"| {center['name']} | {role} | " + " | ".join(str(counts.get(s, 0) if counts else "–")
                                                                  for s in ("train", "val", "test"))
                     + f" | {center['skipped']} |")
    return lines


def _per_center(arms: Sequence[ArmCases]) -> list[str]:
    centers = sorted({center for arm in arms for center, _ in arm.cases}, key=lambda c: (not arms[0].large.get(c), c))
    lines = ["DSC per center (mean ± SD over its test cases):", "",
             "| arm | " + " | ".join(centers) + " |", "|" + "---|" * (len(centers) + 1)]
    for arm in arms:
        cells = [_cell(summarize([m for (c, _), m in arm.cases.items() if c == center])["dice"], 3)
                 for center in centers]
        lines.append(f"| {arm.arm} | " + " | ".join(cells) + " |")
    return lines


def _cost(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = ["| arm | wall time (s) | CPU (s) | rounds | weights to sites (MB) | weights from sites (MB) | "
             "federations |", "|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        rounds = [round_ for federation in result["federations"].values() for round_ in federation["rounds"]]
        down, up = (sum(site.get(direction, 0) for round_ in rounds for site in round_["bytes"].values())
                    for direction in ("down", "up"))
        lines.append(f"| {name} | {result['seconds']:.0f} | {result['cpu_seconds']:.0f} | {len(rounds)} | "
                     f"{down / 1e6:.2f} | {up / 1e6:.2f} | {len(result['federations'])} |")
    return lines


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _plot_rounds(results: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """One panel per arm: each site's reported validation Dice over the rounds (trainers solid, evaluators dashed)."""
    figure = _figure(4.0 * max(1, len(results)), 3.4)
    axes_list = np.atleast_1d(figure.subplots(1, max(1, len(results)), sharey=True))
    for axes, (name, result) in zip(axes_list, results.items()):
        plot_site_dice(axes, [r for federation in result["federations"].values() for r in federation["rounds"]])
        axes.set(title=name)
    axes_list[0].set_ylabel("validation Dice")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _plot_cases(arms: Sequence[ArmCases], study: Mapping[str, Any], path: Path) -> None:
    """One panel per center: the per-case Dice of each arm's final model (box and points)."""
    centers = [c["name"] for c in study["centers"] if not c["skipped"]]
    columns = min(3, len(centers))
    rows = -(-len(centers) // columns)
    figure = _figure(4.2 * columns, 3.2 * rows)
    axes_grid = np.atleast_1d(figure.subplots(rows, columns, sharey=True, squeeze=False)).ravel()
    for axes, center in zip(axes_grid, centers):
        values = [[m.dice for (c, _), m in arm.cases.items() if c == center] for arm in arms]
        axes.boxplot(values, showfliers=False)
        for position, points in enumerate(values, start=1):
            axes.plot(np.full(len(points), position), points, "o", alpha=0.6, markersize=4)
        large = next((arm.large[center] for arm in arms if center in arm.large), False)
        axes.set(title=f"{center} ({'large' if large else 'limited'})", ylim=(-0.02, 1.02))
        axes.set_xticks(range(1, len(arms) + 1), [arm.arm for arm in arms], rotation=30, fontsize=8)
    for axes in axes_grid[len(centers):]:
        axes.set_visible(False)
    for axes in axes_grid[::columns]:
        axes.set_ylabel("Dice per case")
    figure.tight_layout()
    figure.savefig(path, dpi=100)

