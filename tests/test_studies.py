"""The studies table on real SQLite, with real synthetic DICOM files in a spool laid out as the SCP lays it out."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicom_gateway.records import StoredInstance
from dicom_gateway.role_decisions import StudyRoles
from dicom_gateway.roles import classify_study
from dicom_gateway.settings import DicomSettings
from dicom_gateway.studies import (
    DATABASE_NAME,
    SPOOL_DIRNAME,
    CompletionOutcome,
    CompletionTrigger,
    StudyIndex,
    StudyState,
)
from dicom_gateway.uids import spool_name
from fedlesion.cli import main
from tests.conftest import REPO_ROOT
from training.synthetic.case import SyntheticCase
from training.synthetic.dicom_writer import write_dicom_study

STUDY_UID = "1.2.826.0.1.3680043.10.543.4.1"


def small_case(slices: int = 6, size: int = 12, seed: int = 0) -> SyntheticCase:
    """A tiny synthetic stroke case whose DICOM headers are those of the full-size one (fast to write and read)."""
    shape = (size, size, slices)
    head = np.random.default_rng(seed).uniform(0.5, 1.0, shape).astype(np.float32)
    images = {"dwi_b0": head, "dwi_b1000": 0.5 * head, "adc": 700.0 + 200.0 * head, "flair": head}
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    labels = np.zeros(shape, np.int16)
    return SyntheticCase(f"small-{seed}", "stroke", seed, "axial", affine, images, labels, [])


def write_small_study(
    out_dir: Path, *, study_uid: str = STUDY_UID, slices: int = 6, size: int = 12, negatives: bool = True
) -> dict[str, list[Path]]:
    """The study's files by series folder name: 2_flair, 4_dwi (b0 + b1000), 5_adc; negatives add 3_t1_flair,
    6_eadc and 10_flair_post, series no role should use."""
    by_series: dict[str, list[Path]] = {}
    for path in write_dicom_study(small_case(slices, size), out_dir, negatives=negatives, study_uid=study_uid):
        by_series.setdefault(path.parent.name, []).append(path)
    return by_series


def spool(paths: list[Path], spool_root: Path, calling_ae: str = "PACS", announced: int | None = None):
    """Copy files into the SCP's layout (spool/<hash study>/<hash SOP>.dcm) and describe them as the SCP would."""
    stored = []
    for path in paths:
        ds = dcmread(path)
        target = spool_root / spool_name(ds.StudyInstanceUID) / f"{spool_name(ds.SOPInstanceUID)}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        if announced is None:
            shutil.copyfile(path, target)
        else:
            ds.NumberOfStudyRelatedInstances = announced
            ds.save_as(target)
        stored.append(
            StoredInstance(
                sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                study_instance_uid=ds.StudyInstanceUID,
                series_instance_uid=ds.SeriesInstanceUID,
                path=target,
                calling_ae=calling_ae,
                size_bytes=target.stat().st_size,
                received_at=time.time(),
                announced_study_instances=announced,
            )
        )
    return stored


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def study_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    return write_small_study(tmp_path_factory.mktemp("study"))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_index(data_dir: Path, clock: FakeClock):
    def make(**dicom: object) -> StudyIndex:
        settings = DicomSettings(**{"inactivity_timeout_s": 10.0, **dicom})
        return StudyIndex(data_dir / DATABASE_NAME, data_dir / SPOOL_DIRNAME, settings, clock=clock)

    return make


def ready_count(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / DATABASE_NAME) as conn:
        return conn.execute("SELECT COUNT(*) FROM study_ready").fetchone()[0]


def state_of(index: StudyIndex, study_uid: str = STUDY_UID) -> str:
    return next(study.state for study in index.list_studies() if study.study_uid == study_uid)


def stroke_series(files: dict[str, list[Path]]) -> list[Path]:
    return files["4_dwi"] + files["5_adc"]


# --- completion triggers ---------------------------------------------------------------------------------------


