"""The inactivity timeout with the real receiver: a push that pauses mid-series is one study, not two (design.md §10).

storescu sends half of the DWI series, pauses for less than the timeout, sends the rest with the ADC series; the
study completes once, one timeout after the last instance, and its single study_ready row holds every instance.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
from pathlib import Path

from dicom_gateway.studies import SPOOL_DIRNAME
from dicom_gateway.uids import spool_name
from tests.dicom_support import dcmtk_env
from tests.test_receiver_crash import RECEIVER_AE, SENDER_AE, Receiver, start_receiver
from tests.test_studies import write_small_study

TIMEOUT_S = 2.0
PAUSE_S = 0.6  # the gap between the two sends stays well under TIMEOUT_S, storescu's start-up included
STUDY_UID = "1.2.826.0.1.3680043.10.543.4.77"


def storescu(port: int, files: list[Path]) -> None:
    subprocess.run(
        ["storescu", "-aet", SENDER_AE, "-aec", RECEIVER_AE, "127.0.0.1", str(port), *map(str, files)],
        env=dcmtk_env(), check=True, capture_output=True, timeout=60,
    )


def studies(receiver: Receiver) -> list[tuple[str, str, int, int]]:
    with sqlite3.connect(receiver.db_path, timeout=5) as conn:
        return conn.execute("SELECT study_uid, state, revision, instance_count FROM studies").fetchall()


def ready_rows(receiver: Receiver) -> list[tuple[int, str, float]]:
    with sqlite3.connect(receiver.db_path, timeout=5) as conn:
        return conn.execute("SELECT revision, spool_dir, created_at FROM study_ready ORDER BY id").fetchall()


def test_a_pause_shorter_than_the_timeout_gives_one_study(tmp_path: Path) -> None:
    files = write_small_study(tmp_path / "study", study_uid=STUDY_UID, slices=8, negatives=False)
    dwi, adc = files["4_dwi"], files["5_adc"]
    receiver = start_receiver(tmp_path / "data", tmp_path / "receiver.log", inactivity_timeout_s=TIMEOUT_S)
    try:
        storescu(receiver.port, dwi[: len(dwi) // 2])
        first_done = time.monotonic()
        time.sleep(PAUSE_S)
        assert studies(receiver) == [(STUDY_UID, "receiving", 0, len(dwi) // 2)]
        storescu(receiver.port, dwi[len(dwi) // 2 :] + adc)
        last_sent, gap = time.time(), time.monotonic() - first_done
        assert gap < TIMEOUT_S, f"the second send ended {gap:.2f} s after the first: the pause was not shorter"

        deadline = time.monotonic() + TIMEOUT_S + 15.0
        while not ready_rows(receiver) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(TIMEOUT_S / 2)  # a second completion would show up here
        rows = ready_rows(receiver)
    finally:
        receiver.stop()

    assert studies(receiver) == [(STUDY_UID, "complete", 1, len(dwi) + len(adc))]
    [(revision, spool_dir, created_at)] = rows
    assert revision == 1 and Path(spool_dir) == tmp_path / "data" / SPOOL_DIRNAME / spool_name(STUDY_UID)
    assert created_at - last_sent >= TIMEOUT_S - 0.5, "completed before a full timeout had passed"
