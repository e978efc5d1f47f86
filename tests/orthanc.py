"""A private Orthanc for tests, in its own network namespace (design.md §10).

Why a namespace: Debian's Orthanc listens on every interface, and a test PACS must be reachable by nothing but the
test. The server runs as `unshare -n --fork sh -c 'ip link set lo up; exec Orthanc CONFIG'`; everything that talks
to it (our SCP, dcmtk tools, the REST client) runs in the same namespace through `nsenter --net=/proc/PID/ns/net`.
Python 3.11 has no `os.setns`, so in-namespace Python work runs as a subprocess under nsenter.

PIDs: `unshare --fork` is the parent and Orthanc (after `exec`) its child. Both hold the namespace, but killing
unshare would leave Orthanc running, so the fixture finds the child and kills Orthanc by its own PID.
Ports are fixed: the namespace is the test's own, nothing else can bind in it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT

ORTHANC_AET = "ORTHANC"
ORTHANC_DICOM_PORT = 4242
ORTHANC_HTTP_PORT = 8042
PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))

# Runs inside the namespace: one REST call, request body from stdin, response body to stdout.
_REST_CLIENT = """
import sys, urllib.error, urllib.request
method, url, content_type = sys.argv[1:4]
body = sys.stdin.buffer.read() if method in ("POST", "PUT") else None
request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": content_type})
try:
    with urllib.request.urlopen(request, timeout=120) as response:
        sys.stdout.buffer.write(response.read())
except urllib.error.HTTPError as error:
    sys.stderr.write(f"HTTP {error.code}: {error.read().decode(errors='replace')}")
    sys.exit(3)
"""

# Runs inside the namespace: find instances by SOP Instance UID and save each file as <out_dir>/<n>.dcm.
_FETCHER = """
import json, sys, urllib.request
base, out_dir, uids = sys.argv[1], sys.argv[2], sys.argv[3:]
found = {}
for n, uid in enumerate(uids):
    lookup = urllib.request.Request(base + "/tools/lookup", data=uid.encode(), method="POST")
    with urllib.request.urlopen(lookup, timeout=60) as response:
        ids = [m["ID"] for m in json.load(response) if m["Type"] == "Instance"]
    if len(ids) == 1:
        with urllib.request.urlopen(f"{base}/instances/{ids[0]}/file", timeout=60) as response:
            with open(f"{out_dir}/{n}.dcm", "wb") as handle:
                handle.write(response.read())
        found[uid] = f"{out_dir}/{n}.dcm"
