"""Install governance on a node (issue 11 item 7): the registry's pin, pending versions, an admin's install on the
models page (audited), `fedlesion model rollback`, and the puller storing what it pulls (a fake pull here; the real
pull client over mTLS is tests/test_federation_pull.py).

Packages are the smallest real ONNX graphs from test_model_service, verified, warmed up and swapped for real.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import grpc
import pytest

from dicom_gateway.outbox import Outbox
from dicom_gateway.settings import DicomSettings
from dicom_gateway.studies import StudyIndex
from inference.jobs import JobQueue, registry_tasks
from inference.model_pull import AUTO_INSTALL_USER, ModelPuller
from inference.models import ModelService, ModelUnavailable
from inference.settings import NodeSettings, TasksSettings
from inference.web.audit import AuditLog
from models.errors import TamperedPackage, UntrustedSigner
from models.manifest import Task
from models.package import TrustPolicy
from models.registry import INSTALLED_FILE
from models.settings import ModelSettings
from models.signing import generate_key_pair, load_private_key, load_public_key
from tests.test_model_service import STROKE, drop_into_registry, make_package, service

PASSWORD = "correct horse battery staple"


def tamper(package: Path) -> Path:
    """Flip the last byte of model.onnx: its sha256 no longer matches the signed manifest."""
    onnx = package / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))
    return package


def serving_version(models: ModelService) -> int | None:
    return models.served_versions().get(STROKE)


def test_a_held_task_keeps_serving_until_installed_and_rollback_goes_back(tmp_path: Path) -> None:
    models = service(tmp_path, defaults_dir=None)
    models.registry.publish(make_package(tmp_path / "v1", 1))
    models.start(watch=False)
    assert serving_version(models) == 1 and models.pending(STROKE) == []

    models.hold(STROKE, "pull")  # what the puller does before storing a version without auto_install
    models.store(make_package(tmp_path / "v2", 2))
    models.poll_once()
    assert serving_version(models) == 1, "a pinned task must not follow the newest version"
    status = models.status()["tasks"][STROKE.value]
    assert status["pending"] == [2] and status["installed"]["version"] == 1
    assert status["registry_versions"] == [1, 2]

    assert models.install_version(STROKE, 2, "alice").version == 2
    pin = models.registry.installed(STROKE)
    assert (pin.version, pin.history, pin.by) == (2, (1,), "alice") and models.pending(STROKE) == []

    assert models.registry.rollback(STROKE, "bob").version == 1
    models.poll_once()  # the watcher's turn: a pin may go back to an older version
    assert serving_version(models) == 1 and models.pending(STROKE) == [2]
    with pytest.raises(ValueError, match="no version before 1"):
        models.registry.rollback(STROKE, "bob")
    assert models.refusals() == []


def test_a_refused_install_leaves_pin_and_model_alone(tmp_path: Path) -> None:
    models = service(tmp_path, defaults_dir=None)
    models.registry.publish(make_package(tmp_path / "v1", 1))
    models.start(watch=False)
    models.hold(STROKE, "pull")
    drop_into_registry(tamper(make_package(tmp_path / "v2", 2)), models.registry.root, STROKE, 2)
    with pytest.raises(TamperedPackage):
        models.install_version(STROKE, 2, "alice")
    assert serving_version(models) == 1 and models.registry.installed(STROKE).version == 1
    assert models.refusals()[0].kind == "TamperedPackage" and models.pending(STROKE) == []
    with pytest.raises(ValueError, match="not in the registry"):
        models.install_version(STROKE, 7, "alice")
    # a rollback target is verified before the pin moves
    models.store(make_package(tmp_path / "v3", 3))
    assert models.install_version(STROKE, 3, "alice").version == 3
    tamper(models.registry.root / STROKE.value / "1")
    with pytest.raises(TamperedPackage):
        models.registry.rollback(STROKE, "bob")
    assert models.registry.installed(STROKE).version == 3 and serving_version(models) == 3


def test_a_node_with_nothing_served_holds_nothing_until_an_install(tmp_path: Path) -> None:
    private_pem, public_pem = generate_key_pair()
    trust = TrustPolicy.enrolled([load_public_key(public_pem)], {STROKE})
    models = service(tmp_path, trust, defaults_dir=None)
    models.start(watch=False)
    models.hold(STROKE, "pull")
    assert models.registry.installed(STROKE).version is None
    models.store(make_package(tmp_path / "v1", 1, key=load_private_key(private_pem), demo=False))
    models.poll_once()
    with pytest.raises(ModelUnavailable):
        models.current(STROKE)
    assert models.pending(STROKE) == [1]
    # the CLI's view (reprocess routing) agrees: pinned to nothing is no model, although v1 lies in the registry
    on_disk = ModelSettings(registry_dir=models.registry.root, enrollment_bundle=tmp_path / "node.bundle")
    assert registry_tasks(tmp_path, on_disk) == frozenset()
    assert models.install_version(STROKE, 1, "alice").version == 1
    assert registry_tasks(tmp_path, on_disk) == {STROKE}


class FakeCoordinator:
    """The pull function's seam: hands out prepared packages, or fails like an unreachable coordinator."""

    def __init__(self) -> None:
        self.releases: dict[int, Path] = {}
        self.reachable = True
        self.asked: list[int] = []

    def __call__(self, task: Task, newer_than: int, dest: Path) -> Path | None:
        self.asked.append(newer_than)
        if not self.reachable:
            raise ConnectionError("connection refused")
        newer = [version for version in self.releases if version > newer_than]
        return self.releases[max(newer)] if newer else None


