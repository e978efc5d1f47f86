"""The checked-in protocol stubs are exactly what grpcio-tools (the dev extra's pin) generates from the .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from grpc_tools.grpc_version import VERSION as grpc_tools_version_string

from models.federation import federation_pb2, federation_pb2_grpc
from models.federation.roles import SiteRole
from tests.conftest import REPO_ROOT

PROTO = Path("models/federation/federation.proto")
GENERATED = ("federation_pb2.py", "federation_pb2_grpc.py")


def test_checked_in_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", str(PROTO)],
        cwd=REPO_ROOT, check=True, capture_output=True,
    )  # fmt: skip
    for name in GENERATED:
        fresh = (tmp_path / PROTO.parent / name).read_text(encoding="utf-8")
        checked_in = (REPO_ROOT / PROTO.parent / name).read_text(encoding="utf-8")
        assert fresh == checked_in, (
            f"{name} is stale: run `python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. {PROTO}`"
        )


def test_the_stubs_describe_the_coordinator_service_and_round_trip_a_stream_part() -> None:
    service = federation_pb2.DESCRIPTOR.services_by_name["Coordinator"]
    assert {method.name for method in service.methods} == {
        "Hello", "Heartbeat", "GetTask", "GetWeights", "GetCandidate", "PutUpdate", "ReportMetrics", "GetLatestModel",
    }  # fmt: skip
    assert service.methods_by_name["PutUpdate"].client_streaming
    assert service.methods_by_name["GetWeights"].server_streaming
    assert service.methods_by_name["GetCandidate"].server_streaming
    part = federation_pb2.StreamPart(chunk=federation_pb2.Chunk(index=3, payload=b"\x00\x01", sha256="ab"))
    again = federation_pb2.StreamPart.FromString(part.SerializeToString())
    assert again.WhichOneof("part") == "chunk" and again.chunk.index == 3 and again.chunk.payload == b"\x00\x01"
    generated_by = federation_pb2_grpc.GRPC_GENERATED_VERSION
    assert generated_by == grpc_tools_version_string, "regenerate with the pinned grpcio-tools"


def test_roles_narrow_and_never_widen() -> None:
    assert [role.value for role in SiteRole] == ["trainer", "evaluator", "node"]
    assert SiteRole.TRAINER.permits("evaluator") and SiteRole.TRAINER.permits(SiteRole.NODE)
    assert SiteRole.EVALUATOR.permits("node") and not SiteRole.EVALUATOR.permits("trainer")
    assert not SiteRole.NODE.permits(SiteRole.EVALUATOR) and SiteRole.NODE.permits("node")


def test_aggregates_and_the_candidate_travel_as_typed_fields() -> None:
    """A trainer's Dice per threshold rides in its update's header, a candidate's manifest and signature in the
    header of its stream, an evaluator's histograms in its report: each survives the wire unchanged."""
    header = federation_pb2.StreamHeader(
        round=2, num_cases=7, metrics={"val_dice": 0.5},
        threshold_dice=federation_pb2.ThresholdDice(thresholds=[0.3, 0.5], mean_dice=[0.25, 0.75], num_cases=6),
        candidate=federation_pb2.ModelHeader(version=3, task="stroke-dwi-adc", manifest_json=b"{}",
                                             manifest_sig=b"sig", onnx_bytes=10, onnx_sha256="ab"),
    )
    again = federation_pb2.StreamHeader.FromString(header.SerializeToString(deterministic=True))
    assert list(again.threshold_dice.thresholds) == [0.3, 0.5] and list(again.threshold_dice.mean_dice) == [0.25, 0.75]
    assert again.threshold_dice.num_cases == 6 and again.candidate.version == 3
    assert again.candidate.manifest_sig == b"sig"
    assert not federation_pb2.StreamHeader(round=2).HasField("threshold_dice")  # absent, not an empty curve
    report = federation_pb2.MetricsReport(
        kind="evaluate", num_cases=12, values={"val_dice": 0.6},
        histograms=[federation_pb2.Histogram(metric="val_dice", edges=[0.0, 0.5, 1.0], counts=[5, 7])],
    )
    (histogram,) = federation_pb2.MetricsReport.FromString(report.SerializeToString()).histograms
    assert (histogram.metric, list(histogram.edges), list(histogram.counts)) == ("val_dice", [0.0, 0.5, 1.0], [5, 7])
