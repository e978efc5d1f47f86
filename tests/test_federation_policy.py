"""The custodian's policy: the printed file reads back, plans are approved by hash or pinned on first sight, caps and
the role only narrow what the coordinator asks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedlesion.cli import main
from models.federation.roles import SiteRole
from training.federation.plan import plan_for
from training.federation.policy import (
    PINNED_PLAN_FILE,
    DatasetUse,
    PlanApproval,
    PolicyDataset,
    PolicyRole,
    SitePolicy,
)

TASK = "stroke-dwi-adc"


def _policy(**changes) -> SitePolicy:
    base = SitePolicy(role="train", datasets=(PolicyDataset("local", "synthetic:4:site=4"),), approve_first_sight=True)
    return dataclasses.replace(base, **changes)


def test_printed_policy_reads_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = plan_for(TASK, local_epochs=2)
    plan_file = tmp_path / "plan.toml"
    plan_file.write_text(plan.to_toml(), encoding="utf-8")
    other = "ab" * 32
    argv = ["site", "policy", "--role", "train", "--data", "isles=/data/isles \"2022\"", "--data",
            "sim=synthetic:8:seed=3:site=4", "--val", "held=/data/val.csv", "--task", TASK, "--approve", str(plan_file),
            "--approve", other.upper(), "--max-local-epochs", "3", "--max-hours-per-round", "1.5", "--seed", "7",
            "--min-cases-per-mean", "8"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert text.count("\n# ") >= 8  # commented for the custodian who keeps it
    policy = SitePolicy.from_toml(text)
    assert policy == SitePolicy(
        role=PolicyRole.TRAIN,
        datasets=(PolicyDataset("isles", '/data/isles "2022"', DatasetUse.TRAIN, TASK),
                  PolicyDataset("sim", "synthetic:8:seed=3:site=4", DatasetUse.TRAIN, TASK),
                  PolicyDataset("held", "/data/val.csv", DatasetUse.VAL, TASK)),
        approved_plans=(plan.sha256, other), max_local_epochs=3, max_hours_per_round=1.5, seed=7,
        min_cases_per_mean=8,
    )
    assert [d.name for d in policy.datasets_for(TASK, DatasetUse.TRAIN)] == ["isles", "sim"]
    assert policy.datasets_for("ms-flair") == []

    assert main(["site", "policy", "--role", "pull"]) == 0
    assert SitePolicy.from_toml(capsys.readouterr().out).role is PolicyRole.PULL


@pytest.mark.parametrize("argv, message", [
    (["--role", "train", "--data", "a=synthetic:2", "--approve", "x" * 64], "neither a plan file nor a sha256"),
    (["--role", "train", "--data", "a=synthetic:2"], "exactly one of the two"),
    (["--role", "train", "--val", "a=synthetic:2", "--approve-first-sight"], "no dataset with use"),
    (["--role", "evaluate", "--data", "synthetic:2", "--approve-first-sight"], "NAME=SPEC"),
    (["--role", "train", "--data", "a b=synthetic:2", "--approve-first-sight"], "letters, digits"),
    (["--role", "pull", "--data", "a=synthetic:2"], "uses no datasets"),
    (["--role", "train", "--data", "a=x", "--approve-first-sight", "--approve", "ab" * 32], "not allowed with"),
])
def test_policy_cli_errors_are_one_line(argv, message, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(["site", "policy", *argv])
    except SystemExit as exit_info:  # argparse's own usage errors
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("text, message", [
    ('role = "train"\ncolour = 1\n', "unknown key(s) colour"),
    ('role = "admin"\n', "role: must be one of train, evaluate, pull"),
    ('role = "train"\n[plans]\napproved = ["abc"]\n[datasets.a]\nspec = "x"\n', "not a sha256"),
    ('role = "train"\n[plans]\napprove_first_sight = true\n[caps]\nmax_local_epochs = 0\n[datasets.a]\nspec = "x"\n',
     "caps.max_local_epochs"),
    ('role = "train"\n[plans]\napprove_first_sight = true\n[datasets.a]\nspec = "x"\nuse = "test"\n',
     "datasets.a.use"),
    ('role = "train"\nmin_cases_per_mean = 0\n[plans]\napprove_first_sight = true\n[datasets.a]\nspec = "x"\n',
     "min_cases_per_mean"),
    ("role = ", "not TOML"),
])
def test_bad_policy_file_names_the_key(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SitePolicy.from_toml(text)


def test_approved_by_hash_only(tmp_path: Path) -> None:
    plan = plan_for(TASK)
    approval = PlanApproval(_policy(approve_first_sight=False, approved_plans=(plan.sha256,)), tmp_path)
    assert approval.refusal(plan, training=True) is None
    changed = plan_for(TASK, local_epochs=2)
    assert approval.refusal(changed, training=True) == f"plan {changed.sha256} is not approved by the site's policy"
    assert not (tmp_path / PINNED_PLAN_FILE).exists()


def test_first_sight_pins_the_first_plan_across_restarts(tmp_path: Path) -> None:
    first, changed = plan_for(TASK), plan_for(TASK, local_epochs=2)
    too_long = plan_for(TASK, deadline_s=3 * 3600)
    policy = _policy(max_hours_per_round=2.0)
    approval = PlanApproval(policy, tmp_path / "state")
    assert approval.approved_sha256() is None
    assert "exceeds the site's policy cap of 2 h" in approval.refusal(too_long, training=True)
    assert approval.approved_sha256() is None  # a refused plan is never pinned
    assert approval.refusal(first, training=True) is None
    assert approval.approved_sha256() == first.sha256
    restarted = PlanApproval(policy, tmp_path / "state")
    assert restarted.refusal(first, training=True) is None
    reason = restarted.refusal(changed, training=True)
    assert reason and changed.sha256 in reason and f"{first.sha256}, which the site approved on first sight" in reason
    # Only the strategy changed: the training plan is the same, so is its identity.
    assert restarted.refusal(dataclasses.replace(first, rounds=first.rounds + 1), training=True) is None


def test_caps_and_role_refuse_before_approval(tmp_path: Path) -> None:
    plan = plan_for(TASK, local_epochs=4)
    approved = dict(approve_first_sight=False, approved_plans=(plan.sha256,))
    capped = PlanApproval(_policy(max_local_epochs=3, **approved), tmp_path)
    assert capped.refusal(plan, training=True) == ("the plan asks for 4 local epochs per round, the site's policy "
                                                   "allows at most 3")
    evaluator = PlanApproval(_policy(role="evaluate", **approved), tmp_path)
    assert evaluator.refusal(plan, training=True) == "the site's policy role is evaluate: it does not train"
    assert evaluator.refusal(plan, training=False) is None
    other_task = PlanApproval(_policy(datasets=(PolicyDataset("ms", "synthetic:2", task="ms-flair"),), **approved),
                              tmp_path)
    assert other_task.refusal(plan, training=True) == f"the site's policy names no dataset for task {TASK}"


def test_role_only_narrows_the_certificate() -> None:
    assert _policy().hello_role(SiteRole.TRAINER) is SiteRole.TRAINER
    assert _policy(role="evaluate").hello_role(SiteRole.TRAINER) is SiteRole.EVALUATOR
    assert SitePolicy(role="pull").hello_role("evaluator") is SiteRole.NODE
    with pytest.raises(ValueError, match="needs a trainer certificate; this site's certificate has role evaluator"):
        _policy().hello_role(SiteRole.EVALUATOR)
