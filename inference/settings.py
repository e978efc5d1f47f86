"""The `[node]`, `[tasks]` and `[inference]` settings sections: what the clinical node reads."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from models.settings import ae_title, checked, non_negative, positive, tcp_port


def _regex(value: str) -> str | None:
    try:
        re.compile(value)
    except re.error as error:
        return f"is not a valid regular expression ({error})"
    return None


@dataclass(frozen=True)
class NodeSettings:
    """The DICOM node and its web page."""

    ae_title: str = field(default="FEDLESION", metadata=checked(ae_title))
    dicom_port: int = field(default=11112, metadata=checked(tcp_port))
    web_host: str = "127.0.0.1"
    web_port: int = field(default=8080, metadata=checked(tcp_port))
    web_secure_cookies: bool = False  # true when TLS is terminated in front of the page (cookies get Secure)


@dataclass(frozen=True)
class TasksSettings:
    """Which tasks run and on which studies (design.md §4 task routing); a filter is a regex searched in
    StudyDescription, RequestedProcedureDescription and the calling AE title; empty matches every study."""

    stroke: bool = True
    ms: bool = True
    stroke_study_filter: str = field(default="", metadata=checked(_regex))
    ms_study_filter: str = field(default="", metadata=checked(_regex))
    notify_not_processed: bool = False  # send one SC image "AI analysis not performed: reason"


@dataclass(frozen=True)
class InferenceSettings:
    """The workers and the engine (design.md §5)."""

    workers: int = field(default=1, metadata=checked(positive))
    threads: int = field(default=0, metadata=checked(non_negative))  # ONNX Runtime intra-op threads; 0: all cores
    flip_tta: bool = False
    adc_core_threshold: float = field(default=620.0, metadata=checked(positive))  # µm²/s
    max_attempts: int = field(default=3, metadata=checked(positive))
    registry_poll_s: float = field(default=5.0, metadata=checked(positive))
