"""Login sessions and CSRF for every request (design.md §6).

The Flask session (a signed cookie: HttpOnly, SameSite=Strict, Secure behind TLS) holds only a random session token
and a CSRF token. The token names a server-side session in `UserStore`, which enforces the idle timeout and logout.
Every POST, the login form's included, must carry the CSRF token: a form field `csrf_token` or, for JSON requests,
the `X-CSRF-Token` header; anything else is refused with 400 before the view runs.
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlsplit

from flask import (
    Flask,
    Response,
    abort,
    current_app,
    g,
    jsonify,
    redirect,
    request,
    session,
    url_for,
)

from inference.web.auth import UserStore

PUBLIC_ENDPOINTS = frozenset({"pages.login", "ops.healthz", "ops.metrics", "static"})
CSRF_HEADER = "X-CSRF-Token"
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)


def csrf_token() -> str:
    """The session's CSRF token, created on first use (the login form gets one before anyone is logged in)."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return str(session["csrf"])


def start_session(token: str) -> None:
    """A fresh cookie after login: a new CSRF token, nothing carried over from before (no session fixation)."""
    session.clear()
    session["sid"] = token
    session["csrf"] = secrets.token_urlsafe(32)


def safe_next(target: str | None) -> str:
    """A same-site path to go to after login; anything else (other hosts, `//host`, `\\`) goes to the study list."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return url_for("pages.studies")
    parts = urlsplit(target)
    return target if not parts.scheme and not parts.netloc else url_for("pages.studies")


def _is_api() -> bool:
    return request.path.startswith("/api/")


def _check_csrf() -> None:
    sent = request.headers.get(CSRF_HEADER) or request.form.get("csrf_token", "")
    expected = session.get("csrf")
    if not expected or not sent or not hmac.compare_digest(str(sent), str(expected)):
        abort(400, description="missing or wrong CSRF token")


def _authenticate() -> Response | None:
    if request.method == "POST":
        _check_csrf()
    if request.endpoint in PUBLIC_ENDPOINTS or request.endpoint is None:
        return None
    users: UserStore = current_app.extensions["fedlesion"].users
    token = session.get("sid")
    user = users.session_user(str(token)) if token else None
    if user is None:
        session.pop("sid", None)
        if _is_api():
            response = jsonify(error="login required")
            response.status_code = 401
            return response
        return redirect(url_for("pages.login", next=request.full_path.rstrip("?")))
    g.user = user
    return None


def _headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    if request.endpoint != "static":
        response.headers["Cache-Control"] = "no-store"
    return response


def install(app: Flask, *, secure_cookies: bool) -> None:
    app.config.update(
        SESSION_COOKIE_NAME="fedlesion_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=secure_cookies,
        MAX_CONTENT_LENGTH=64 * 1024,  # forms and JSON posts are tiny; nothing is uploaded
    )
    app.before_request(_authenticate)
    app.after_request(_headers)
    app.jinja_env.globals["csrf_token"] = csrf_token
