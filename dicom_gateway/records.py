"""What the SCP hands on after an instance is safely on disk, and who it hands it to.

The SCP (scp.py) knows nothing about studies; the studies table (studies.py) knows nothing about networking.
This protocol is the seam between them, so each side is tested on its own and `receiver.py` joins them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class StoredInstance:
    """One instance written and fsynced to the spool; UIDs are validated before this exists."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    path: Path
    calling_ae: str
    size_bytes: int
    received_at: float  # time.time() when it became durable
    announced_study_instances: int | None = None  # (0020,1208) NumberOfStudyRelatedInstances, when sent


class InstanceSink(Protocol):
    """Receives the SCP's durable instances; implemented by the studies table."""

    def instances_stored(self, instances: list[StoredInstance]) -> None:
        """Called after the instances are durable and before their Success is sent (one call per group commit).

        Duplicates (a SOP Instance UID already stored) are passed too; the sink treats them as idempotent.
        """

    def association_released(self, calling_ae: str, study_uids: set[str]) -> None:
        """An association ended normally (A-RELEASE) after storing instances of `study_uids`."""
