"""`/healthz` and Prometheus `/metrics`: no login (a load balancer and a scraper call them), so neither carries
anything but counts, versions and UIDs-free numbers; never a patient name, ID or birth date (design.md §6)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from inference.web.metrics import render_metrics
from models.prometheus import CONTENT_TYPE
from models.version import distribution_version

blueprint = Blueprint("ops", __name__)


@blueprint.get("/healthz")
def healthz():
    status = current_app.extensions["fedlesion"].data.models_status()
    versions = {
        task: (entry["serving"] or {}).get("version") for task, entry in status.get("tasks", {}).items()
    }
    return jsonify(ok=True, fedlesion=distribution_version(), demo_mode=status.get("demo_mode"), models=versions)


@blueprint.get("/metrics")
def metrics():
    text = render_metrics(current_app.extensions["fedlesion"].data)
    return Response(text, content_type=CONTENT_TYPE)
