"""The HTML pages: login, study list, study page (viewer, lesions, downloads, reprocess), models."""

from __future__ import annotations

import logging

from flask import (
    Blueprint,
    abort,
    current_app,
    g,
    redirect,
    render_template,
    request,
    send_file,
    session,
    url_for,
)

from inference.web.audit import AuditAction
from inference.web.auth import LoginOutcome
from inference.web.data import RESULT_FILES
from inference.web.security import safe_next, start_session
from models.manifest import Task

LOG = logging.getLogger(__name__)
blueprint = Blueprint("pages", __name__)


def _context():
    return current_app.extensions["fedlesion"]


@blueprint.app_context_processor
def _banner() -> dict[str, object]:
    return {"demo_mode": _context().data.demo_mode(), "user": g.get("user")}


@blueprint.get("/")
def index():
    return redirect(url_for("pages.studies"))


@blueprint.route("/login", methods=["GET", "POST"])
def login():
    context = _context()
    message, status = None, 200
    if request.method == "POST":
        name = request.form.get("username", "")[:64]
        result = context.users.login(name, request.form.get("password", ""))
        if result.outcome is LoginOutcome.OK and result.token:
            start_session(result.token)
            context.audit.record(name, AuditAction.LOGIN)
            return redirect(safe_next(request.args.get("next")))
        context.audit.record(name, AuditAction.LOGIN_FAILED, outcome=result.outcome.value)
        LOG.info("login refused (%s)", result.outcome.value)
        message, status = (
            ("This account is locked for 5 minutes after 5 failed logins.", 429)
            if result.outcome is LoginOutcome.LOCKED
            else ("Wrong user name or password.", 401)
        )
    return render_template("login.html", message=message), status


@blueprint.post("/logout")
def logout():
    context = _context()
    context.users.logout(str(session.get("sid", "")))
    context.audit.record(g.user, AuditAction.LOGOUT)
    session.clear()
    return redirect(url_for("pages.login"))


@blueprint.get("/studies")
def studies():
    return render_template("studies.html", studies=_context().data.studies())


@blueprint.get("/studies/<uid>")
def study(uid: str):
    return render_template("study.html", study=_context().view_study(uid, g.user))


@blueprint.post("/studies/<uid>/reprocess")
def reprocess(uid: str):
    _context().reprocess(uid, g.user)
    return redirect(url_for("pages.study", uid=uid))


@blueprint.get("/studies/<uid>/<task>/<name>")
def download(uid: str, task: str, name: str):
    """A result file, looked up by study UID and task in the job table; `name` only picks mask or report."""
    context = _context()
    if task not in {t.short_name for t in Task} or name not in RESULT_FILES:
        abort(404)
    path = context.data.result_file(uid, Task.from_short_name(task), name)
    if path is None:
        abort(404)
    context.audit.record(g.user, AuditAction.DOWNLOAD, uid, task=task, file=name)
    download_name = f"{task}-{name}"
    return send_file(path, mimetype=RESULT_FILES[name], as_attachment=True, download_name=download_name)


@blueprint.get("/models")
def models():
    context = _context()
    return render_template(
        "models.html", status=context.data.models_status(), is_admin=context.users.is_admin(g.user)
    )


@blueprint.post("/models/<task>/install")
def install_model(task: str):
    version = request.form.get("version", "")
    if not version.isdigit():
        abort(400, description="version must be a number")
    _context().install_model(task, int(version), g.user)
    return redirect(url_for("pages.models"))