print(json.dumps(found))
"""

# Runs inside the namespace: POST each file to /instances in one process.
_UPLOADER = """
import json, sys, urllib.request
ids = []
for path in sys.argv[2:]:
    with open(path, "rb") as handle:
        request = urllib.request.Request(sys.argv[1], data=handle.read(), method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        ids.append(json.load(response)["ID"])
print(json.dumps(ids))
"""


def gdcm_plugin() -> Path | None:
    """The Orthanc GDCM decoder plugin shipped by Debian (orthanc-gdcm), wherever this release puts it."""
    for directory in PLUGIN_DIRS:
        found = sorted(directory.glob("libOrthancGdcm.so*")) if directory.is_dir() else []
        if found:
            return found[0]
    return None


def _test_environment() -> dict[str, str]:
    """dcmtk inside Orthanc and our tools stall on delayed ACKs without TCP_NODELAY (design.md §4)."""
    return {**os.environ, "TCP_NODELAY": "1", "PYTHONPATH": str(REPO_ROOT)}


@dataclass
class Orthanc:
    """A running Orthanc in its own network namespace, and ways to run things beside it."""

    unshare: subprocess.Popen[bytes]
    pid: int  # Orthanc's own PID (the unshare child after exec)
    workdir: Path
    aet: str = ORTHANC_AET
    dicom_port: int = ORTHANC_DICOM_PORT
    http_port: int = ORTHANC_HTTP_PORT
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def netns(self) -> str:
        return f"/proc/{self.pid}/ns/net"

    def command(self, args: Sequence[str]) -> list[str]:
        """`args` prefixed to run in Orthanc's network namespace."""
        return ["nsenter", f"--net={self.netns}", *args]

    def run(self, args: Sequence[str], *, timeout: float = 120, input: bytes | None = None,
            check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run a command in the namespace and wait for it; output is captured."""
        return subprocess.run(self.command(args), input=input, capture_output=True, timeout=timeout, check=check,
                              env=_test_environment(), cwd=REPO_ROOT)

    def start(self, args: Sequence[str], *, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a long-running process in the namespace (killed by PID at teardown)."""
        with log.open("ab") as handle:
            process = subprocess.Popen(self.command(args), stdout=handle, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                       env={**_test_environment(), **(env or {})})
        self.started.append(process)
        return process

    def python(self, code: str, *args: str, timeout: float = 120, input: bytes | None = None) -> str:
        """Run Python `code` in the namespace (the repo importable); returns stdout, raises with stderr on failure."""
        result = self.run([sys.executable, "-c", code, *args], timeout=timeout, input=input, check=False)
        if result.returncode:
            raise AssertionError(f"in-namespace python failed ({result.returncode}): {result.stderr.decode()[-4000:]}")
        return result.stdout.decode()

    def rest(self, method: str, path: str, body: Any = None) -> Any:
        """One call to Orthanc's REST API from inside the namespace; JSON in and out (bytes passed as they are)."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        kind = "application/dicom" if isinstance(body, bytes) else "application/json"
        out = self.python(_REST_CLIENT, method, f"http://127.0.0.1:{self.http_port}{path}", kind, input=data or b"")
        return json.loads(out) if out.strip() else None

    def fetch_instances(self, sop_instance_uids: Sequence[str], out_dir: Path) -> dict[str, Path]:
        """The files Orthanc stored for these SOP Instance UIDs (one in-namespace process); absent ones are left out."""
        out_dir.mkdir(parents=True, exist_ok=True)
        out = self.python(_FETCHER, f"http://127.0.0.1:{self.http_port}", str(out_dir), *sop_instance_uids,
                          timeout=300)
        return {uid: Path(path) for uid, path in json.loads(out).items()}

    def upload(self, paths: Sequence[Path]) -> list[str]:
        """POST files to /instances in one in-namespace process; returns Orthanc's instance IDs."""
        out = self.python(_UPLOADER, f"http://127.0.0.1:{self.http_port}/instances", *map(str, paths), timeout=300)
        return json.loads(out)

    def wait_until_ready(self, timeout_s: float = 60.0) -> None:
        """Until the REST API answers /system (Orthanc opens its database and plugins first)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.unshare.poll() is not None:
                raise AssertionError(f"Orthanc exited: {(self.workdir / 'orthanc.log').read_text()[-3000:]}")
            probe = self.run([sys.executable, "-c", _REST_CLIENT, "GET", f"http://127.0.0.1:{self.http_port}/system",
                              "application/json"], check=False, timeout=30)
            if probe.returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"Orthanc's REST API never answered: {(self.workdir / 'orthanc.log').read_text()[-3000:]}")

    def stop(self) -> None:
        """Kill what was started beside Orthanc, then Orthanc, each by its PID."""
        for process in self.started:
            if process.poll() is None:
                process.kill()
            process.wait()
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass
        self.unshare.wait(timeout=30)


def orthanc_config(workdir: Path, modalities: dict[str, tuple[str, str, int]]) -> dict[str, Any]:
    """Temp storage, no remote access, the GDCM plugin, our peers as DicomModalities, no lingering associations."""
    plugin = gdcm_plugin()
    return {
        "Name": "fedlesion-test",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpPort": ORTHANC_HTTP_PORT,
        "DicomServerEnabled": True,
        "DicomAet": ORTHANC_AET,
        "DicomPort": ORTHANC_DICOM_PORT,
        "DicomCheckCalledAet": True,
        "DicomModalities": {name: [aet, host, port] for name, (aet, host, port) in modalities.items()},
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAssociationCloseDelay": 0,  # release at once after a store, like a PACS that is done
        "UnknownSopClassAccepted": False,
        "Plugins": [str(plugin)] if plugin else [],
        "Gdcm": {"Enable": True},
        "HttpsVerifyPeers": False,
        "SaveJobs": False,
        "ConcurrentJobs": 1,
        "StableAge": 60,
        "LimitFindResults": 0,
    }


def start_orthanc(workdir: Path, modalities: dict[str, tuple[str, str, int]]) -> Orthanc:
    """Write the config, start Orthanc in a new network namespace, wait for its REST API."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "orthanc.json"
    config.write_text(json.dumps(orthanc_config(workdir, modalities), indent=2))
    with (workdir / "orthanc.log").open("wb") as log:
        unshare = subprocess.Popen(
            ["unshare", "-n", "--fork", "sh", "-c", f"ip link set lo up; exec Orthanc {config}"],
            stdout=log, stderr=subprocess.STDOUT, env=_test_environment(),
        )
    orthanc = Orthanc(unshare, _child_pid(unshare), workdir)
    try:
        orthanc.wait_until_ready()
    except BaseException:
        orthanc.stop()
        raise
    return orthanc


def _child_pid(unshare: subprocess.Popen[bytes], timeout_s: float = 10.0) -> int:
    """The forked child of `unshare --fork` (sh, which becomes Orthanc through exec)."""
    children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if unshare.poll() is not None:
            raise AssertionError(f"unshare exited with {unshare.returncode} before starting Orthanc")
        pids = children.read_text().split() if children.exists() else []
        if pids:
            return int(pids[0])
        time.sleep(0.01)
    raise AssertionError("unshare never forked its child")


def require_orthanc() -> None:
    """Skip, saying what is missing, where Orthanc or namespaces cannot be had."""
    for tool in ("Orthanc", "unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if gdcm_plugin() is None:
        pytest.skip("the Orthanc GDCM plugin (orthanc-gdcm) is not installed")
    if subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False).returncode:
        pytest.skip("cannot create a network namespace (unshare -n needs root or user namespaces)")


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Any]:
    """`orthanc_factory({"fedlesion": ("FEDLESION", "127.0.0.1", 11112)})` → a running `Orthanc`, stopped after."""
    require_orthanc()
    running: list[Orthanc] = []

    def start(modalities: dict[str, tuple[str, str, int]]) -> Orthanc:
        orthanc = start_orthanc(tmp_path / f"orthanc-{len(running)}", modalities)
        running.append(orthanc)
        return orthanc

    yield start
    for orthanc in running:
        orthanc.stop()
