"""pynetdicom's acceptor association, woken by data instead of polling: the SCP's per-instance kernel and GIL cost.

pynetdicom runs two threads per association that poll: the DUL reactor sleeps 1 ms (0.5 ms as we set it) whenever
its event queue is empty, and the association reactor sleeps 1 ms on every loop before it looks for a DIMSE message.
With four associations that is about 12,000 wake-ups a second, each taking the GIL from the thread that stores an
instance: `perf stat` counted 68 context switches and 186 system calls per XA30 instance in one receiver process.
Here the same reactors (pynetdicom's own loops, unchanged) wait on what they poll for:

- the DUL thread waits in `select` on its socket and on a wake-up socket pair that every primitive queued for it
  (a C-STORE response, a release, an abort) and every stop request writes to;
- the association thread waits on an event that the DIMSE message queue and the DUL's queue for the user set.

Both still wake every `IDLE_WAIT_S` to check their timers (ARTIM, network timeout) and kill flags. The hooks are the
two waits pynetdicom's loops already make, `time.sleep(dul._run_loop_delay)` and `assoc._reactor_checkpoint.wait()`;
tests/test_scp.py checks that an idle association's threads really sleep. Socket reads take a whole PDU at once
(pynetdicom reads 4 kB per `recv`: about 45 system calls per instance), growing the buffer only as data arrives,
so a peer that announces a huge PDU cannot make us allocate it.
"""

from __future__ import annotations

import queue
import select
import socket
import ssl
import threading
from typing import Any

from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket, RequestHandler

IDLE_WAIT_S = 0.05  # how often an idle association's threads check pynetdicom's timers and kill flags
_RECV_BLOCK_BYTES = 1 << 20  # the buffer grows by at most this much ahead of the data received


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls `wake` after each put, so its consumer can wait on something other than the queue."""

    def __init__(self, wake: Any) -> None:
        super().__init__()
        self._wake = wake

    def _put(self, item: Any) -> None:
        super()._put(item)
        self._wake()


class _WholePduSocket(AssociationSocket):
    def recv(self, nr_bytes: int) -> bytearray:
        """`nr_bytes` read with as few system calls as the kernel allows; fewer when the peer closes first."""
        assert self.socket is not None
        buffer = bytearray(min(nr_bytes, _RECV_BLOCK_BYTES))
        received = 0
        while received < nr_bytes:
            if received == len(buffer):
                buffer.extend(bytes(min(nr_bytes - received, _RECV_BLOCK_BYTES)))
            count = self.socket.recv_into(memoryview(buffer)[received:])
            if not count:
                break
            received += count
        del buffer[received:]
        return buffer


class _WakingDUL(DULServiceProvider):
    """The DUL reactor, waiting in `select` where pynetdicom sleeps `_run_loop_delay`."""

    def __init__(self, assoc: Association) -> None:
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        super().__init__(assoc)
        self.to_provider_queue = _WakingQueue(self.wake)

    def wake(self) -> None:
        """Cut the reactor's current wait short (it then looks at its queues, socket, timers and kill flag)."""
        try:
            self._wake_writer.send(b"\0")
        except (BlockingIOError, OSError):  # the pipe is full (a wake-up is pending anyway) or closed
            pass

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def run(self) -> None:
        try:
            super().run()
        finally:
            self._wake_reader.close()
            self._wake_writer.close()

    @property  # type: ignore[override]
    def _run_loop_delay(self) -> float:
        """Read by pynetdicom right before it sleeps that long. On the reactor's own thread: wait here for data,
        a queued primitive or a stop, then sleep 0. On another thread (`stop_dul` waiting for the reactor to end):
        wake the reactor and sleep the usual short delay."""
        if threading.current_thread() is not self:
            self.wake()
            return self._loop_delay_s
        raw = self.socket.socket if self.socket is not None else None
        if raw is None or raw.fileno() < 0:
            return self._loop_delay_s
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return 0.0
        try:
            select.select([raw, self._wake_reader], [], [], IDLE_WAIT_S)
            while self._wake_reader.recv(4096):
                pass
        except BlockingIOError:
            pass
        except (OSError, ValueError):  # the socket closed under us: pynetdicom's loop finds out itself
            return self._loop_delay_s
        return 0.0

    @_run_loop_delay.setter
    def _run_loop_delay(self, seconds: float) -> None:
        self._loop_delay_s = seconds


class _ActivityCheckpoint(threading.Event):
    """The association reactor's pause switch (set: running), whose `wait` on the reactor's own thread also waits
    for a DIMSE message, a primitive from the DUL, a `set` (pynetdicom's kill and resume) or `IDLE_WAIT_S`."""

    def __init__(self, reactor: threading.Thread, running: bool) -> None:
        super().__init__()
        self._reactor = reactor
        self.activity = threading.Event()
        if running:
            super().set()

    def set(self) -> None:
        super().set()
        self.activity.set()

    def wait(self, timeout: float | None = None) -> bool:
        running = super().wait(timeout)
        if running and threading.current_thread() is self._reactor:
            self.activity.wait(IDLE_WAIT_S)
            self.activity.clear()
        return running


class WakingRequestHandler(RequestHandler):
    """pynetdicom's request handler, whose association waits on data (pass as the server's `request_handler`)."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()  # not started yet: its DUL and queues can still be replaced
        checkpoint = _ActivityCheckpoint(assoc, running=assoc._reactor_checkpoint.is_set())
        assoc._reactor_checkpoint = checkpoint
        assoc.dul = _WakingDUL(assoc)
        assoc.dul.to_user_queue = _WakingQueue(checkpoint.activity.set)
        assoc.dimse.msg_queue = _WakingQueue(checkpoint.activity.set)
        assoc.set_socket(_WholePduSocket(assoc, client_socket=self.request))
        return assoc
