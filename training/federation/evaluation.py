"""An evaluator site's work (design.md §7): a round's candidate package, received and checked, scored on the site's
labelled cases as a node runs it (the ONNX engine and `inference.pipeline`), and reduced to what may leave the site.

What leaves: the case count, and over at least MIN_CASES_PER_BIN cases the mean of each metric and its histogram,
whose every bin holds at least that many cases (`training.fingerprint.histogram`); over fewer cases any statistic is
close to one case's own value, so only the count leaves. Per-case values stay in this process.

Torch-free: a limited center runs it with the node's install (`inference/`, `models/`), without torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from inference.engine import Engine
from inference.pipeline import segment_channels
from models.errors import MalformedPackage
from models.federation import federation_pb2 as pb2
from models.federation.pull import MAX_ONNX_BYTES
from models.federation.wire import StreamReceiver, WireError
from models.geometry import voxel_volume_ml
from models.manifest import MANIFEST_FILE, SIGNATURE_FILE, Task, parse_manifest
from models.metrics import CaseMetrics, compute_metrics, summarize
from models.package import LoadedPackage, TrustPolicy, load_package
from models.signing import parse_signature
from training.datasets import TrainingCase
from training.fingerprint import MIN_CASES_PER_BIN, histogram

__all__ = ["EVALUATION_METRICS", "EvaluationSummary", "histograms_from_messages", "receive_candidate", "score_case",
           "score_cases", "summarize_scores"]

# Scored per case, shared as val_<name> like a trainer's validation metrics, so status and the manifest set them
# side by side.
EVALUATION_METRICS = ("dice", "avd_ml", "lf1")


def score_case(engine: Engine, case: TrainingCase) -> CaseMetrics:
    """One labelled case through the package's preprocessing, threshold and minimum lesion size, as a node segments a
    study (`segment_channels`), scored against the case's own mask."""
    channels = {channel.name: channel for channel in case.channels}
    inputs = engine.manifest.inputs
    images = {spec.role.value: nib.Nifti1Image(np.asarray(channels[spec.name].data, dtype=np.float32),
                                               channels[spec.name].affine) for spec in inputs}
    result = segment_channels(images, engine)
    first = channels[inputs[0].name]
    return compute_metrics(np.asarray(result.mask.dataobj), case.mask, voxel_volume_ml(first.affine))


def score_cases(package: LoadedPackage, cases: Sequence[TrainingCase], *, threads: int | None = None
                ) -> list[CaseMetrics]:
    engine = Engine(package, threads=threads)
    return [score_case(engine, case) for case in cases]


@dataclass(frozen=True)
class EvaluationSummary:
    """What an evaluator site reports of one candidate: the case count, `values` (means, only over enough cases) and
    `histograms` (metric → {"edges", "counts"}, every count ≥ MIN_CASES_PER_BIN)."""

    num_cases: int
    values: dict[str, float]
    histograms: dict[str, dict[str, list[Any]]] = field(default_factory=dict)

    def histogram_messages(self) -> list[pb2.Histogram]:
        return [pb2.Histogram(metric=name, edges=bins["edges"], counts=bins["counts"])
                for name, bins in sorted(self.histograms.items())]


def summarize_scores(scores: Sequence[CaseMetrics], min_cases: int = MIN_CASES_PER_BIN, *,
                     min_cases_per_mean: int | None = None) -> EvaluationSummary:
    """Means and histograms of EVALUATION_METRICS over the cases where each is defined, each only over at least
    `min_cases` of them (the means over at least `min_cases_per_mean` where the site's policy sets it, the
    histograms' bins always over `min_cases`); fewer cases leave only their count."""
    mean_cases = min_cases if min_cases_per_mean is None else min_cases_per_mean
    if min_cases < 1 or mean_cases < 1:
        raise ValueError(f"min_cases and min_cases_per_mean must be at least 1, got {min_cases}, {mean_cases}")
    values: dict[str, float] = {}
    histograms: dict[str, dict[str, list[Any]]] = {}
    means = summarize(list(scores))
    for name in EVALUATION_METRICS:
        defined = [value for score in scores if np.isfinite(value := float(getattr(score, name)))]
        if len(defined) >= mean_cases:
            values[f"val_{name}"] = means[name].mean
        if len(defined) >= min_cases:
            histograms[f"val_{name}"] = histogram(defined, min_cases)
    return EvaluationSummary(len(scores), values, histograms)


