"""The `[dicom]` settings section: the SCP's policy, the receiver processes and the SCU's destinations."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from models.settings import ae_title, ae_titles, checked, non_negative, positive, tcp_port

_DESTINATION = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>[0-9]{1,5})$")


def _destinations(values: tuple[str, ...]) -> str | None:
    for value in values:
        match = _DESTINATION.match(value)
        if not match or ae_title(match["ae"]) or tcp_port(int(match["port"])):
            return f"holds {value!r}; each destination is written AE_TITLE@host:port"
    return None


@dataclass(frozen=True)
class Destination:
    """A DICOM peer the node sends its outputs to."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, value: str) -> Destination:
        """`AE_TITLE@host:port`, as written in `dicom.destinations`."""
        match = _DESTINATION.match(value)
        if not match:
            raise ValueError(f"destination {value!r} is not written AE_TITLE@host:port")
        return cls(match["ae"], match["host"], int(match["port"]))


@dataclass(frozen=True)
class DicomSettings:
    """The SCP's policy and the SCU's destinations (design.md §4); sizes in bytes, times in seconds."""

    allowed_calling_aes: tuple[str, ...] = field(default=(), metadata=checked(ae_titles))  # empty: any
    complete_on_release: tuple[str, ...] = field(default=(), metadata=checked(ae_titles))
    max_associations: int = field(default=8, metadata=checked(positive))
    # SCP processes sharing the port, the least busy taking each association. 2: pynetdicom spends ~2.5 ms of Python
    # per instance under one GIL, so one process saturates a core; on the 2-core machine benchmarks/ingest.py measured
    # 1 below 2 and 4 no better than 2 (each process costs ~53 MiB): 0.27-0.44x storescp with 1, 0.61-0.65x with 2
    # (0.35-0.64x before the processes shared the associations evenly), 0.49x with 4 (README).
    receiver_processes: int = field(default=2, metadata=checked(positive))
    max_instance_bytes: int = field(default=1 << 30, metadata=checked(positive))
    max_frame_pixels: int = field(default=4096 * 4096, metadata=checked(positive))
    max_frames: int = field(default=5000, metadata=checked(positive))
    max_series_decoded_bytes: int = field(default=2 << 30, metadata=checked(positive))
    min_free_disk_bytes: int = field(default=2 << 30, metadata=checked(non_negative))
    inactivity_timeout_s: float = field(default=10.0, metadata=checked(positive))
    destinations: tuple[str, ...] = field(default=(), metadata=checked(_destinations))
    send_attempts: int = field(default=5, metadata=checked(positive))
    send_backoff_s: float = field(default=2.0, metadata=checked(non_negative))
    spool_retention_days: float = field(default=7.0, metadata=checked(positive))
    output_retention_days: float = field(default=30.0, metadata=checked(positive))

    @property
    def parsed_destinations(self) -> tuple[Destination, ...]:
        return tuple(Destination.parse(value) for value in self.destinations)
