"""An evaluator site's aggregates and its candidate (training/federation/evaluation.py): means and histograms only
over ≥ 5 cases, every bin ≥ 5 cases, checked again where the coordinator records them; a candidate stream that was
tampered with, or signed by the demo key, is refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from onnx_graphs import first_channel_sigmoid

from models.federation import federation_pb2 as pb2
from models.federation.wire import StreamBinding, WireError, chunk_stream
from models.manifest import Task, default_manifest
from models.metrics import CaseMetrics, compute_metrics
from models.package import build_package, sha256_hex
from models.signing import demo_private_key, generate_key_pair, load_private_key
from training.federation.evaluation import histograms_from_messages, receive_candidate, summarize_scores

KEY = bytes(range(32))
PLAN = "c" * 64
DICE = [0.05, 0.1, 0.12, 0.3, 0.35, 0.5, 0.52, 0.6, 0.7, 0.8, 0.9, 0.95]


def _scores(dice: list[float]) -> list[CaseMetrics]:
    base = compute_metrics(np.ones((2, 2, 2)), np.ones((2, 2, 2)), 1.0)
    return [dataclasses.replace(base, dice=d, avd_ml=10.0 * d, lf1=1.0 - d) for d in dice]


def test_twelve_cases_give_means_and_bins_of_at_least_five() -> None:
    summary = summarize_scores(_scores(DICE))
    assert summary.num_cases == 12
    assert summary.values == pytest.approx({"val_dice": np.mean(DICE), "val_avd_ml": 10 * np.mean(DICE),
                                            "val_lf1": 1 - np.mean(DICE)})
    # Steps of 0.1 (a 1-2-5 width for ≈ 10 bins over 0.05–0.95), merged left to right until a bin holds 5 cases:
    # [0, 0.4) holds 0.05 … 0.35, [0.4, 0.9) 0.5 … 0.8, and the short remainder (0.9, 0.95) joins the last bin.
    assert summary.histograms["val_dice"] == {"edges": [0.0, 0.4, 1.0], "counts": [5, 7]}
    for bins in summary.histograms.values():
        assert min(bins["counts"]) >= 5 and sum(bins["counts"]) == 12
    messages = summary.histogram_messages()
    assert [m.metric for m in messages] == ["val_avd_ml", "val_dice", "val_lf1"]
    assert histograms_from_messages(messages, 12) == summary.histograms  # what the coordinator records


def test_fewer_than_five_cases_leave_only_their_count() -> None:
    summary = summarize_scores(_scores(DICE[:4]))
    assert (summary.num_cases, summary.values, summary.histograms) == (4, {}, {})
    assert summarize_scores(_scores(DICE[:5])).histograms["val_dice"]["counts"] == [5]
    with pytest.raises(ValueError, match="min_cases"):
        summarize_scores(_scores(DICE), min_cases=0)
    # A policy for synthetic or public cases (min_cases_per_mean = 1) shares means over fewer; the bins keep five.
    few = summarize_scores(_scores(DICE[:3]), min_cases_per_mean=1)
    assert few.values["val_dice"] == pytest.approx(np.mean(DICE[:3])) and few.histograms == {}


@pytest.mark.parametrize("edges, counts, cases, message", [
    ([0.0, 0.5, 1.0], [5, 4], 12, "a bin holds 4 case(s), fewer than 5"),
    ([0.0, 1.0], [5, 7], 12, "2 edges for 2 bins"),
    ([0.0, 0.5, 0.5], [5, 7], 12, "finite and ascending"),
    ([0.0, 0.5, 1.0], [5, 7], 11, "12 cases binned, 11 reported"),
    ([], [], 12, "0 edges for 0 bins"),
])
def test_the_coordinator_refuses_a_histogram_that_breaks_the_rule(edges, counts, cases, message) -> None:
    histogram = pb2.Histogram(metric="val_dice", edges=edges, counts=counts)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        histograms_from_messages([histogram], cases)


def test_one_histogram_per_metric() -> None:
    histogram = pb2.Histogram(metric="val_dice", edges=[0.0, 1.0], counts=[5])
    with pytest.raises(ValueError, match="a metric name of its own"):
        histograms_from_messages([histogram, histogram], 10)


def _candidate_stream(tmp_path: Path, private_key, *, demo: bool = False) -> tuple[list[pb2.StreamPart],
                                                                                    pb2.TaskReply]:
    manifest = default_manifest(Task.STROKE_DWI_ADC, 2, plan_sha256=PLAN, demo=demo, federated_round=2,
                                description="candidate" + (" (demo; not for clinical use)" if demo else ""))
    package = build_package(tmp_path / "built", first_channel_sigmoid(channels=2), manifest, private_key)
    onnx = (package / "model.onnx").read_bytes()
    task = pb2.TaskReply(kind=pb2.TaskReply.EVALUATE, plan_sha256=PLAN, round=2, base_sha256=sha256_hex(onnx),
                         task=Task.STROKE_DWI_ADC.value, max_update_bytes=len(onnx))
    header = pb2.ModelHeader(version=2, manifest_json=(package / "manifest.json").read_bytes(),
                             manifest_sig=(package / "manifest.sig").read_bytes())
    parts = list(chunk_stream(onnx, key=KEY, aad_fields=StreamBinding(PLAN, 2, task.base_sha256, "ward"),
                              header_fields={"candidate": header}, chunk_bytes=4096))
    return parts, task


def test_a_candidate_is_received_verified_and_refused_when_its_header_was_changed(tmp_path: Path) -> None:
    parts, task = _candidate_stream(tmp_path, load_private_key(generate_key_pair()[0]))
    loaded = receive_candidate(iter(parts), task, KEY, "ward", tmp_path / "received")
    assert loaded.manifest.version == 2 and loaded.manifest.training.federated_round == 2 and not loaded.demo

    changed = pb2.StreamPart()
    changed.CopyFrom(parts[0])
    changed.header.candidate.manifest_json = changed.header.candidate.manifest_json.replace(b'"version": 2',
                                                                                          b'"version": 9')
    with pytest.raises(WireError, match="does not decrypt"):  # the header is bound into every chunk
        receive_candidate(iter([changed, *parts[1:]]), task, KEY, "ward", tmp_path / "changed")
    with pytest.raises(WireError, match="does not decrypt"):  # another site's stream
        receive_candidate(iter(parts), task, KEY, "other", tmp_path / "other")


def test_a_candidate_signed_by_the_demo_key_is_refused(tmp_path: Path) -> None:
    parts, task = _candidate_stream(tmp_path, demo_private_key(), demo=True)
    with pytest.raises(ValueError, match="demo key"):
        receive_candidate(iter(parts), task, KEY, "ward", tmp_path / "received")