def test_explicit_completion_inserts_one_row_with_roles(make_index, data_dir, study_files) -> None:
    index = make_index()
    index.instances_stored(spool(stroke_series(study_files), data_dir / SPOOL_DIRNAME))
    assert state_of(index) == StudyState.RECEIVING and ready_count(data_dir) == 0

    first = index.complete(STUDY_UID)
    again = index.complete(STUDY_UID)

    assert (first.outcome, first.revision) == (CompletionOutcome.NEW_REVISION, 1)
    assert (again.outcome, again.revision, again.ready_id) == (CompletionOutcome.NOT_RECEIVING, 1, None)
    [row] = index.ready_rows()
    assert (row.id, row.study_uid, row.revision, row.trigger) == (first.ready_id, STUDY_UID, 1, "explicit")
    assert row.spool_dir == data_dir / SPOOL_DIRNAME / spool_name(STUDY_UID)
    assert row.error is None
    assert StudyRoles.from_json(row.roles_json).dwi.series_uid == series_uid(study_files["4_dwi"])
    assert (row.roles["dwi"]["series_uid"], row.roles["adc"]["series_uid"]) == (
        series_uid(study_files["4_dwi"]),
        series_uid(study_files["5_adc"]),
    )
    assert usable_series(index) == {series_uid(study_files["4_dwi"]): 12, series_uid(study_files["5_adc"]): 6}
    assert state_of(index) == StudyState.COMPLETE


def series_uid(files: list[Path]) -> str:
    return dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID


def usable_series(index: StudyIndex) -> dict[str, int]:
    """The latest revision's usable series → instance count (the fingerprint that decides a new revision)."""
    with sqlite3.connect(index.db_path) as conn:
        fingerprint = json.loads(conn.execute("SELECT usable_series FROM studies").fetchone()[0])
    return {key.split("/")[0]: count for key, count in fingerprint["usable"].items()}


def test_complete_on_release_only_for_listed_calling_aes(make_index, data_dir, study_files) -> None:
    index = make_index(complete_on_release=("MODALITY",))
    index.instances_stored(spool(stroke_series(study_files), data_dir / SPOOL_DIRNAME, calling_ae="PACS"))
    index.association_released("PACS", {STUDY_UID})
    assert index.run_once() == [] and ready_count(data_dir) == 0

    index.association_released("MODALITY", {STUDY_UID})
    [done] = index.run_once()
    assert (done.outcome, done.revision) == (CompletionOutcome.NEW_REVISION, 1)
    assert index.ready_rows()[0].trigger == CompletionTrigger.RELEASE


def test_announced_count_completes_when_reached(make_index, data_dir, study_files) -> None:
    index = make_index()
    files = stroke_series(study_files)
    stored = spool(files, data_dir / SPOOL_DIRNAME, announced=len(files))
    index.instances_stored(stored[:-1])
    assert index.run_once() == []
    index.instances_stored(stored[-1:])
    [done] = index.run_once()
    assert (done.outcome, done.revision) == (CompletionOutcome.NEW_REVISION, 1)
    assert index.ready_rows()[0].trigger == CompletionTrigger.ANNOUNCED


def test_inactivity_completes_after_the_timeout_only(make_index, data_dir, study_files, clock) -> None:
    index = make_index(inactivity_timeout_s=10.0)
    stored = spool(stroke_series(study_files), data_dir / SPOOL_DIRNAME)
    index.instances_stored(stored[:5])
    clock.now += 9.0
    index.instances_stored(stored[5:])  # activity restarts the clock
    clock.now += 9.0
    assert index.run_once() == [] and ready_count(data_dir) == 0
    index.instances_stored(stored[:1])  # a repeated instance of a receiving study is activity too
    clock.now += 9.0
    assert index.run_once() == []
    clock.now += 1.0
    [done] = index.run_once()
    assert (done.outcome, done.revision) == (CompletionOutcome.NEW_REVISION, 1)
    assert index.ready_rows()[0].trigger == CompletionTrigger.INACTIVITY
    clock.now += 100.0
    assert index.run_once() == []


