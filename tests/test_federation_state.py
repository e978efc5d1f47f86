"""The coordinator's SQLite state (training/federation/state.py): certificates, updates, versions, crash repair."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from models.manifest import Task, default_manifest
from models.package import build_package
from models.signing import generate_key_pair, load_private_key
from tests.onnx_graphs import first_channel_sigmoid
from training.calibration import DiceByThreshold
from training.federation.state import (
    INCOMING_PREFIX,
    STATE_FILE,
    CoordinatorState,
    Evaluation,
    RoundState,
    SiteState,
)

PLAN = "a" * 64
TASK = Task.STROKE_DWI_ADC


def _state(tmp_path: Path) -> CoordinatorState:
    state = CoordinatorState(tmp_path)
    for name in ("alpha", "beta"):
        state.enroll(name, "trainer", f"fp-{name}", time.time() + 3600, b"k" * 32, b"PEM " + name.encode(),
                     actor="test")
        state.seen(name, "idle")
    return state


def _package(directory: Path, version: int, round_number: int) -> Path:
    manifest = default_manifest(TASK, version, plan_sha256=PLAN, demo=False, description="", federated_round=round_number,
                                strategy="fedavg")
    return build_package(directory, first_channel_sigmoid(), manifest, load_private_key(generate_key_pair()[0]))


def test_certificates_answer_for_their_site_until_revoked_by_another_process(tmp_path: Path) -> None:
    state = _state(tmp_path)
    assert state.certificate_site("fp-alpha")[1] is None
    assert "unknown certificate" in state.certificate_site("fp-other")[1]
    assert "expired" in state.certificate_site("fp-alpha", now=time.time() + 7200)[1]
    other = CoordinatorState(tmp_path)  # `coordinator revoke` runs in its own process, on the same file
    other.revoke("beta", "laptop stolen", actor="operator")
    site, reason = state.certificate_site("fp-beta")
    assert site.state is SiteState.REVOKED and reason == "site beta is revoked: laptop stolen"
    with pytest.raises(ValueError, match="already enrolled"):
        state.enroll("alpha", "trainer", "fp-x", time.time(), b"k" * 32, b"PEM", actor="test")
    with pytest.raises(ValueError, match="revoked"):
        state.renew("beta", "fp-beta2", time.time() + 60, b"PEM", actor="operator")
    state.renew("alpha", "fp-alpha2", time.time() + 60, b"PEM alpha 2", actor="operator")
    assert state.latest_certificate("alpha") == b"PEM alpha 2"
    assert state.certificate_site("fp-alpha2")[0].name == "alpha"
    assert state.active_sites("trainer", seen_after=time.time() - 60) == ["alpha"]
    assert state.active_sites("trainer", seen_after=time.time() + 60) == []
    assert [entry["action"] for entry in state.audit_log()] == ["enroll", "enroll", "revoke", "renew"]


def test_a_second_update_from_a_site_is_refused_and_status_says_why(tmp_path: Path) -> None:
    state = _state(tmp_path)
    round_ = state.open_round(PLAN, 1, TASK, ["alpha", "beta"], "b" * 64, tmp_path / "base", time.time() + 60)
    assert state.record_update(round_.id, "alpha", accepted=True, num_cases=3, metrics={"loss": 0.5},
                               path=tmp_path / "u1") is None
    assert state.record_update(round_.id, "alpha", accepted=True, num_cases=3, path=tmp_path / "u2") == (
        "a second update from this site in this round")
    state.record_update(round_.id, "beta", accepted=False, reason="tensor w holds NaN")
    [accepted] = state.accepted_updates(round_.id)
    assert (accepted.site, accepted.num_cases, accepted.path) == ("alpha", 3, tmp_path / "u1")
    [row] = state.status()["rounds"]
    assert row["contributors"] == ["alpha"] and row["state"] == "open"
    assert row["rejected"] == [{"site": "alpha", "reason": "a second update from this site in this round"},
                               {"site": "beta", "reason": "tensor w holds NaN"}]
    assert row["metrics"] == {"alpha": {"loss": 0.5, "cases": 3}}


def test_a_crash_between_package_and_version_row_is_repaired_once(tmp_path: Path) -> None:
    state = _state(tmp_path)
    first = state.open_round(PLAN, 1, TASK, ["alpha"], "b" * 64, tmp_path / "base", time.time() + 60)
    assert state.next_version(TASK) == 1
    state.commit_candidate(TASK, 1, _package(state.versions_dir(TASK) / "1", 1, 1), round_id=first.id, actor="serve")
    second = state.open_round(PLAN, 2, TASK, ["alpha"], "c" * 64, tmp_path / "base2", time.time() + 60)
    # kill -9 after the package was renamed into place, before its row was committed ...
    _package(state.versions_dir(TASK) / "2", 2, 2)
    # ... and a half-written package of a later attempt lying beside it.
    (state.versions_dir(TASK) / f"{INCOMING_PREFIX}3").mkdir()
    assert state.next_version(TASK) == 3  # the package without its row is never reused

    restarted = CoordinatorState(tmp_path)
    done = restarted.reconcile(actor="serve")
    assert any("recorded stroke-dwi-adc 2 of round 2" in line for line in done)
    assert not (state.versions_dir(TASK) / f"{INCOMING_PREFIX}3").exists()
    assert restarted.round(PLAN, 2).state is RoundState.CLOSED and restarted.round(PLAN, 2).version == 2
    assert restarted.reconcile(actor="serve") == []  # nothing left to do: never published twice
    assert [v["version"] for v in restarted.status()["versions"]] == [1, 2]
    assert restarted.next_version(TASK) == 3
    assert second.id != first.id
    assert [e["action"] for e in restarted.audit_log()][-1] == "resume"


def test_a_package_of_a_closed_round_is_removed_not_recorded(tmp_path: Path) -> None:
    state = _state(tmp_path)
    first = state.open_round(PLAN, 1, TASK, ["alpha"], "b" * 64, tmp_path / "base", time.time() + 60)
    state.commit_candidate(TASK, 1, _package(state.versions_dir(TASK) / "1", 1, 1), round_id=first.id, actor="serve")
    stray = _package(state.versions_dir(TASK) / "2", 2, 1)  # round 1 is closed with version 1
    assert state.reconcile(actor="serve") == [f"removed {stray}: its round is not open"]
    assert not stray.exists() and state.next_version(TASK) == 2


def test_only_released_versions_are_latest(tmp_path: Path) -> None:
    state = _state(tmp_path)
    state.commit_candidate(TASK, 1, tmp_path / "p1", round_id=None, actor="operator")
    state.commit_candidate(TASK, 2, tmp_path / "p2", round_id=None, actor="operator")
    assert state.latest_released(TASK) is None
    state.mark_released(TASK, 1, actor="dr-who")
    assert state.latest_released(TASK).version == 1
    with pytest.raises(ValueError, match="not newer"):
        state.commit_candidate(TASK, 2, tmp_path / "p2", round_id=None, actor="operator")
    with pytest.raises(ValueError, match="no stroke-dwi-adc version 7"):
        state.mark_released(TASK, 7, actor="dr-who")
    assert {(v["version"], v["state"]) for v in state.status()["versions"]} == {(1, "released"), (2, "candidate")}


def test_the_state_file_holding_payload_keys_is_owner_only(tmp_path: Path) -> None:
    (tmp_path / "state.sqlite3").touch(mode=0o644)  # an existing file is tightened too
    state = _state(tmp_path)
    try:
        for path in tmp_path.glob("state.sqlite3*"):  # the database and SQLite's WAL and shared-memory files
            assert path.stat().st_mode & 0o777 == 0o600, path
        assert len(list(tmp_path.glob("state.sqlite3*"))) >= 2
    finally:
        state.close()


def test_screening_refusals_count_per_site_and_the_second_in_a_row_suspends_it_until_resumed(tmp_path: Path) -> None:
    state = _state(tmp_path)
    state.declare("alpha", 40, actor="operator")
    assert state.declared_cases() == {"alpha": 40}
    with pytest.raises(ValueError, match="integer ≥ 1"):
        state.declare("beta", 0, actor="operator")
    refused = {"beta": "its change points away"}

    def screened_round(number: int, passed: list[str]) -> list[str]:
        round_ = state.open_round(PLAN, number, TASK, ["alpha", "beta"], "b" * 64, tmp_path / "base", time.time() + 60)
        for name in ("alpha", "beta"):
            state.record_update(round_.id, name, accepted=True, num_cases=3, path=tmp_path / f"{name}{number}")
        suspended = state.record_screening(round_.id, refused, passed, actor="serve")
        state.commit_candidate(TASK, number, tmp_path / str(number), round_id=round_.id, actor="serve")
        return suspended

    assert screened_round(1, ["alpha"]) == []
    assert [u.site for u in state.accepted_updates(1)] == ["alpha"]  # beta's update no longer counts
    assert state.site("beta").state is SiteState.ACTIVE
    assert screened_round(2, ["alpha"]) == ["beta"]
    beta = state.site("beta")
    assert beta.state is SiteState.SUSPENDED and "refused 2 updates in a row" in beta.reason
    assert "coordinator resume beta" in beta.reason
    state.unpause()  # what opening a round does for policy pauses: a suspension stays
    assert state.active_sites("trainer", seen_after=0) == ["alpha"]
    status = state.status()
    assert status["rounds"][1]["rejected"] == [{"site": "beta", "reason": "screening: its change points away"}]
    assert [(s["name"], s["declared_cases"], s["refused_in_a_row"]) for s in status["sites"]] == [
        ("alpha", 40, 0), ("beta", None, 2)]
    state.resume("beta", actor="operator")
    assert state.site("beta").state is SiteState.ACTIVE and state.status()["sites"][1]["refused_in_a_row"] == 0
    with pytest.raises(ValueError, match="is active: only a suspended or paused site resumes"):
        state.resume("beta", actor="operator")
    assert screened_round(3, ["alpha"]) == []  # once again one refusal, not two in a row
    refused = {}
    screened_round(4, ["alpha", "beta"])  # an update that passes clears the count
    assert state.status()["sites"][1]["refused_in_a_row"] == 0
    actions = [(entry["action"], entry["subject"]) for entry in state.audit_log() if entry["subject"] == "beta"]
    assert actions[1:] == [("screen", "beta"), ("screen", "beta"), ("suspend", "beta"), ("resume", "beta"),
                           ("screen", "beta")]


def test_a_database_from_before_the_threshold_and_histogram_columns_gets_them_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    with sqlite3.connect(tmp_path / STATE_FILE) as old:  # the two tables as they first shipped
        old.executescript("""
            CREATE TABLE updates (id INTEGER PRIMARY KEY, round_id INTEGER NOT NULL, attempt INTEGER NOT NULL,
                site TEXT NOT NULL, accepted INTEGER NOT NULL, reason TEXT NOT NULL DEFAULT '',
                num_cases INTEGER NOT NULL DEFAULT 0, metrics TEXT NOT NULL DEFAULT '{}', path TEXT,
                received_at REAL NOT NULL);
            CREATE TABLE evaluations (round_id INTEGER NOT NULL, site TEXT NOT NULL, num_cases INTEGER NOT NULL,
                metrics TEXT NOT NULL, received_at REAL NOT NULL, PRIMARY KEY (round_id, site));
            INSERT INTO updates (round_id, attempt, site, accepted, num_cases, path, received_at)
                VALUES (1, 1, 'alpha', 1, 3, '/u', 0);
            INSERT INTO evaluations VALUES (1, 'judge', 7, '{"val_dice": 0.5}', 0);
        """)
    old.close()
    state = _state(tmp_path)
    state.open_round(PLAN, 1, TASK, ["alpha", "beta"], "b" * 64, tmp_path / "base", time.time() + 60)
    curve = DiceByThreshold((0.3, 0.5), (0.4, 0.6), 5)
    state.record_update(1, "beta", accepted=True, num_cases=2, path=tmp_path / "u2", threshold_dice=curve)
    assert [(u.site, u.threshold_dice) for u in state.accepted_updates(1)] == [("alpha", None), ("beta", curve)]
    assert state.evaluations(1) == [Evaluation("judge", 7, {"val_dice": 0.5}, {})]
    CoordinatorState(tmp_path).close()  # a second process opening it finds the columns there
