"""A limited center installs the node without torch, MONAI or onnx (design.md §1).

In a fresh interpreter where those packages cannot be imported, the node's packages import and do real work:
a synthetic study is generated and written as NIfTI and DICOM, preprocessed with a signed model package's
manifest, run through onnxruntime from the package's bytes, mapped back and scored.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from onnx_graphs import first_channel_sigmoid

from models.manifest import Task, default_manifest
from models.package import build_package
from models.signing import demo_private_key

REPO_ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "monai", "onnx", "onnxscript")

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys
    from pathlib import Path

    BLOCKED = {blocked!r}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"{{name}} is blocked: not part of a limited center's install")
            return None

    sys.meta_path.insert(0, Blocker())
    for name in list(sys.modules):
        assert name.split(".")[0] not in BLOCKED, name

    import dicom_gateway, inference, training
    import fedlesion.cli  # every subcommand's module
    import models.adc, models.manifest, models.metrics, models.package, models.postprocessing, models.preprocessing
    import models.registry, models.resampling, models.signing
    import models.federation.enrollment, models.federation.federation_pb2_grpc, models.federation.pki
    import models.federation.pull, models.federation.roles, models.federation.transport, models.federation.wire
    import inference.model_pull, inference.node
    import inference.engine
    import dicom_gateway.convert, dicom_gateway.outbox, dicom_gateway.receiver, dicom_gateway.roles
    import dicom_gateway.scp, dicom_gateway.scu, dicom_gateway.studies, dicom_gateway.study_inputs
    import dicom_gateway.writers
    import training.synthetic
    import training.federation.evaluation, training.federation.site  # a limited center's evaluator site
    from training.synthetic.dicom_writer import write_dicom_study
    # The model contract, the engine module and the CLI load without the runtime; an Engine needs onnxruntime.
    assert "onnxruntime" not in sys.modules, "onnxruntime imported eagerly"

    import numpy as np
    from inference.engine import Engine
    from models.adc import AdcUnit, detect_adc_unit, to_micrometre2_per_s
    from models.metrics import compute_metrics
    from models.package import TrustPolicy
    from models.geometry import voxel_volume_ml
    from models.preprocessing import Channel
    from models.registry import Registry

    out = Path(sys.argv[1])
    case = training.synthetic.generate_case("stroke", seed=11, size="medium", pattern="single")
    paths = training.synthetic.write_nifti_case(case, out / "nifti")
    dicom_files = write_dicom_study(case, out / "dicom")
    assert paths["mask"].exists() and len(dicom_files) >= 3 * case.mask.shape[2]

    registry = Registry(out / "registry", TrustPolicy.demo())
    package = registry.publish(Path(sys.argv[2]))
    assert registry.latest(package.manifest.task).manifest.version == package.manifest.version

    adc_mm2_s = case.images["adc"] / 1e6  # as some scanners export it
    unit = detect_adc_unit(adc_mm2_s, case.brain_mask > 0)
    assert unit is AdcUnit.MM2_PER_S, unit
    adc = to_micrometre2_per_s(adc_mm2_s, unit)
    channels = [Channel(case.images["dwi_b1000"], case.affine, "dwi"), Channel(adc, case.affine, "adc")]
    on_source = Engine(package, threads=1).predict(channels).probabilities
    assert on_source.shape == case.mask.shape
    # sigmoid(z-scored DWI) > 0.5 marks voxels brighter than the head's mean; the bright lesion is among them.
    metrics = compute_metrics(on_source > 0.5, case.mask, voxel_volume_ml(case.affine))
    assert metrics.voxel_sensitivity > 0.9, metrics
    assert abs(metrics.gt_volume_ml - sum(lesion.volume_ml for lesion in case.lesions)) < 0.05

    # DICOM in and out: roles and volumes from the synthetic study, SEG/SC/SR written from its ground truth.
    import pydicom
    from dicom_gateway.convert import convert_study
    from dicom_gateway.roles import classify_study
    from dicom_gateway.writers import Lesion, ModelInfo, write_outputs
    from models.manifest import Task

    written = {{path.name for path in convert_study(out / "dicom", out / "converted")}}
    assert {{"dwi.nii.gz", "adc.nii.gz", "flair.nii.gz", "study.json"}} <= written, written
    roles = classify_study(sorted((out / "dicom").rglob("*.dcm")))
    assert roles.dwi is not None and roles.adc is not None
    adc_files = [pydicom.dcmread(f) for f in dicom_files]
    references = [d for d in adc_files if d.SeriesInstanceUID == roles.adc.series_uid]  # the writers sort them
    label_map = np.zeros((len(references), references[0].Rows, references[0].Columns), np.uint8)
    label_map[len(references) // 2, 10:14, 10:14] = 1
    lesion = Lesion(1, 0.1, (0.0, 0.0, 0.0), 16)
    model = ModelInfo("stroke-dwi-adc", "1", None, "b" * 64)
    outputs = write_outputs(references, label_map, [lesion], model, Task.STROKE_DWI_ADC, 1, set(), 0.1, 0.0)
    assert len(outputs.datasets) == 2 + len(references)

    leaked = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("torch-free OK", round(metrics.gt_volume_ml, 2), "ml")
    """
).format(blocked=BLOCKED)


def test_node_packages_work_without_torch_monai_onnx(tmp_path: Path) -> None:
    manifest = default_manifest(
        Task.STROKE_DWI_ADC, 1, plan_sha256="a" * 64, demo=True, description="test model; not for clinical use"
    )
    package = build_package(tmp_path / "package", first_channel_sigmoid(channels=2), manifest, demo_private_key())
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "work"), str(package)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch-free OK" in result.stdout


def test_the_blocker_really_blocks(tmp_path: Path) -> None:
    """Negative control: the same guard makes an import of MONAI fail, so the test above could fail."""
    code = SCRIPT.split("import dicom_gateway")[0] + "import monai\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode != 0 and "monai is blocked" in result.stderr