def test_unknown_and_invalid_study_uids_are_refused(make_index) -> None:
    index = make_index()
    with pytest.raises(ValueError, match="unknown study"):
        index.complete("1.2.3.4")
    with pytest.raises(ValueError, match="not a valid"):
        index.complete("1.2.3/../4")


# --- revisions -------------------------------------------------------------------------------------------------


def test_identical_repush_creates_nothing(make_index, data_dir, study_files, clock) -> None:
    index = make_index()
    stored = spool(stroke_series(study_files), data_dir / SPOOL_DIRNAME)
    index.instances_stored(stored)
    index.instances_stored(stored[:3])  # duplicates inside one push
    index.complete(STUDY_UID)
    index.mark_handed_off(STUDY_UID, 1)

    clock.now += 60.0
    index.instances_stored(stored)
    index.association_released("PACS", {STUDY_UID})
    clock.now += 60.0
    index.run_once()

    [study] = index.list_studies()
    assert (study.state, study.revision, study.instance_count) == (StudyState.HANDED_OFF, 1, len(stored))
    assert ready_count(data_dir) == 1


def test_new_usable_series_creates_revision_2(make_index, data_dir, study_files) -> None:
    index = make_index()
    root = data_dir / SPOOL_DIRNAME
    index.instances_stored(spool(stroke_series(study_files), root))
    index.complete(STUDY_UID)
    index.mark_handed_off(STUDY_UID, 1)

    index.instances_stored(spool(study_files["2_flair"], root))  # FLAIR arrives late: a usable series
    assert state_of(index) == StudyState.RECEIVING
    done = index.complete(STUDY_UID)

    assert (done.outcome, done.revision) == (CompletionOutcome.NEW_REVISION, 2)
    assert [(row.revision, row.handed_off_at is None) for row in index.ready_rows()] == [(1, False), (2, True)]
    assert [row.revision for row in index.ready_rows(pending_only=True)] == [2]
    assert state_of(index) == StudyState.COMPLETE
    assert set(usable_series(index)) == {series_uid(study_files[name]) for name in ("2_flair", "4_dwi", "5_adc")}
    assert index.ready_rows()[1].roles["flair"]["series_uid"] == series_uid(study_files["2_flair"])


def test_more_instances_of_a_used_series_create_a_revision(make_index, data_dir, study_files) -> None:
    index = make_index()
    root = data_dir / SPOOL_DIRNAME
    dwi = spool(study_files["4_dwi"], root)
    index.instances_stored(dwi[:-2] + spool(study_files["5_adc"], root))
    index.complete(STUDY_UID)
    index.instances_stored(dwi[-2:])
    assert index.complete(STUDY_UID).revision == 2


def test_new_unused_series_creates_no_revision(make_index, data_dir, study_files) -> None:
    index = make_index()
    root = data_dir / SPOOL_DIRNAME
    index.instances_stored(spool(stroke_series(study_files), root))
    index.complete(STUDY_UID)
    index.mark_handed_off(STUDY_UID, 1)

    negatives = study_files["3_t1_flair"] + study_files["6_eadc"] + study_files["10_flair_post"]
    index.instances_stored(spool(negatives, root))
    assert state_of(index) == StudyState.RECEIVING
    done = index.complete(STUDY_UID)

    assert (done.outcome, done.revision) == (CompletionOutcome.UNCHANGED, 1)
    assert state_of(index) == StudyState.HANDED_OFF  # back to where it was, not "complete" again
    assert ready_count(data_dir) == 1


def test_failed_roles_still_get_a_row_with_the_reason(data_dir, study_files, clock) -> None:
    def broken(paths: list[Path]) -> dict:
        raise RuntimeError(f"cannot read {len(paths)} files")

    index = StudyIndex(data_dir / DATABASE_NAME, data_dir / SPOOL_DIRNAME, DicomSettings(), broken, clock)
    index.instances_stored(spool(stroke_series(study_files), data_dir / SPOOL_DIRNAME))
    assert index.complete(STUDY_UID).outcome == CompletionOutcome.NEW_REVISION
    [row] = index.ready_rows()
    assert row.error == f"series roles could not be determined: RuntimeError: cannot read {2 * 6 + 6} files"


