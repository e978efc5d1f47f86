"""Prometheus text exposition of the node's state, computed from its databases at scrape time (format:
models.prometheus).

The numbers come from SQLite, which survives restarts, so gauges (not process-local counters) are the right type.
Label values are fixed vocabularies (states, tasks, stages): no study, patient or free text reaches a label.
"""

from __future__ import annotations

from inference.jobs import Job
from inference.web.data import NodeData
from models.prometheus import exposition, family, sample

LATENCY_BUCKETS_S = (1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _histogram(name: str, values_by_task: dict[str, list[float]]) -> list[str]:
    lines = []
    for task, values in sorted(values_by_task.items()):
        for bound in LATENCY_BUCKETS_S:
            lines.append(sample(f"{name}_bucket", sum(v <= bound for v in values), {"task": task, "le": str(bound)}))
        lines.append(sample(f"{name}_bucket", len(values), {"task": task, "le": "+Inf"}))
        lines.append(sample(f"{name}_sum", round(sum(values), 3), {"task": task}))
        lines.append(sample(f"{name}_count", len(values), {"task": task}))
    return lines


def _latencies(jobs: list[Job]) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[tuple[str, str], float]]:
    run: dict[str, list[float]] = {}
    turnaround: dict[str, list[float]] = {}
    stages: dict[tuple[str, str], list[float]] = {}
    for job in jobs:
        if job.task is None or job.finished_at is None:
            continue
        if job.duration_s is not None:
            run.setdefault(job.task.short_name, []).append(job.duration_s)
        turnaround.setdefault(job.task.short_name, []).append(job.finished_at - job.created_at)
        for stage, seconds in (job.result.timings if job.result else {}).items():
            stages.setdefault((job.task.short_name, str(stage)), []).append(float(seconds))
    means = {key: sum(values) / len(values) for key, values in stages.items()}
    return run, turnaround, means


def render_metrics(data: NodeData) -> str:
    out: list[str] = []
    out += family("fedlesion_jobs", "gauge", "Jobs in the queue database by state.",
                  (sample("fedlesion_jobs", n, {"state": s.value}) for s, n in data.jobs.counts().items()))
    run, turnaround, stage_means = _latencies(data.finished_jobs())
    out += family("fedlesion_job_run_seconds", "histogram", "Done jobs: claim to finish.", _histogram(
        "fedlesion_job_run_seconds", run))
    out += family("fedlesion_job_turnaround_seconds", "histogram", "Done jobs: study ready to finish.", _histogram(
        "fedlesion_job_turnaround_seconds", turnaround))
    out += family("fedlesion_job_stage_seconds_mean", "gauge", "Done jobs: mean seconds per pipeline stage.", (
        sample("fedlesion_job_stage_seconds_mean", round(v, 4), {"task": t, "stage": s})
        for (t, s), v in sorted(stage_means.items())))
    status = data.models_status()
    versions = [(task, (entry.get("serving") or {}).get("version")) for task, entry in status.get("tasks", {}).items()]
    out += family("fedlesion_model_version", "gauge", "Model version served per task (0: none).",
                  (sample("fedlesion_model_version", v or 0, {"task": t}) for t, v in sorted(versions)))
    out += family("fedlesion_demo_mode", "gauge", "1 when the node serves demo-signed models.",
                  [sample("fedlesion_demo_mode", 1 if status.get("demo_mode") else 0)])
    out += family("fedlesion_model_refusals", "gauge", "Model packages refused since start.",
                  [sample("fedlesion_model_refusals", len(status.get("refusals", [])))])
    disk = data.disk()
    out += family("fedlesion_disk_free_bytes", "gauge", "Free bytes on the data directory's filesystem.",
                  [sample("fedlesion_disk_free_bytes", disk.free_bytes)])
    out += family("fedlesion_disk_watermark_bytes", "gauge", "Stores are refused below this many free bytes.",
                  [sample("fedlesion_disk_watermark_bytes", disk.min_free_bytes)])
    out += family("fedlesion_disk_low", "gauge", "1 when free space is under the watermark.",
                  [sample("fedlesion_disk_low", 1 if disk.low else 0)])
    out += family("fedlesion_outbox_deliveries", "gauge", "Output deliveries by state (pending, sent, dead-letter).",
                  (sample("fedlesion_outbox_deliveries", n, {"state": s.value}) for s, n in data.outbox.counts().items()))
    studies: dict[str, int] = {}
    for record in data.studies_index.list_studies():
        studies[record.state] = studies.get(record.state, 0) + 1
    out += family("fedlesion_studies", "gauge", "Studies in the studies table by state.",
                  (sample("fedlesion_studies", n, {"state": s}) for s, n in sorted(studies.items())))
    return exposition(out)