def puller(models: ModelService, coordinator: FakeCoordinator, tmp_path: Path, auto_install: bool) -> ModelPuller:
    return ModelPuller(models, coordinator, coordinator="coordinator.test:7443", interval_s=0.05,
                       auto_install=auto_install, work_dir=tmp_path / "pull")


def test_puller_with_auto_install_serves_each_new_release(tmp_path: Path) -> None:
    models = service(tmp_path, defaults_dir=None)
    models.registry.publish(make_package(tmp_path / "v1", 1))
    models.start(watch=False)
    coordinator = FakeCoordinator()
    pulling = puller(models, coordinator, tmp_path, auto_install=True)
    assert pulling.pull_once() == {} and coordinator.asked == [1]
    coordinator.releases[2] = make_package(tmp_path / "v2", 2)
    assert pulling.pull_once() == {STROKE: 2}
    assert serving_version(models) == 2 and models.registry.installed(STROKE).by == AUTO_INSTALL_USER
    assert pulling.status()["last_error"] is None and pulling.status()["last_time"]
    assert not any((tmp_path / "pull").iterdir()), "the pull's scratch folders are removed"


def test_puller_without_auto_install_leaves_the_version_pending(tmp_path: Path) -> None:
    models = service(tmp_path, defaults_dir=None)
    models.registry.publish(make_package(tmp_path / "v1", 1))
    models.start()  # the watcher runs: it must not swap the pulled version in either
    try:
        coordinator = FakeCoordinator()
        coordinator.releases[2] = make_package(tmp_path / "v2", 2)
        stop = threading.Event()
        thread = threading.Thread(target=puller(models, coordinator, tmp_path, auto_install=False).run, args=(stop,))
        thread.start()
        try:
            for _ in range(200):
                if len(coordinator.asked) >= 3:
                    break
                stop.wait(0.02)
        finally:
            stop.set()
            thread.join()
        assert coordinator.asked[:3] == [1, 2, 2]  # pulled once at start, then nothing newer each interval
        models.poll_once()
        assert serving_version(models) == 1 and models.pending(STROKE) == [2]
    finally:
        models.stop()


def test_an_unreachable_coordinator_or_a_refused_release_changes_nothing(tmp_path: Path) -> None:
    models = service(tmp_path, defaults_dir=None)
    models.registry.publish(make_package(tmp_path / "v1", 1))
    models.start(watch=False)
    coordinator = FakeCoordinator()
    coordinator.reachable = False
    pulling = puller(models, coordinator, tmp_path, auto_install=True)
    assert pulling.pull_once() == {}
    assert serving_version(models) == 1 and pulling.status()["last_error"] == "ConnectionError: connection refused"

    def refusing(task: Task, newer_than: int, dest: Path) -> Path | None:
        raise UntrustedSigner("package is signed by key abc, which this node does not trust")

    pulling = ModelPuller(models, refusing, coordinator="c:1", interval_s=1, auto_install=True, work_dir=tmp_path)
    assert pulling.pull_once() == {} and pulling.status()["last_error"] is None
    assert models.refusals()[0].kind == "UntrustedSigner" and models.refusals()[0].path == "pulled from c:1"
    assert serving_version(models) == 1 and models.registry.versions(STROKE) == [1]

    coordinator.reachable = True
    coordinator.releases[2] = tamper(make_package(tmp_path / "v2", 2))  # caught again by the registry's check
    assert puller(models, coordinator, tmp_path, auto_install=True).pull_once() == {}
    assert serving_version(models) == 1 and models.registry.versions(STROKE) == [1]
    assert models.refusals()[0].kind == "TamperedPackage"