def test_reopened_study_handed_off_meanwhile_settles_handed_off(make_index, data_dir, study_files) -> None:
    index = make_index()
    root = data_dir / SPOOL_DIRNAME
    index.instances_stored(spool(stroke_series(study_files), root))
    index.complete(STUDY_UID)
    index.instances_stored(spool(study_files["3_t1_flair"], root))  # reopens before the queue took revision 1
    assert index.mark_handed_off(STUDY_UID, 1) and not index.mark_handed_off(STUDY_UID, 2)
    assert index.complete(STUDY_UID).outcome == CompletionOutcome.UNCHANGED
    assert state_of(index) == StudyState.HANDED_OFF


# --- recovery --------------------------------------------------------------------------------------------------


def test_recover_records_spooled_files_missing_from_the_table(make_index, data_dir, study_files, clock) -> None:
    root = data_dir / SPOOL_DIRNAME
    stored = spool(stroke_series(study_files), root)
    index = make_index()
    index.instances_stored(stored[:4])  # the rest were fsynced and acknowledged, then the process died
    (root / spool_name(STUDY_UID) / ".incoming-123-1").write_bytes(b"half a file")  # never acknowledged
    (root / spool_name(STUDY_UID) / "garbage.dcm").write_bytes(b"not DICOM")
    crashed_at = clock.now
    clock.now += 3600.0

    index = make_index()
    report = index.recover()

    assert (report.files_seen, report.recovered, report.receiving) == (len(stored) + 1, len(stored) - 4, 1)
    assert report.unreadable == [root / spool_name(STUDY_UID) / "garbage.dcm"]
    [study] = index.list_studies()
    assert (study.state, study.instance_count, study.first_activity) == ("receiving", len(stored), crashed_at)
    assert study.last_activity == clock.now  # the inactivity clock restarts: not completed at once
    assert index.run_once() == []
    clock.now += 10.0
    [done] = index.run_once()
    assert done.revision == 1 and len(index.study_files(STUDY_UID)) == len(stored)

    again = make_index().recover()
    assert (again.recovered, again.receiving) == (0, 0)
    assert ready_count(data_dir) == 1


def test_recover_completes_studies_whose_announced_count_was_reached(make_index, data_dir, study_files) -> None:
    files = stroke_series(study_files)
    spool(files, data_dir / SPOOL_DIRNAME, announced=len(files))  # all acknowledged, none reached the table
    index = make_index()
    assert index.recover().recovered == len(files)
    [done] = index.run_once()
    assert (done.outcome, done.revision) == (CompletionOutcome.NEW_REVISION, 1)
    assert index.ready_rows()[0].trigger == CompletionTrigger.ANNOUNCED


# --- concurrency -----------------------------------------------------------------------------------------------


def test_racing_completers_insert_one_row(data_dir, study_files) -> None:
    settings = DicomSettings(inactivity_timeout_s=0.05)
    index = StudyIndex(data_dir / DATABASE_NAME, data_dir / SPOOL_DIRNAME, settings)
    index.instances_stored(spool(stroke_series(study_files), data_dir / SPOOL_DIRNAME))
    others = [StudyIndex(data_dir / DATABASE_NAME, data_dir / SPOOL_DIRNAME, settings) for _ in range(4)]
    barrier = threading.Barrier(len(others))
    outcomes: list[CompletionOutcome] = []

    def complete(other: StudyIndex) -> None:
        barrier.wait()
        outcomes.append(other.complete(STUDY_UID).outcome)

    index.start()
    try:
        threads = [threading.Thread(target=complete, args=(other,)) for other in others]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        time.sleep(0.2)
    finally:
        index.stop()
    assert outcomes.count(CompletionOutcome.NEW_REVISION) <= 1
    assert ready_count(data_dir) == 1 and state_of(index) == StudyState.COMPLETE