def receive_candidate(parts: Iterable[pb2.StreamPart], task: pb2.TaskReply, payload_key: bytes, site: str,
                      folder: Path) -> LoadedPackage:
    """The candidate an EVALUATE task names, from its GetCandidate stream, written into the new `folder` and loaded.

    The stream decrypts only under this site's payload key for the task's plan, round and ONNX sha256, a key no one
    but the coordinator and this site holds: that vouches for the bytes. A candidate is signed with the coordinator's
    round key, which no bundle carries, so its signature is checked against the key it names (integrity; trust in a
    model comes with its release), every file against the manifest, and the manifest must be the task's plan and
    round. Any failure is a WireError or a `PackageRefused` (both ValueErrors).
    """
    receiver = StreamReceiver(payload_key, site, min(task.max_update_bytes, MAX_ONNX_BYTES),
                              plan_sha256=task.plan_sha256, round=task.round, base_sha256=task.base_sha256)
    header, onnx = receiver.receive(parts)
    candidate = header.candidate
    if not candidate.manifest_json or not candidate.manifest_sig:
        raise WireError("the candidate stream carries no manifest and signature")
    manifest = parse_manifest(candidate.manifest_json)
    folder.mkdir(parents=True)
    (folder / MANIFEST_FILE).write_bytes(candidate.manifest_json)
    (folder / SIGNATURE_FILE).write_bytes(candidate.manifest_sig)
    (folder / manifest.onnx.file).write_bytes(onnx)
    signer = parse_signature(candidate.manifest_sig).public_key
    loaded = load_package(folder, TrustPolicy.enrolled([signer], [Task(task.task)]))
    training = loaded.manifest.training
    if (training.plan_sha256, training.federated_round) != (task.plan_sha256, task.round):
        raise MalformedPackage(f"the candidate is round {training.federated_round} of plan "
                               f"{training.plan_sha256[:12]}, the task round {task.round} of {task.plan_sha256[:12]}")
    return loaded


def histograms_from_messages(messages: Iterable[pb2.Histogram], num_cases: int,
                             min_cases: int = MIN_CASES_PER_BIN) -> dict[str, dict[str, list[Any]]]:
    """The histograms of an evaluator's report, checked as the coordinator records them: one per metric, ascending
    finite edges (one more than the counts), every bin with at least `min_cases` cases, no more cases than the
    report's `num_cases`. Else a ValueError naming the metric."""
    histograms: dict[str, dict[str, list[Any]]] = {}
    for message in messages:
        edges, counts = [float(edge) for edge in message.edges], [int(count) for count in message.counts]
        where = f"histogram {message.metric!r}"
        if not message.metric or message.metric in histograms:
            raise ValueError(f"{where}: a histogram needs a metric name of its own")
        if not counts or len(edges) != len(counts) + 1:
            raise ValueError(f"{where}: {len(edges)} edges for {len(counts)} bins")
        if not all(np.isfinite(edges)) or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"{where}: the edges must be finite and ascending")
        if min(counts) < min_cases:
            raise ValueError(f"{where}: a bin holds {min(counts)} case(s), fewer than {min_cases}")
        if sum(counts) > num_cases:
            raise ValueError(f"{where}: {sum(counts)} cases binned, {num_cases} reported")
        histograms[message.metric] = {"edges": edges, "counts": counts}
    return histograms
