"""A study's final models scored per case, as a node would run them: the released package through the ONNX engine
and `inference.pipeline.segment_channels` (the manifest's preprocessing, threshold and minimum lesion size), the
label mask it returns against the case's own mask: `training.federation.evaluation.score_cases`, what an evaluator
site runs.

Torch-free. Per-case values exist only here, in the simulation's own folder: in a deployment only aggregates leave a
site (training/federation/site.py).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from models.manifest import Task
from models.metrics import CaseMetrics
from models.package import TrustPolicy, load_package
from models.signing import load_public_key
from training.datasets import TrainingCase
from training.federation.evaluation import score_cases

__all__ = ["CASE_COLUMNS", "CaseRow", "case_rows_csv", "read_case_rows", "score_package"]


@dataclass(frozen=True)
class CaseRow:
    """One case scored by one model: which arm, which of its models (the center that trained it, for `local`),
    which center the case belongs to and whether that center is large."""

    arm: str
    model: str
    center: str
    large: bool
    case_id: str
    metrics: CaseMetrics


CASE_COLUMNS = ("arm", "model", "center", "large", "case_id", *(f.name for f in fields(CaseMetrics)))


def score_package(package_dir: Path, release_public_keys: Iterable[bytes], task: Task,
                  cases: Sequence[TrainingCase], *, threads: int | None = None) -> list[CaseMetrics]:
    """`cases` through the released package at `package_dir` (verified against the release keys first)."""
    trust = TrustPolicy.enrolled([load_public_key(pem) for pem in release_public_keys], [task])
    return score_cases(load_package(package_dir, trust), cases, threads=threads)


def case_rows_csv(rows: Sequence[CaseRow]) -> str:
    """The rows as CSV text (NaN as an empty cell; `read_case_rows` reads it back)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CASE_COLUMNS)
    for row in rows:
        values = row.metrics.as_dict()
        writer.writerow([row.arm, row.model, row.center, int(row.large), row.case_id,
                         *("" if values[f.name] is None else values[f.name] for f in fields(CaseMetrics))])
    return out.getvalue()


def read_case_rows(path: Path) -> list[CaseRow]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = []
        for record in reader:
            values = {}
            for f in fields(CaseMetrics):
                text = record[f.name]
                if f.name == "size_category":
                    values[f.name] = text
                elif text == "":
                    values[f.name] = float("nan")
                else:
                    values[f.name] = int(text) if f.type in (int, "int") else float(text)
            rows.append(CaseRow(record["arm"], record["model"], record["center"], record["large"] == "1",
                                record["case_id"], CaseMetrics(**values)))
    return rows
