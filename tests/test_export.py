"""ONNX export (design.md §8): dynamic spatial axes, probabilities out, parity, signed package, registry, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from fedlesion.cli import main  # noqa: E402
from models.manifest import LayerNormalization, Task  # noqa: E402
from models.networks import build_network  # noqa: E402
from models.package import TrustPolicy, external_data_tensors, load_package  # noqa: E402
from models.registry import Registry  # noqa: E402
from models.signing import DEMO_PRIVATE_KEY_FILE, demo_private_key, generate_key_pair, load_private_key  # noqa: E402
from training import export as export_module  # noqa: E402
from training.checkpoint import save_checkpoint  # noqa: E402
from training.plan import default_plan  # noqa: E402
from training.export import (  # noqa: E402
    ExportError,
    check_parity,
    export_checkpoint,
    export_onnx,
)

IN_CHANNELS = 2  # stroke: DWI + ADC


def tiny_network(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_network(IN_CHANNELS, 1, TINY_PLAN.network).eval()


TINY_PLAN = default_plan(Task.STROKE_DWI_ADC).with_overrides(
    {"network": {"depth": 3, "base_filters": 4, "max_filters": 16}}
)


def write_checkpoint(path: Path, seed: int = 1, threshold: float | None = None) -> Path:
    network = tiny_network(seed)
    save_checkpoint(
        path,
        plan=TINY_PLAN,
        epoch=3,
        model=network.state_dict(),
        history=[
            {"epoch": 1, "train_loss": 0.9, "val_dice": 0.1},
            {"epoch": 3, "train_loss": 0.7, "val_dice": 0.25, "val_loss": 0.6},
        ],
        best_val_dice=0.25,
        federated_round=2,
        strategy="fedavg",
        threshold=threshold,
    )
    return path


@pytest.fixture(scope="module")
def exported() -> tuple[torch.nn.Module, bytes]:
    network = tiny_network(0)
    return network, export_onnx(network, IN_CHANNELS)


def test_onnx_runs_at_two_sizes_and_matches_torch(exported: tuple[torch.nn.Module, bytes]) -> None:
    network, data = exported
    assert external_data_tensors(data) == []
    model = onnx.load_from_string(data)
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["probabilities"]
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[:2] == [1, IN_CHANNELS] and all(isinstance(d, str) for d in dims[2:])
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    for shape in [(32, 32, 32), (48, 40, 32)]:
        image = rng.standard_normal((1, IN_CHANNELS, *shape)).astype(np.float32)
        probabilities = session.run(None, {"image": image})[0]
        assert probabilities.shape == (1, 1, *shape)
        assert probabilities.min() >= 0.0 and probabilities.max() <= 1.0
        with torch.no_grad():
            expected = torch.sigmoid(network(torch.from_numpy(image))).numpy()
        assert np.abs(probabilities - expected).max() < 1e-4
        report = check_parity(network, data, image[0], 0.5)
        assert report.passed and report.shape == shape and report.disagreements_outside_band == 0


def test_parity_detects_other_weights(exported: tuple[torch.nn.Module, bytes]) -> None:
    _, data = exported
    image = np.random.default_rng(3).standard_normal((IN_CHANNELS, 32, 32, 32)).astype(np.float32)
    report = check_parity(tiny_network(5), data, image, 0.5)
    assert not report.passed and report.max_abs_diff >= 1e-4
    assert "max |Δp|" in report.describe()


def test_export_checkpoint_builds_a_verified_package(tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tmp_path / "last.pt")
    registry = Registry(tmp_path / "registry", TrustPolicy.demo())
    path = export_checkpoint(
        checkpoint,
        tmp_path / "package",
        private_key=demo_private_key(),
        version=None,
        demo=False,  # the demo key forces demo
        description="tiny test model",
        registry=registry,
    )
    assert path == tmp_path / "registry" / "stroke-dwi-adc" / "1"
    for where in (tmp_path / "package", path):
        loaded = load_package(where, TrustPolicy.demo())
        manifest = loaded.manifest
        assert manifest.task is Task.STROKE_DWI_ADC and manifest.version == 1
        assert manifest.demo and loaded.demo and "not for clinical use" in manifest.description
        assert manifest.training.plan_sha256 == TINY_PLAN.sha256()
        assert manifest.training.federated_round == 2 and manifest.training.strategy == "fedavg"
        assert manifest.training.site_metrics == {"local": {"dice": 0.25, "loss": 0.6}}
        assert manifest.preprocessing.target_spacing_mm == (2.0, 2.0, 2.0)
        assert manifest.preprocessing.size_divisible == 16 and manifest.output.threshold == 0.5
        assert external_data_tensors(loaded.onnx_bytes) == []
    assert registry.latest(Task.STROKE_DWI_ADC).manifest.version == 1


def test_parity_failure_refuses_to_build_or_publish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exported: tuple[torch.nn.Module, bytes]
) -> None:
    checkpoint = write_checkpoint(tmp_path / "last.pt", seed=1)
    # The ONNX graph comes from other weights (the fixture's seed 0) than the torch module parity checks.
    monkeypatch.setattr(export_module, "export_onnx", lambda *args, **kwargs: exported[1])
    registry = Registry(tmp_path / "registry", TrustPolicy.demo())
    with pytest.raises(ExportError, match="parity failed.*max \\|Δp\\|"):
        export_checkpoint(
            checkpoint,
            tmp_path / "package",
            private_key=demo_private_key(),
            version=None,
            demo=True,
            description="",
            registry=registry,
        )
    assert not (tmp_path / "package").exists()
    assert registry.versions(Task.STROKE_DWI_ADC) == []


def test_bad_checkpoints_are_export_errors(tmp_path: Path) -> None:
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ExportError, match="checkpoint format"):
        export_checkpoint(
            tmp_path / "other.pt", tmp_path / "p", private_key=demo_private_key(), version=1, demo=True, description=""
        )
    state = torch.load(write_checkpoint(tmp_path / "c.pt"), weights_only=True)
    state["plan"]["network"]["base_filters"] = 8
    torch.save(state, tmp_path / "mismatch.pt")
    with pytest.raises(ExportError, match="weights do not fit"):
        export_checkpoint(
            tmp_path / "mismatch.pt", tmp_path / "p", private_key=demo_private_key(), version=1, demo=True, description=""
        )


def test_cli_publishes_with_the_demo_key(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    exported: tuple[torch.nn.Module, bytes],
) -> None:
    # Same weights as the fixture's network, whose ONNX is reused: parity holds and the file saves one export.
    checkpoint = write_checkpoint(tmp_path / "best.pt", seed=0, threshold=0.85)
    monkeypatch.setattr(export_module, "export_onnx", lambda *args, **kwargs: exported[1])
    args = ["export", str(checkpoint), "--registry", str(tmp_path / "registry"), "--key", str(DEMO_PRIVATE_KEY_FILE)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "task: stroke-dwi-adc" in out and "version: 1" in out and "demo: yes" in out
    assert "model.onnx sha256:" in out and "parity 48×48×32: max |Δp|" in out
    latest = Registry(tmp_path / "registry", TrustPolicy.demo()).latest(Task.STROKE_DWI_ADC)
    assert latest is not None and latest.manifest.version == 1 and latest.demo
    assert latest.manifest.output.threshold == 0.85  # the checkpoint's calibrated threshold, not the plan's 0.5
    assert "not for clinical use" in latest.manifest.description
    # The plan's network is recorded, so the node knows it may run the whole volume in one pass.
    network = latest.manifest.network
    assert network is not None and network.normalization is LayerNormalization.BATCH
    assert network.parameters == sum(p.numel() for p in exported[0].parameters())
    assert latest.manifest.window_invariant


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    private_pem, _ = generate_key_pair()
    (tmp_path / "key.pem").write_bytes(private_pem)
    load_private_key(tmp_path / "key.pem")
    code = main(["export", str(tmp_path / "absent.pt"), "--registry", str(tmp_path / "r"), "--key", str(tmp_path / "key.pem")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no such checkpoint" in err
