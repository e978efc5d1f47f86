"""Trainer, plan and `fedlesion train` on a tiny plan (depth 3, 4 filters, 32³ patches at 4 mm, 3 cases)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from fedlesion.cli import main
from models.manifest import Task
from models.network_plan import NetworkPlan
from models.networks import build_network, network_weights
from training.calibration import THRESHOLD_CANDIDATES
from training.checkpoint import checkpoint_threshold, load_checkpoint
from training.datasets import synthetic_cases
from training.plan import TrainingPlan, default_plan
from training.patches import crop
from training.trainer import LocalTrainer, LocalUpdate, train_model

TINY = {
    "network": {"depth": 3, "base_filters": 4, "max_filters": 32},
    "preprocessing": {"target_spacing_mm": [4.0, 4.0, 4.0], "patch_size": [32, 32, 32]},
    "batch_size": 2,
    "iterations_per_epoch": 4,
    "epochs": 2,
    "warmup_epochs": 0,
}
NO_AUGMENTATION = {"augmentation": {"flip_prob": 0, "affine_prob": 0, "intensity_prob": 0, "gamma_prob": 0,
                                    "noise_prob": 0, "bias_field_prob": 0}}


def tiny_plan(**overrides) -> TrainingPlan:
    plan = default_plan("stroke-dwi-adc").with_overrides(TINY)
    return plan.with_overrides(overrides) if overrides else plan


@pytest.fixture(scope="module")
def cases():
    return list(synthetic_cases("stroke-dwi-adc", 3, seed=0, domain_randomization=False))


def _distance(a: dict, b: dict, names) -> float:
    return float(np.sqrt(sum(np.sum((a[n].astype(np.float64) - b[n]) ** 2) for n in names)))


def test_default_plans_round_trip_and_hash():
    for task in Task:
        for device in ("cpu", "cuda"):
            plan = default_plan(task, device)
            data = json.loads(plan.to_json())
            assert TrainingPlan.from_dict(data) == plan
            assert TrainingPlan.from_dict(data).sha256() == plan.sha256()
            assert data["network"]["architecture"] == "dynunet" and isinstance(data["network"]["depth"], int)
            stroke = task is Task.STROKE_DWI_ADC
            assert set(data["preprocessing"]) == {"target_spacing_mm", "patch_size", "size_divisible", "normalization"}\
                | ({"channel_normalization"} if stroke else set())
            # the stroke ADC reads relative to the head's own (median ratio); DWI and FLAIR are z-scored in the head
            assert plan.preprocessing.normalization_of("adc").method.value == ("median-ratio" if stroke
                                                                                else "zscore-head-mask")
            assert data["threshold"] == 0.5 and data["loss"] == "dice_ce"
    cpu = default_plan("stroke-dwi-adc")
    assert (cpu.network.depth, cpu.network.base_filters, cpu.patch_size) == (4, 8, (64, 64, 48))
    assert cpu.preprocessing.target_spacing_mm == (2.0, 2.0, 2.0) and not cpu.amp
    ms = default_plan("ms-flair")
    assert ms.in_channels == 1 and ms.patch_size == (64, 64, 64)
    assert ms.preprocessing.target_spacing_mm == (1.5, 1.5, 1.5)
    assert default_plan("ms-flair", "cuda").preprocessing.target_spacing_mm == (1, 1, 1)
    # batch normalization for both tasks: the node runs whole volumes, the model's own output (design.md §5)
    assert {default_plan(task, device).network.norm.value for task in Task for device in ("cpu", "cuda")} == {"batch"}
    assert default_plan("stroke-dwi-adc", "cuda").amp
    assert cpu.with_overrides({"lr": 5e-4}).sha256() != cpu.sha256()
    assert abs(cpu.foreground_fraction - 1 / 3) < 1e-9


@pytest.mark.parametrize("override, message", [
    ({"optimizer": "adam"}, "optimizer"),
    ({"preprocessing": {"patch_size": [30, 32, 32]}}, "patch_size"),
    ({"in_channels": 1}, "in_channels"),
    ({"bogus": 1}, "unknown"),
    ({"augmentation": {"flip_prob": 2}}, "probability"),
])
def test_bad_plans_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        default_plan("stroke-dwi-adc").with_overrides(override)


def test_crop_pads_outside_the_grid():
    array = np.arange(27, dtype=np.float32).reshape(1, 3, 3, 3) + 1
    out = crop(array, (-1, 0, 2), (3, 3, 3))
    assert out.shape == (1, 3, 3, 3)
    assert np.all(out[:, 0] == 0) and np.all(out[:, :, :, 1:] == 0)
    assert out[0, 1, 0, 0] == array[0, 0, 0, 2]


def test_loss_falls_on_a_repeated_batch(cases):
    plan = tiny_plan(lr=1e-2, min_lr_ratio=1.0, foreground_fraction=1.0, **NO_AUGMENTATION)
    trainer = LocalTrainer(plan, cases[:2], progress=False)
    images, labels = next(iter(trainer.batches(0)))
    assert labels.sum() > 0
    losses = [trainer.train_step(images, labels) for _ in range(20)]
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4]), losses


def test_local_update_evaluate_and_resume_replays_a_straight_run(cases, tmp_path):
    plan = tiny_plan()
    straight = LocalTrainer(plan, cases[:2], cases[2:], progress=False)
    update = straight.train(None, 2)
    assert isinstance(update, LocalUpdate) and update.n_cases == 2
    assert update.metrics["epoch"] == 2 and update.metrics["steps"] == 4 and np.isfinite(update.metrics["train_loss"])
    assert set(update.weights) == set(network_weights(straight.model))  # the state dict, each tensor once
    scores = straight.evaluate()
    assert 0.0 <= scores["val_dice"] <= 1.0 and scores["n_val_cases"] == 1 and "val_lf1" in scores
    assert "dice_by_threshold" not in scores
    curve = straight.evaluate(thresholds=(0.3, plan.threshold, 0.9))["dice_by_threshold"]  # one prediction per case
    assert list(curve) == [0.3, plan.threshold, 0.9] and curve[plan.threshold] == pytest.approx(scores["val_dice"])

    first = LocalTrainer(plan, cases[:2], progress=False)
    first.train(None, 1)
    first.history.append({"epoch": 1, "train_loss": 1.0, "val_dice": None})
    path = first.save(tmp_path / "last.pt")
    resumed = LocalTrainer(plan, cases[:2], progress=False)
    resumed.restore(load_checkpoint(path))
    assert resumed.epoch == 1 and len(resumed.history) == 1
    assert resumed.scheduler.last_epoch == first.scheduler.last_epoch
    for name, state in first.optimizer.state_dict()["state"].items():
        assert torch.equal(resumed.optimizer.state_dict()["state"][name]["exp_avg"], state["exp_avg"])
    resumed.train(None, 1)
    assert resumed.epoch == 2
    # Same seed, same plan: resume + 1 epoch gives the weights of a straight 2-epoch run.
    after = resumed.get_weights()
    for name, value in update.weights.items():
        np.testing.assert_allclose(after[name], value, rtol=0, atol=1e-6, err_msg=name)


def test_a_round_trains_the_same_in_a_restarted_site_as_in_one_that_never_stopped(cases):
    """A federated site: the schedule spans rounds × local epochs and each round starts afresh at its place on it."""
    plan, rounds = tiny_plan(epochs=1, lr=1e-2, min_lr_ratio=0.01), 3
    running = LocalTrainer(plan, cases[:2], progress=False, schedule_epochs=rounds)
    running.start_round(0)
    first = running.train(running.get_weights(), 1)
    running.start_round(1)
    second = running.train(first.weights, 1)
    restarted = LocalTrainer(plan, cases[:2], progress=False, schedule_epochs=rounds)
    restarted.start_round(1)
    again = restarted.train(first.weights, 1)
    for name, value in second.weights.items():
        np.testing.assert_allclose(again.weights[name], value, rtol=0, atol=1e-6, err_msg=name)
    assert second.metrics["epoch"] == again.metrics["epoch"] == 2
    # Cosine over the three rounds: round 2 ends halfway down, not at the floor of a schedule over one round.
    assert second.metrics["lr"] == pytest.approx(plan.lr * 0.5 * (1 + np.cos(np.pi * 2 / 3)))
    with pytest.raises(ValueError, match="first_epoch"):
        restarted.start_round(rounds)
    with pytest.raises(ValueError, match="schedule_epochs"):
        LocalTrainer(plan, cases[:2], progress=False, schedule_epochs=0)


def test_fedprox_term_is_zero_at_the_global_weights_and_pulls_towards_them(cases):
    plan = tiny_plan(optimizer="sgd", momentum=0.0, lr=1e-2, min_lr_ratio=1.0, iterations_per_epoch=8)
    trainer = LocalTrainer(plan, cases[:2], progress=False)
    start = trainer.get_weights()
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    assert float(trainer._prox_term(params).detach()) == 0.0

    names = [name for name, _ in trainer.model.named_parameters()]
    free = trainer.train(start, 1).weights
    pulled = LocalTrainer(plan, cases[:2], progress=False).train(start, 1, global_weights=start, prox_mu=50.0).weights
    moved_free, moved_pulled = _distance(free, start, names), _distance(pulled, start, names)
    assert 0 < moved_pulled < 0.8 * moved_free, (moved_pulled, moved_free)


def test_train_model_writes_checkpoints_csv_curves_and_resumes(cases, tmp_path):
    plan = tiny_plan(epochs=1)
    path = train_model(plan, cases[:2], cases[2:], tmp_path, progress=False)
    assert path == tmp_path / "best.pt" and (tmp_path / "last.pt").exists()
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["format"] == "fedlesion-checkpoint-1" and state["epoch"] == 1 and state["task"] == "stroke-dwi-adc"
    network = NetworkPlan(**state["plan"]["network"])
    build_network(state["plan"]["in_channels"], 1, network).load_state_dict(state["model"])
    assert state["plan"]["preprocessing"]["patch_size"] == [32, 32, 32]
    assert len(state["history"]) == 1 and state["best_val_dice"] == state["history"][0]["val_dice"]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"

    with pytest.raises(ValueError, match="resume"):
        train_model(plan, cases[:2], cases[2:], tmp_path, progress=False)
    train_model(tiny_plan(epochs=2), cases[:2], cases[2:], tmp_path, resume=True, progress=False)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 2 and [row["epoch"] for row in state["history"]] == [1, 2]
    with open(tmp_path / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1", "2"] and all(float(row["val_dice"]) >= 0 for row in rows)
    with pytest.raises(ValueError, match="different plan"):
        train_model(tiny_plan(epochs=3, lr=0.5), cases[:2], cases[2:], tmp_path, resume=True, progress=False)


def test_a_resumed_run_rescores_its_best_checkpoint_on_todays_validation_cases(cases, tmp_path):
    """A resume that validates on other cases (a changed generator) compares the old best on those cases, not by
    the Dice it had on the old ones."""
    train_model(tiny_plan(epochs=1), cases[:1], cases[1:2], tmp_path, progress=False)
    old_best = load_checkpoint(tmp_path / "best.pt")
    judge = LocalTrainer(tiny_plan(epochs=2), cases[:1], cases[2:], progress=False)
    rescored = judge.evaluate(old_best["model"])["val_dice"]

    train_model(tiny_plan(epochs=2), cases[:1], cases[2:], tmp_path, resume=True, progress=False)
    last = load_checkpoint(tmp_path / "last.pt")
    epoch_2 = last["history"][-1]["val_dice"]
    assert last["best_val_dice"] == pytest.approx(max(rescored, epoch_2))
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == (2 if epoch_2 > rescored else 1)


def test_threshold_is_calibrated_on_the_validation_cases_and_kept_in_best_pt(cases, tmp_path):
    plan = tiny_plan(epochs=1)
    path = train_model(plan, cases[:2], cases[2:], tmp_path, progress=False)
    with open(tmp_path / "threshold.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["threshold"]) for row in rows] == list(THRESHOLD_CANDIDATES)
    (chosen,) = [row for row in rows if row["chosen"] == "1"]
    assert float(chosen["val_dice"]) == max(float(row["val_dice"]) for row in rows)
    state = load_checkpoint(path)
    assert checkpoint_threshold(state) == state["threshold"] == float(chosen["threshold"])
    assert state["history"][-1]["val_dice"] == pytest.approx(float(chosen["val_dice"]))  # what export reports
    assert checkpoint_threshold(load_checkpoint(tmp_path / "last.pt")) == plan.threshold  # last.pt: the plan's

    trainer = LocalTrainer(plan, cases[:2], cases[2:], progress=False)
    trainer.model.load_state_dict(state["model"])
    threshold, metrics = trainer.calibrate_threshold((0.2, 0.5, 0.8))
    assert threshold in metrics and metrics[threshold]["dice"] == max(m["dice"] for m in metrics.values())
    with pytest.raises(ValueError, match="candidates"):
        trainer.calibrate_threshold((0.5, 1.0))
    with pytest.raises(ValueError, match="validation cases"):
        LocalTrainer(plan, cases[:2], [], progress=False).calibrate_threshold()


def test_cli_trains_one_epoch_on_synthetic_cases(cases, tmp_path, monkeypatch, capsys):
    import training.datasets

    calls = []

    def cached(task, n, seed, **kwargs):  # the fixture's cases: the generator has its own tests
        calls.append((str(task), n, seed))
        return iter(cases[:n])

    monkeypatch.setattr(training.datasets, "synthetic_cases", cached)
    out = tmp_path / "run"
    argv = ["train", "--task", "stroke-dwi-adc", "--data", "synthetic:3", "--out", str(out), "--epochs", "1",
            "--plan", json.dumps(TINY), "--no-progress", "--seed", "3"]
    assert main(argv) == 0
    assert calls == [("stroke-dwi-adc", 3, 3)]
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 1 and state["plan"]["seed"] == 3 and state["plan"]["epochs"] == 1
    assert (out / "metrics.csv").exists() and (out / "curves.png").exists() and (out / "plan.json").exists()
    err = capsys.readouterr().err
    assert "training on 2 case(s), validating on 1" in err
    threshold = checkpoint_threshold(load_checkpoint(out / "best.pt"))
    assert f"threshold {threshold:g}, calibrated on the validation cases" in err


@pytest.mark.parametrize("extra, message", [
    (["--data", "synthetic:x"], "synthetic:N"),
    (["--data", "synthetic:2", "--val-fraction", "1.5"], "val-fraction"),
    (["--data", "synthetic:2", "--plan", "[1]"], "JSON object"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, extra, message):
    assert main(["train", "--task", "stroke-dwi-adc", "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cli_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--task", "ms-flair", "--data", "synthetic:1", "--out", str(tmp_path), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
