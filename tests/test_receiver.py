"""The receiver's SCP processes share one listening socket: associations spread evenly over them, and an ended one
(released, aborted) stops counting, so a PACS's parallel associations use every core the node was given."""

from __future__ import annotations

import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_gateway.receiver import Receiver
from dicom_gateway.settings import DicomSettings

NODE_AE = "FEDLESION"


def loads_once_total(receiver: Receiver, total: int, timeout_s: float = 10.0) -> list[int]:
    """Open associations per process once they add up to `total` (a process counts an ended one out within 50 ms)."""
    deadline = time.monotonic() + timeout_s
    while sum(loads := receiver.association_loads()) != total and time.monotonic() < deadline:
        time.sleep(0.05)
    return loads


def test_parallel_associations_spread_evenly_over_the_receiver_processes(tmp_path: Path) -> None:
    receiver = Receiver(tmp_path / "data", NODE_AE, DicomSettings(receiver_processes=2, min_free_disk_bytes=0))
    receiver.recover()
    port = receiver.start(0)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    held = []
    try:
        assert receiver.association_loads() == [0, 0]
        for count in range(1, 5):
            assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
            assert assoc.is_established
            held.append(assoc)
            loads = loads_once_total(receiver, count)
            assert sum(loads) == count and max(loads) - min(loads) <= 1, f"{loads}: a busier process took it"
        assert receiver.association_loads() == [2, 2]
        held[0].release()
        held[1].abort()
        assert sum(loads_once_total(receiver, 2)) == 2
        for assoc in held[2:]:
            assoc.release()
        assert loads_once_total(receiver, 0) == [0, 0]
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.abort()
        receiver.close()
