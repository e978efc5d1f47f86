"""What the coordinator's operators see besides `coordinator status`: each plan's per-round report (a CSV and a PNG
of validation Dice per site over the rounds) and Prometheus `/metrics` on a port of its own.

Both are computed from `CoordinatorState.status()`, the state database that survives restarts, so a restarted
`serve` reports every round again; only the bytes on the wire are counted in the process (a Prometheus counter,
reset by a restart as counters may be). They hold what the coordinator already holds: per site the aggregates its
update or evaluation carried (site.SHARED_METRICS), per round counts and times; nothing per case or per patient,
and no free text (refusal reasons stay in `coordinator status`).
"""

from __future__ import annotations

import csv
import io
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from models.durable import write_atomic, write_text_atomic
from models.federation.roles import SiteRole
from models.prometheus import CONTENT_TYPE, exposition, family, sample
from models.settings import tcp_port
from training.federation.site import SHARED_METRICS

log = logging.getLogger(__name__)

REPORT_CSV = "metrics.csv"
REPORT_PNG = "val_dice.png"
CSV_FIELDS = ("round", "version", "closed_at", "round_seconds", "site", "role", "cases", *SHARED_METRICS)
METRICS_PATH = "/metrics"
LEGEND_MAX_SITES = 16  # beyond this many sites the plot's legend would hide the curves