def test_recording_while_the_monitor_completes_gives_one_row(data_dir, study_files) -> None:
    """Repeated pushes and unused series arrive while the monitor completes on inactivity: still one row."""
    settings = DicomSettings(inactivity_timeout_s=0.05)
    root = data_dir / SPOOL_DIRNAME
    index = StudyIndex(data_dir / DATABASE_NAME, root, settings)
    stroke = spool(stroke_series(study_files), root)
    unused = spool(study_files["3_t1_flair"] + study_files["6_eadc"], root)
    index.instances_stored(stroke)
    index.start()

    def push(batches: list[list[StoredInstance]]) -> None:
        for batch in batches:
            index.instances_stored(batch)
            time.sleep(0.01)

    try:
        threads = [
            threading.Thread(target=push, args=([stroke[i : i + 3] for i in range(0, len(stroke), 3)] * 3,)),
            threading.Thread(target=push, args=([unused[i : i + 2] for i in range(0, len(unused), 2)],)),
            threading.Thread(target=push, args=([[item] for item in reversed(stroke)],)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        deadline = time.monotonic() + 10.0
        while state_of(index) == StudyState.RECEIVING and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        index.stop()
    [study] = index.list_studies()
    assert (study.state, study.revision, study.instance_count) == ("complete", 1, len(stroke) + len(unused))
    assert ready_count(data_dir) == 1


def test_an_instance_arriving_while_roles_are_computed_is_not_lost(data_dir, study_files) -> None:
    computing, go_on = threading.Event(), threading.Event()
    counts: list[int] = []

    def slow_roles(paths: list[Path]) -> object:
        counts.append(len(paths))
        if len(counts) == 1:
            computing.set()
            go_on.wait(10)
        return classify_study(paths)

    root = data_dir / SPOOL_DIRNAME
    index = StudyIndex(data_dir / DATABASE_NAME, root, DicomSettings(), slow_roles)
    dwi, adc = spool(study_files["4_dwi"], root), spool(study_files["5_adc"], root)
    index.instances_stored(dwi[:-1] + adc)
    results = []
    completer = threading.Thread(target=lambda: results.append(index.complete(STUDY_UID)))
    completer.start()
    assert computing.wait(10)
    index.instances_stored(dwi[-1:])  # the last DWI slice lands during the computation
    go_on.set()
    completer.join(10)

    assert counts == [len(dwi) + len(adc) - 1, len(dwi) + len(adc)]  # recomputed with the late instance
    assert (results[0].outcome, results[0].revision) == (CompletionOutcome.NEW_REVISION, 1)
    assert usable_series(index)[dwi[0].series_instance_uid] == len(dwi)


def test_one_row_per_revision_is_a_constraint(make_index, data_dir, study_files) -> None:
    index = make_index()
    index.instances_stored(spool(stroke_series(study_files), data_dir / SPOOL_DIRNAME))
    index.complete(STUDY_UID)
    with sqlite3.connect(data_dir / DATABASE_NAME) as conn, pytest.raises(sqlite3.IntegrityError):
        conn.execute(
            "INSERT INTO study_ready (study_uid, revision, spool_dir, roles_json, trigger, created_at)"
            " VALUES (?, 1, '', '{}', 'explicit', 0)",
            (STUDY_UID,),
        )
    with sqlite3.connect(data_dir / DATABASE_NAME) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# --- retention -------------------------------------------------------------------------------------------------


def test_purge_spool_after_the_retention_time(make_index, data_dir, study_files, clock) -> None:
    root = data_dir / SPOOL_DIRNAME
    index = make_index(spool_retention_days=1.0)
    index.instances_stored(spool(stroke_series(study_files), root))
    index.complete(STUDY_UID)
    other_uid = "1.2.826.0.1.3680043.10.543.4.2"
    other_files = write_small_study(data_dir.parent / "other", study_uid=other_uid, slices=2)
    index.instances_stored(spool(other_files["4_dwi"], root))  # still receiving: never purged
    assert index.purge_spool() == []  # complete but not handed off yet
    index.mark_handed_off(STUDY_UID, 1)
    clock.now += 86400.0 - 1.0
    assert index.mark_handed_off(STUDY_UID, 1)  # repeated: the retention still counts from the first hand-off
    assert index.purge_spool() == []

    clock.now += 1.0
    assert index.purge_spool() == [STUDY_UID]

    assert not (root / spool_name(STUDY_UID)).exists()
    assert (root / spool_name(other_uid)).is_dir()
    assert index.study_files(STUDY_UID) == []
    [study] = [s for s in index.list_studies() if s.study_uid == STUDY_UID]
    assert (study.state, study.instance_count, study.purged_at) == ("handed-off", 0, clock.now)
    assert index.purge_spool(older_than_s=0) == []
    assert make_index().recover().recovered == 0

    # Files back in the spool after the purge (a re-push, or a crash before the unlinks): no new revision, and
    # the study is purged again.
    stroke = spool(stroke_series(study_files), root)
    assert make_index().recover().recovered == len(stroke)
    assert index.complete(STUDY_UID).outcome == CompletionOutcome.UNCHANGED
    assert state_of(index) == StudyState.HANDED_OFF and ready_count(data_dir) == 1
    assert index.purge_spool() == [STUDY_UID]
    assert not (root / spool_name(STUDY_UID)).exists()


# --- CLI -------------------------------------------------------------------------------------------------------


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> dict[str, str]:
    monkeypatch.delenv("FEDLESION_CONFIG", raising=False)
    monkeypatch.setenv("FEDLESION_STORAGE__DATA_DIR", str(data_dir))
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def test_cli_complete_and_list(cli_env, data_dir, study_files, capsys: pytest.CaptureFixture[str]) -> None:
    index = StudyIndex(data_dir / DATABASE_NAME, data_dir / SPOOL_DIRNAME, DicomSettings())
    index.instances_stored(spool(stroke_series(study_files), data_dir / SPOOL_DIRNAME))
    capsys.readouterr()

    assert main(["study", "list", "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert (listed["study_uid"], listed["state"], listed["revision"]) == (STUDY_UID, "receiving", 0)

    index.start()  # the running receiver's monitor; the CLI below is a second process on the same database
    try:
        result = subprocess.run(
            [sys.executable, "-m", "fedlesion", "study", "complete", STUDY_UID],
            env=cli_env, capture_output=True, text=True, check=False, timeout=60,
        )
    finally:
        index.stop()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"study {STUDY_UID}: revision 1 is ready"
    assert main(["study", "complete", STUDY_UID]) == 0
    assert capsys.readouterr().out.strip() == f"study {STUDY_UID}: already complete at revision 1"
    [row] = index.ready_rows()
    assert row.trigger == "explicit" and row.roles["dwi"]["series_uid"] == series_uid(study_files["4_dwi"])

    assert main(["study", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["STUDY", "INSTANCE", "UID"]
    assert lines[1].split()[:4] == [STUDY_UID, "complete", "1", str(len(stroke_series(study_files)))]


@pytest.mark.parametrize(
    ("uid", "message"),
    [("1.2.3.999", "unknown study 1.2.3.999"), ("1.2.3/../x", "not a valid Study Instance UID")],
)
def test_cli_complete_refuses_bad_uids_in_one_line(
    cli_env, data_dir, study_files, capsys: pytest.CaptureFixture[str], uid: str, message: str
) -> None:
    assert main(["study", "complete", uid]) == 2  # no database yet
    StudyIndex(data_dir / DATABASE_NAME, data_dir / SPOOL_DIRNAME, DicomSettings())
    assert main(["study", "complete", uid]) == 2
    for err in capsys.readouterr().err.splitlines():
        assert err.startswith("fedlesion: error: ") and message in err


def test_cli_list_without_a_database_is_empty(cli_env, data_dir, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["study", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert not data_dir.exists()
