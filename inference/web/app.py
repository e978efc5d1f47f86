"""The web page's app factory: plain objects in, a Flask app out; `fedlesion node` serves it with waitress."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, abort, jsonify
from werkzeug.exceptions import HTTPException

from dicom_gateway.settings import DicomSettings
from inference.settings import NodeSettings
from inference.web import security
from inference.web.audit import AuditAction, AuditLog
from inference.web.auth import UserStore, load_secret_key
from inference.web.data import NodeData
from models.errors import PackageRefused
from models.manifest import Task

LOG = logging.getLogger(__name__)


@dataclass
class WebContext:
    """What the views reach through `current_app.extensions["fedlesion"]`."""

    data: NodeData
    users: UserStore
    audit: AuditLog

    def view_study(self, uid: str, user: str) -> dict[str, Any]:
        """The study page's data (404 when unknown), written to the audit log as a view; for page and API alike."""
        detail = self.data.study(uid)
        if detail is None:
            abort(404)
        self.audit.record(user, AuditAction.VIEW, uid)
        return detail

    def reprocess(self, uid: str, user: str) -> list[int]:
        """New jobs for the study's latest revision (404 unknown, 409 not complete yet), audited."""
        if self.data.study(uid) is None:
            abort(404)
        try:
            created = self.data.reprocess(uid)
        except ValueError as error:  # not complete yet: no job to repeat
            abort(409, description=str(error))
        self.audit.record(user, AuditAction.REPROCESS, uid)
        return created

    def install_model(self, task_value: str, version: int, user: str) -> dict[str, Any]:
        """Serve a pending version now (admins only: 403), audited with its outcome; 404 for a task this node
        does not run, 409 when the version is not in the registry or is refused (the old model keeps serving)."""
        if not self.users.is_admin(user):
            abort(403, description="only an admin may install a model version")
        models = self.data.models
        if task_value not in {task.value for task in models.tasks}:
            abort(404)
        try:
            serving = models.install_version(Task(task_value), version, by=user)
        except (PackageRefused, OSError) as error:
            self.audit.record(user, AuditAction.MODEL_INSTALL, task=task_value, version=version,
                              outcome=f"refused: {type(error).__name__}")
            abort(409, description=f"{type(error).__name__}: {error}")
        except ValueError as error:  # not in the registry
            abort(409, description=str(error))
        self.audit.record(user, AuditAction.MODEL_INSTALL, task=task_value, version=version, outcome="installed")
        return serving.describe()


def create_app(
    data_dir: Path | str,
    node: NodeSettings,
    dicom: DicomSettings,
    *,
    studies: Any,
    jobs: Any,
    models: Any,
    outbox: Any,
    puller: Any = None,
    clock: Callable[[], float] = time.time,
) -> Flask:
    """`node` gives the cookie policy, `dicom` the disk watermark shown; `studies` a dicom_gateway StudyIndex, `jobs` an inference JobQueue, `models` a ModelService, `outbox` a
    dicom_gateway Outbox, `puller` the node's ModelPuller (None: the node does not pull); `clock` drives lockout and
    session timeout (tests pass a fake one)."""
    from inference.web import api, ops, pages

    data_dir = Path(data_dir)
    app = Flask(__name__)
    app.secret_key = load_secret_key(data_dir)
    security.install(app, secure_cookies=node.web_secure_cookies)
    app.extensions["fedlesion"] = WebContext(
        data=NodeData(data_dir, dicom, studies=studies, jobs=jobs, models=models, outbox=outbox, puller=puller),
        users=UserStore(data_dir, clock=clock),
        audit=AuditLog(data_dir, clock=clock),
    )
    app.register_blueprint(pages.blueprint)
    app.register_blueprint(api.blueprint)
    app.register_blueprint(ops.blueprint)
    app.register_error_handler(HTTPException, _error)
    return app


def _error(error: HTTPException) -> Any:
    """Errors as a short JSON or text body, never a page that echoes the request."""
    from flask import request

    if request.path.startswith("/api/"):
        response = jsonify(error=error.name, detail=error.description)
        response.status_code = error.code or 500
        return response
    return f"{error.code} {error.name}: {error.description}\n", error.code or 500, {"Content-Type": "text/plain"}
