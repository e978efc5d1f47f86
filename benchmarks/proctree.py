"""Memory of a process tree: the summed PSS of a process and every process it started (Linux /proc).

PSS (proportional set size) divides each shared page among the processes that map it, so the sum over a tree is
what the tree costs the machine: RSS would count the shared libraries and models of spawned receivers once per
process. `PeakSampler` polls the tree in a thread, because a receiver or worker process may come and go between two
looks and VmHWM covers one process only.

    with PeakSampler(node.pid) as sampler:
        ...
    print(f"node peak RSS {sampler.peak_kib / 1024:.0f} MiB")
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType

PROC = Path("/proc")


def descendants(root: int) -> list[int]:
    """`root` and every live process below it (children from /proc/PID/task/*/children, breadth first)."""
    found, queue = [], [root]
    while queue:
        pid = queue.pop(0)
        found.append(pid)
        for task in (PROC / str(pid) / "task").glob("*/children"):
            try:
                queue += [int(child) for child in task.read_text().split()]
            except OSError:  # the task ended between the glob and the read
                continue
    return found


def pss_kib(pid: int) -> int:
    """One process's PSS in KiB (0 when it has ended or cannot be read)."""
    try:
        rollup = (PROC / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")), 0)


def tree_pss_kib(root: int) -> int:
    """The summed PSS of `root` and its descendants, in KiB."""
    return sum(pss_kib(pid) for pid in descendants(root))


class PeakSampler:
    """Polls `tree_pss_kib(root)` every `interval_s` in a daemon thread and keeps the largest value seen."""

    def __init__(self, root: int, interval_s: float = 0.2) -> None:
        self.root = root
        self.interval_s = interval_s
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="pss-sampler", daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, tree_pss_kib(self.root))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