def site_metrics_by_round(rounds: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each closed round of `status()["rounds"]` as {"round", "version", "seconds" (opened to closed), "sites":
    {site: {"role", "cases", metric: value, ...}}, "bytes": {site: {"down": n, "up": n}}}: a trainer's aggregates
    came with its accepted update (its locally trained model), an evaluator's with its report on the round's
    candidate (scored as a node runs it); the bytes are the round's streams, as the coordinator counted them."""
    out = []
    for round_ in rounds:
        if not round_["version"]:
            continue
        sites = {name: {"role": SiteRole.TRAINER.value, **values} for name, values in round_["metrics"].items()}
        sites |= {name: {"role": SiteRole.EVALUATOR.value, **values}
                  for name, values in round_["evaluations"].items()}
        seconds = (round_["closed_at"] - round_["opened_at"]) if round_.get("closed_at") else None
        out.append({"round": round_["round"], "version": round_["version"], "closed_at": round_.get("closed_at"),
                    "seconds": seconds, "sites": sites, "bytes": round_["bytes"]})
    return out


def plot_site_dice(axes: Any, rounds: Iterable[Mapping[str, Any]]) -> int:
    """Each site's validation Dice over `rounds` (site_metrics_by_round's) on `axes`: trainers solid, evaluators
    dashed. Returns the number of sites drawn."""
    from matplotlib.ticker import MaxNLocator

    series: dict[str, tuple[str, list[tuple[int, float]]]] = {}
    for round_ in rounds:
        for site, values in round_["sites"].items():
            if values.get("val_dice") is not None:
                series.setdefault(site, (values["role"], []))[1].append((round_["round"], values["val_dice"]))
    for site, (role, points) in sorted(series.items()):
        axes.plot(*zip(*sorted(points)), marker="o", linestyle="-" if role == SiteRole.TRAINER.value else "--",
                  label=f"{site} ({role})")
    numbers = [number for _, points in series.values() for number, _ in points]
    if numbers:  # half a round of margin: one round alone would get fractional ticks
        axes.set_xlim(min(numbers) - 0.5, max(numbers) + 0.5)
    axes.set(xlabel="round", ylim=(0, 1))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if 0 < len(series) <= LEGEND_MAX_SITES:
        axes.legend(fontsize=7)
    return len(series)


def write_round_report(status: Mapping[str, Any], plan_sha256: str, directory: Path, *, plot: bool = True
                       ) -> tuple[Path, Path | None] | None:
    """`directory`/metrics.csv (a row per round, site and role) and, with `plot`, val_dice.png for the plan's closed
    rounds, each written atomically; the paths written (None for a plot not drawn), or None (nothing written) before
    the first round closes."""
    rounds = site_metrics_by_round(r for r in status["rounds"] if r["plan_sha256"] == plan_sha256)
    if not rounds:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    csv_path = write_text_atomic(directory / REPORT_CSV, _csv_text(rounds))
    if not plot:
        return csv_path, None
    return csv_path, write_atomic(directory / REPORT_PNG, lambda temp: _plot(rounds, plan_sha256, temp))


def _csv_text(rounds: list[dict[str, Any]]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for round_ in rounds:
        closed = datetime.fromtimestamp(round_["closed_at"], timezone.utc).isoformat(timespec="seconds")
        trainers_first = sorted(round_["sites"].items(), key=lambda item: (item[1]["role"] != SiteRole.TRAINER, item[0]))
        for site, values in trainers_first:
            writer.writerow({**values, "round": round_["round"], "version": round_["version"], "closed_at": closed,
                             "round_seconds": f"{round_['seconds']:.2f}", "site": site})
    return text.getvalue()


def _plot(rounds: list[dict[str, Any]], plan_sha256: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    drawn = plot_site_dice(axes, rounds)
    axes.set(ylabel="validation Dice", title=f"plan {plan_sha256[:12]}: validation Dice per site"
             + ("" if drawn else " (no site reported one yet)"))
    figure.text(0.01, 0.01, "solid: a trainer's locally trained model, before aggregation; dashed: an evaluator's "
                "score of the round's candidate", fontsize=7, color="dimgray")
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path, format="png", dpi=100)


# -- Prometheus ----------------------------------------------------------------------------------------------------
class Traffic:
    """Bytes of gRPC messages (serialized) the coordinator received and sent since it started; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.received = 0
        self.sent = 0

    def add(self, received: int, sent: int) -> None:
        """transport.ByteCount: one message's bytes."""
        with self._lock:
            self.received += received
            self.sent += sent


def render_metrics(status: Mapping[str, Any], plan_sha256: str, rounds_planned: int, traffic: Traffic, *,
                   alive_after: float, now: float) -> str:
    """The coordinator's `/metrics` body: the plan's rounds, sites by role and state and alive (heard from since
    `alive_after`), refused updates, bytes on the wire. Labels are roles, states and directions only."""
    rounds = [r for r in status["rounds"] if r["plan_sha256"] == plan_sha256]
    closed = [r for r in rounds if r["state"] == "closed"]
    open_ = next((r for r in rounds if r["state"] == "open"), None)
    current = open_ or (closed[-1] if closed else None)
    last_seconds = (closed[-1]["closed_at"] - closed[-1]["opened_at"]) if closed else 0.0
    by_state: dict[tuple[str, str], int] = {}
    alive = {role.value: 0 for role in SiteRole}
    for site in status["sites"]:
        by_state[(site["role"], site["state"])] = by_state.get((site["role"], site["state"]), 0) + 1
        if site["state"] == "active" and (site["last_seen"] or 0) >= alive_after:
            alive[site["role"]] = alive.get(site["role"], 0) + 1
    name = "fedlesion_federation_"
    out: list[str] = []
    out += family(f"{name}rounds_planned", "gauge", "Rounds in the plan being served.",
                  [sample(f"{name}rounds_planned", rounds_planned)])
    out += family(f"{name}round", "gauge", "The open round, else the last closed one (0: none yet).",
                  [sample(f"{name}round", current["round"] if current else 0)])
    out += family(f"{name}round_open", "gauge", "1 while a round is open.", [sample(f"{name}round_open", int(bool(open_)))])
    out += family(f"{name}round_attempt", "gauge", "Attempt of the open round (retried below quorum at its deadline).",
                  [sample(f"{name}round_attempt", open_["attempt"] if open_ else 0)])
    out += family(f"{name}round_age_seconds", "gauge", "Seconds since the open round opened (0: none open).",
                  [sample(f"{name}round_age_seconds", round(now - open_["opened_at"], 3) if open_ else 0)])
    out += family(f"{name}rounds_closed", "gauge", "Closed rounds of the plan (each a candidate version).",
                  [sample(f"{name}rounds_closed", len(closed))])
    out += family(f"{name}round_duration_seconds", "gauge", "The last closed round, opened to closed (0: none yet).",
                  [sample(f"{name}round_duration_seconds", round(last_seconds, 3))])
    out += family(f"{name}round_updates_accepted", "gauge", "Updates accepted in the open round so far.",
                  [sample(f"{name}round_updates_accepted", len(open_["contributors"]) if open_ else 0)])
    out += family(f"{name}refused_updates", "gauge",
                  "Updates refused over the plan's rounds (on arrival, at screening, or the site's policy).",
                  [sample(f"{name}refused_updates", sum(len(r["rejected"]) for r in rounds))])
    out += family(f"{name}sites", "gauge", "Enrolled sites by role and state.",
                  (sample(f"{name}sites", n, {"role": role, "state": state}) for (role, state), n in sorted(by_state.items())))
    out += family(f"{name}sites_alive", "gauge", "Active sites heard from within the heartbeat timeout, by role.",
                  (sample(f"{name}sites_alive", n, {"role": role}) for role, n in sorted(alive.items())))
    out += family(f"{name}bytes_total", "counter", "Bytes of gRPC messages received and sent since serve started.",
                  [sample(f"{name}bytes_total", traffic.received, {"direction": "received"}),
                   sample(f"{name}bytes_total", traffic.sent, {"direction": "sent"})])
    return exposition(out)


class MetricsServer:
    """`GET /metrics` over plain HTTP on its own port (a Prometheus scraper has no site certificate), in daemon
    threads; `render` is called per scrape. Binds to loopback unless told otherwise."""

    def __init__(self, render: Callable[[], str], port: int, host: str = "127.0.0.1") -> None:
        if problem := tcp_port(port):
            raise ValueError(f"metrics port {port} {problem}")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?", 1)[0] != METRICS_PATH:
                    self.send_error(404)
                    return
                try:
                    body = render().encode("utf-8")
                except Exception:  # a scrape must not take serve down; the scraper sees the failure
                    log.exception("rendering /metrics failed")
                    self.send_error(500)
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - scrapes are not worth a line
                log.debug("metrics: " + format, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host, self.port = host, int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever, which never ran otherwise
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()


__all__ = ["CSV_FIELDS", "MetricsServer", "REPORT_CSV", "REPORT_PNG", "Traffic", "plot_site_dice", "render_metrics",
           "site_metrics_by_round", "write_round_report"]