def test_grpc_errors_are_kept_as_one_line(tmp_path: Path) -> None:
    models = service(tmp_path, defaults_dir=None)

    class Unavailable(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "failed to connect to all addresses\ndebug context follows"

    def unavailable(task: Task, newer_than: int, dest: Path) -> Path | None:
        raise Unavailable()

    pulling = ModelPuller(models, unavailable, coordinator="c:1", interval_s=1, auto_install=False, work_dir=tmp_path)
    pulling.pull_once()
    assert pulling.status()["last_error"] == "UNAVAILABLE: failed to connect to all addresses"


# -- the models page -------------------------------------------------------------------------------------------


def models_app(tmp_path: Path, models: ModelService, puller: ModelPuller | None = None):
    from inference.web import create_app
    from inference.web.auth import UserStore

    data_dir = tmp_path / "data"
    store = UserStore(data_dir)
    store.add_user("admin", PASSWORD, admin=True)
    store.add_user("radiologist", PASSWORD)
    store.close()
    app = create_app(
        data_dir, NodeSettings(), DicomSettings(),
        studies=StudyIndex(data_dir / "dicom.sqlite3", data_dir / "spool", DicomSettings()),
        jobs=JobQueue(data_dir, tasks=TasksSettings(ms=False)), models=models, outbox=Outbox(data_dir),
        puller=puller,
    )
    app.config["TESTING"] = True
    return app


def logged_in(app, name: str):
    from tests.test_web import csrf_from, login

    client = app.test_client()
    assert login(client, name).status_code == 302
    client.csrf = csrf_from(client.get("/models").get_data(as_text=True))
    return client


def test_an_admin_installs_a_pending_version_on_the_models_page(tmp_path: Path) -> None:
    models = service(tmp_path, defaults_dir=None)
    models.registry.publish(make_package(tmp_path / "v1", 1))
    models.start(watch=False)
    coordinator = FakeCoordinator()
    coordinator.releases[2] = make_package(tmp_path / "v2", 2)
    pulling = puller(models, coordinator, tmp_path, auto_install=False)
    assert pulling.pull_once() == {STROKE: 2}
    coordinator.reachable = False
    pulling.pull_once()
    app = models_app(tmp_path, models, pulling)

    radiologist = logged_in(app, "radiologist")
    html = radiologist.get("/models").get_data(as_text=True)
    assert 'id="pending-stroke-dwi-adc-2"' in html and "Install version 2" not in html
    assert "Pulls from coordinator.test:7443" in html and "failed: ConnectionError: connection refused" in html
    refused = radiologist.post("/models/stroke-dwi-adc/install", data={"version": "2", "csrf_token": radiologist.csrf})
    assert refused.status_code == 403 and serving_version(models) == 1

    admin = logged_in(app, "admin")
    assert "Install version 2" in admin.get("/models").get_data(as_text=True)
    assert admin.post("/models/stroke-dwi-adc/install", data={"version": "2"}).status_code == 400  # no CSRF token
    done = admin.post("/models/stroke-dwi-adc/install", data={"version": "2", "csrf_token": admin.csrf})
    assert done.status_code == 302 and serving_version(models) == 2
    html = admin.get("/models").get_data(as_text=True)
    assert "pending-stroke-dwi-adc-2" not in html and "by admin" in html
    api = admin.post("/api/models/stroke-dwi-adc/install", json={"version": 9}, headers={"X-CSRF-Token": admin.csrf})
    assert api.status_code == 409 and "not in the registry" in api.get_json()["detail"]
    assert admin.post("/api/models/ms-flair/install", json={"version": 1},
                      headers={"X-CSRF-Token": admin.csrf}).status_code == 404
    installs = [e for e in AuditLog(tmp_path / "data").events() if e["action"] == "model-install"]
    assert [(e["user"], e["task"], e["version"], e["outcome"]) for e in installs] == [
        ("admin", "stroke-dwi-adc", 2, "installed")
    ]


def test_model_rollback_command_pins_the_previous_version_and_is_audited(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedlesion.cli import main

    data_dir = tmp_path / "data"
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\ndata_dir = "{data_dir}"\n')
    models = ModelService(data_dir / "registry", TrustPolicy.demo(), {STROKE}, defaults_dir=None)
    for version in (1, 2, 3):
        models.registry.publish(make_package(tmp_path / f"v{version}", version))
    assert main(["--config", str(config), "model", "rollback", "stroke"]) == 0
    assert "from version 3 to version 2" in capsys.readouterr().out
    assert models.registry.installed(STROKE).version == 2
    assert main(["--config", str(config), "model", "rollback", "stroke-dwi-adc"]) == 0
    assert main(["--config", str(config), "model", "rollback", "stroke"]) == 2
    assert "no version before 1" in capsys.readouterr().err
    events = [e for e in AuditLog(data_dir).events() if e["action"] == "model-rollback"]
    assert [e["version"] for e in events] == ["3 -> 2", "2 -> 1"] and events[0]["user"].startswith("cli:")
    assert json.loads((data_dir / "registry" / STROKE.value / INSTALLED_FILE).read_text())["version"] == 1
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["--config", str(config), "user", "add", "root", "--admin", "--password-stdin"]) == 0
    assert main(["--config", str(config), "user", "list"]) == 0
    assert "root (admin)" in capsys.readouterr().out
