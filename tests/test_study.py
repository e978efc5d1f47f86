"""`fedlesion simulate` and `fedlesion report` (training/study/): the study file, and a reduced study run end to end
with real coordinator and site processes on loopback, whose report is checked against its per-case files."""

from __future__ import annotations

import csv
import json
import math
import re
import textwrap
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from fedlesion.cli import main
from tests.conftest import ISLES_CASE
from training.study.centers import CenterData
from training.federation.aggregation import strategy_by_name
from training.study.config import StudyConfig
from training.study.runner import arm_federations

SIZE_BELOW_ML, SIZE_ABOVE_ML = 5.0, 70.0  # design.md §9's size classes, restated here rather than imported


def write_study(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


MINIMAL = """
    [study]
    task = "stroke-dwi-adc"
    rules = ["fedavg", "fedprox"]

    [centers.a]
    role = "train"
    synthetic = 3
"""


def test_a_study_names_its_arms_and_resolves_paths_against_its_own_folder(tmp_path: Path) -> None:
    path = write_study(tmp_path / "studies", MINIMAL + """
    [centers.real]
    role = "evaluate"
    data = ["../cases/one", "synthetic:2:site=3"]
    """)
    config = StudyConfig.read(path)
    assert [arm.name for arm in config.arms()] == ["FedAvg", "FedProx", "centralized", "local", "IIL", "cyclic IIL"]
    real = config.centers[1]
    assert real.data == (str(tmp_path / "cases" / "one"), "synthetic:2:site=3")
    assert config.centers[0].synthetic is not None and config.centers[0].synthetic.cases == 3
    changed = write_study(tmp_path / "other", MINIMAL.replace("synthetic = 3", "synthetic = 4"))
    assert StudyConfig.read(changed).sha256() != config.sha256()


@pytest.mark.parametrize(("extra", "message"), [
    ('[study]\nrules = ["iil"]', "passes the model from site to site: name it in study.baselines"),
    ('[study]\nbaselines = ["sequential"]', "not a baseline"),
    ('[study]\ndevice = "tpu"', "study.device: one of cpu, cuda"),
    ('[centers.b]\nrole = "evaluate"\nsynthetic = 2\nlesion_sizes = { huge = 1.0 }', "lesion_sizes"),
    ('[centers.b]\nrole = "evaluate"\ndata = "x"\nscanner = 3', "synthetic centers only"),
    ('[study.training]\nepochs = 3', "cannot be set here"),
    ('[study.training]\nlr = -1.0', "study.training"),
    ('[rules.median]\nfraction = 0.1', "not in study.rules"),
])
def test_a_study_file_that_cannot_run_is_refused_with_the_reason(tmp_path: Path, extra: str, message: str) -> None:
    text = MINIMAL
    if extra.startswith("[study]"):
        text = text.replace('rules = ["fedavg", "fedprox"]', extra.split("\n", 1)[1])
    else:
        text += "\n" + extra + "\n"
    with pytest.raises(ValueError, match=message):
        StudyConfig.read(write_study(tmp_path, text))


def test_a_study_without_a_training_center_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing would train"):
        StudyConfig.read(write_study(tmp_path, MINIMAL.replace('role = "train"', 'role = "evaluate"')))


def test_the_sequential_baselines_pass_the_model_between_large_centers_for_the_epochs_a_rule_trains(
    tmp_path: Path,
) -> None:
    """Each large center trains rounds × local epochs in all under a rule, and under IIL and cyclic IIL, one center
    a round; the limited centers evaluate every round's model."""
    text = MINIMAL.replace('rules = ["fedavg", "fedprox"]', "rounds = 2\nlocal_epochs = 3")
    for name in ("b", "c"):
        text += f'\n[centers.{name}]\nrole = "train"\nsynthetic = 3\n'
    config = StudyConfig.read(write_study(tmp_path, text + '\n[centers.d]\nrole = "evaluate"\nsynthetic = 2\n'))
    centers = [CenterData(center.name, center.role, {split: str(tmp_path / f"{center.name}-{split}.csv")
                                                     for split in ("train", "val", "test")}, {})
               for center in config.centers]
    arms = {arm.name: arm for arm in config.arms()}
    shapes = {}
    for name in ("FedAvg", "IIL", "cyclic IIL"):
        [federation] = arm_federations(config, arms[name], centers, tmp_path / name)
        plan = federation.plan
        shapes[name] = (plan.strategy, plan.rounds, plan.local_epochs, plan.quorum)
        assert federation.device == "cpu"
        assert [(site.name, site.role.value) for site in federation.sites] == [
            ("a", "trainer"), ("b", "trainer"), ("c", "trainer"), ("d", "evaluator")]
    assert shapes == {"FedAvg": ("fedavg", 2, 3, 3), "IIL": ("iil", 6, 3, 1), "cyclic IIL": ("cyclic-iil", 6, 3, 1)}
    iil, cyclic = (arms[name].strategy for name in ("IIL", "cyclic IIL"))
    assert [strategy_by_name(iil).participants(r, 6, ["a", "b", "c"]) for r in range(1, 7)] == [
        ["a"], ["a"], ["b"], ["b"], ["c"], ["c"]]  # two rounds (6 epochs) at a center, then the next
    assert [strategy_by_name(cyclic).participants(r, 6, ["a", "b", "c"]) for r in range(1, 7)] == [
        ["a"], ["b"], ["c"], ["a"], ["b"], ["c"]]  # around twice, a round (3 epochs) at each


# -- the reduced study, end to end ---------------------------------------------------------------------------------
REDUCED = """
    [study]
    task = "stroke-dwi-adc"
    seed = 5
    rounds = 1
    rules = ["fedavg"]
    baselines = ["centralized", "local"]

    [centers.big-a]
    role = "train"
    synthetic = 3
    scanner = 5
    lesion_sizes = { large = 1.0 }

    [centers.big-b]
    role = "train"
    synthetic = 3
    scanner = 9

    [centers.small-c]
    role = "evaluate"
    synthetic = 2
    scanner = 21

    [centers.gone]
    role = "evaluate"
    data = "no-such-folder"
    optional = true

    [centers.real]
    role = "evaluate"
    data = "REAL"
    optional = true
"""


def reduced_study(folder: Path) -> Path:
    """Two large centers (one drawing only large lesions), a limited synthetic one, one whose data is absent and
    the shared ISLES'22 case 0001 (absent too where ../shared/data is)."""
    return write_study(folder, REDUCED.replace("REAL", str(ISLES_CASE)))


def per_case(path: Path) -> dict[tuple[str, str], dict[str, object]]:
    """cases.csv read with the csv module: each (center, case) once, its metrics averaged over the models."""
    rows: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            rows[(row["center"], row["case_id"])].append(row)
    return {key: {"large": group[0]["large"] == "1", "gt_ml": float(group[0]["gt_volume_ml"]),
                  **{m: float(np.mean([float(r[m]) for r in group])) for m in ("dice", "avd_ml", "ald", "lf1")}}
            for key, group in rows.items()}


def expected_cell(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    mean = f"{np.mean(values):.{digits}f}"
    return mean if len(values) < 2 else f"{mean} ± {np.std(values, ddof=1):.{digits}f}"


def report_rows(report: str, metric_title: str) -> dict[str, list[str]]:
    """The arm rows of the report's table for one metric (the table whose header starts with its title)."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {metric_title} |"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_a_reduced_study_runs_every_arm_and_its_report_matches_the_per_case_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = reduced_study(tmp_path / "config")
    out = tmp_path / "out"
    assert main(["simulate", "--config", str(study), "--out", str(out), "--parallel", "4", "--workers", "2"]) == 0
    printed = capsys.readouterr()
    assert "center gone skipped" in printed.err
    assert all(f"| {arm} |" in printed.out for arm in ("FedAvg", "centralized", "local"))

    report = (out / "report.md").read_text()
    assert (out / "case_dice.png").stat().st_size > 0 and (out / "validation_dice.png").stat().st_size > 0
    assert "no-such-folder is absent" in report
    metrics = {"DSC": ("dice", 3), "AVD (ml)": ("avd_ml", 2), "ALD": ("ald", 2), "LF1": ("lf1", 3)}
    for arm in ("FedAvg", "centralized", "local"):
        cases = per_case(out / "arms" / arm.lower() / "cases.csv")
        groups = {
            "all": list(cases.values()),
            "large centers": [c for c in cases.values() if c["large"]],
            "limited centers": [c for c in cases.values() if not c["large"]],
            "small": [c for c in cases.values() if c["gt_ml"] < SIZE_BELOW_ML],
            "medium": [c for c in cases.values() if SIZE_BELOW_ML <= c["gt_ml"] <= SIZE_ABOVE_ML],
            "large": [c for c in cases.values() if c["gt_ml"] > SIZE_ABOVE_ML],
        }
        for title, (metric, digits) in metrics.items():
            assert report_rows(report, title)[arm] == [
                expected_cell([c[metric] for c in group], digits) for group in groups.values()
            ], (arm, metric)
        centers = {center for center, _ in cases}
        assert "gone" not in centers and {"big-a", "big-b", "small-c"} <= centers
        assert ("real" in centers) == ISLES_CASE.is_dir()
        # big-a draws only large lesions; its test cases say so through their own masks
        assert all(c["gt_ml"] > SIZE_ABOVE_ML for (center, _), c in cases.items() if center == "big-a")

    # Under local, a limited center's case is scored by each large center's model, and counted once.
    with (out / "arms" / "local" / "cases.csv").open(newline="") as handle:
        local_rows = list(csv.DictReader(handle))
    assert {r["model"] for r in local_rows if r["center"] == "small-c"} == {"big-a", "big-b"}
    assert {r["model"] for r in local_rows if r["center"] == "big-a"} == {"big-a"}

    # Each federation released its one round's candidate; the trainers reported validation with their updates.
    fedavg = json.loads((out / "arms" / "fedavg" / "result.json").read_text())
    rounds = fedavg["federations"]["FedAvg"]["rounds"]
    assert [r["round"] for r in rounds] == [1]
    assert {"big-a", "big-b"} <= set(rounds[0]["sites"]) and "val_dice" in rounds[0]["sites"]["big-a"]
    assert fedavg["cpu_seconds"] > 0 and fedavg["seconds"] > 0
    # The coordinator counted each stream: the weights to each trainer and its update back (the same size), the
    # round's candidate to each evaluator.
    traffic = rounds[0]["bytes"]
    evaluators = {"small-c", "real"} if ISLES_CASE.is_dir() else {"small-c"}
    assert set(traffic) == {"big-a", "big-b"} | evaluators and all(set(traffic[e]) == {"down"} for e in evaluators)
    assert traffic["big-a"]["down"] == traffic["big-b"]["down"]
    assert len({traffic[e]["down"] for e in evaluators}) == 1
    assert all(traffic[t]["up"] == pytest.approx(traffic[t]["down"], rel=0.01) for t in ("big-a", "big-b"))
    down, up = (sum(site.get(direction, 0) for site in traffic.values()) for direction in ("down", "up"))
    assert report_rows(report.split("## Cost")[1], "arm")["FedAvg"][2:5] == ["1", f"{down / 1e6:.2f}",
                                                                             f"{up / 1e6:.2f}"]
    state = json.loads((out / "study.json").read_text())
    assert [c["counts"] for c in state["centers"] if c["name"] == "big-a"] == [{"train": 1, "val": 1, "test": 1}]

    # Resuming: a finished arm is kept; an arm whose scoring was lost is scored again from its released model,
    # without running its federation again.
    cases_before = (out / "arms" / "fedavg" / "cases.csv").read_text()
    coordinator_log = out / "arms" / "fedavg" / "logs" / "coordinator.log"
    log_size = coordinator_log.stat().st_size
    (out / "arms" / "fedavg" / "result.json").unlink()
    (out / "arms" / "fedavg" / "cases.csv").unlink()
    assert main(["simulate", "--config", str(study), "--out", str(out)]) == 0
    assert "centralized: finished in an earlier run, kept" in capsys.readouterr().err
    assert (out / "arms" / "fedavg" / "cases.csv").read_text() == cases_before
    assert coordinator_log.stat().st_size == log_size

    # `fedlesion report` renders the same report from the files alone.
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == report

    # Another study file cannot resume into this folder.
    other = write_study(tmp_path / "other", study.read_text().replace("seed = 5", "seed = 6"))
    assert main(["simulate", "--config", str(other), "--out", str(out)]) == 2
    assert re.search(r"holds the results of another study", capsys.readouterr().err)
    assert not math.isnan(float(report_rows(report, "DSC")["FedAvg"][0].split()[0]))
