"""The web page's defences (design.md §6) on a real node state: no default credentials, lockout, idle timeout,
CSRF, no session → login or 401, `../` in download paths, cookie flags, the secret key file, headers, audit."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest

from inference.web.audit import AuditLog
from inference.web.auth import LOCKOUT_S, MAX_FAILED_LOGINS, SESSION_IDLE_S, UserStore
from tests.test_web import (
    PASSWORD,
    FakeClock,
    Node,
    csrf_from,
    login,
    make_app,
    new_user,
    web_node,
)

__all__ = ["web_node"]  # the session fixture, shared with tests/test_web.py


def _forbidden(response) -> bool:
    return response.status_code in (400, 404)


def test_fresh_node_has_no_account_and_admin_admin_fails(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    assert store.user_names() == []
    for name, password in (("admin", "admin"), ("admin", ""), ("root", "root")):
        assert store.login(name, password).token is None
    store.close()


def test_without_a_session_pages_redirect_to_login_and_the_api_answers_401(web_node: Node) -> None:
    uid = web_node.study_uid
    with make_app(web_node).test_client() as anonymous:
        for path in ("/studies", f"/studies/{uid}", "/models", f"/studies/{uid}/stroke/mask.nii.gz"):
            response = anonymous.get(path)
            assert response.status_code == 302 and response.headers["Location"].startswith("/login?next=")
        for path in ("/api/studies", f"/api/studies/{uid}", "/api/models", "/api/node",
                     f"/api/studies/{uid}/volumes", f"/api/studies/{uid}/volumes/dwi/0"):
            assert anonymous.get(path).status_code == 401
        anonymous.set_cookie("fedlesion_session", "forged.cookie.value")
        assert anonymous.get("/api/studies").status_code == 401


def test_five_failures_lock_the_account_for_five_minutes(web_node: Node) -> None:
    clock = FakeClock()
    name = new_user(web_node)
    with make_app(web_node, clock).test_client() as client:
        for _ in range(MAX_FAILED_LOGINS - 1):
            assert login(client, name, "wrong password!").status_code == 401
        assert login(client, name, "wrong password!").status_code == 429  # the fifth failure locks
        assert login(client, name).status_code == 429  # the right password too, while locked
        clock.advance(LOCKOUT_S - 1)
        assert login(client, name).status_code == 429
        clock.advance(2)
        assert login(client, name).status_code == 302
    outcomes = [e.get("outcome") for e in AuditLog(web_node.data_dir).events() if e["user"] == name]
    assert outcomes.count("bad-credentials") == MAX_FAILED_LOGINS - 1 and outcomes.count("locked") == 3


def test_a_success_resets_the_failure_count(web_node: Node) -> None:
    name = new_user(web_node)
    with make_app(web_node, FakeClock()).test_client() as client:
        for _ in range(MAX_FAILED_LOGINS - 1):
            login(client, name, "wrong password!")
        assert login(client, name).status_code == 302
        for _ in range(MAX_FAILED_LOGINS - 1):
            assert login(client, name, "wrong password!").status_code == 401


def test_sessions_end_after_30_minutes_idle(web_node: Node) -> None:
    clock = FakeClock()
    with make_app(web_node, clock).test_client() as client:
        login(client, new_user(web_node))
        for _ in range(3):  # activity keeps the session alive past 30 minutes in total
            clock.advance(SESSION_IDLE_S - 60)
            assert client.get("/api/studies").status_code == 200
        clock.advance(SESSION_IDLE_S + 1)
        assert client.get("/api/studies").status_code == 401
        assert client.get("/studies").status_code == 302


def test_logout_ends_the_session_server_side(web_node: Node) -> None:
    with make_app(web_node).test_client() as client:
        login(client, new_user(web_node))
        cookie = client.get_cookie("fedlesion_session").value
        token = csrf_from(client.get("/studies").get_data(as_text=True))
        assert client.post("/logout", data={"csrf_token": token}).status_code == 302
        client.set_cookie("fedlesion_session", cookie)  # replaying the old cookie does not bring it back
        assert client.get("/api/studies").status_code == 401


def test_login_gives_a_new_cookie_and_csrf_token(web_node: Node) -> None:
    with make_app(web_node).test_client() as client:
        before = csrf_from(client.get("/login").get_data(as_text=True))
        login(client, new_user(web_node))
        after = csrf_from(client.get("/studies").get_data(as_text=True))
        assert before != after


def test_forged_or_missing_csrf_tokens_are_refused(web_node: Node) -> None:
    uid = web_node.study_uid
    jobs_before = len(web_node.jobs.jobs_for_study(uid))
    with make_app(web_node).test_client() as client:
        client.get("/login")
        name = new_user(web_node)
        refused = client.post("/login", data={"username": name, "password": PASSWORD, "csrf_token": "forged"})
        assert refused.status_code == 400
        assert client.post("/login", data={"username": name, "password": PASSWORD}).status_code == 400
        login(client, name)
        assert client.post(f"/studies/{uid}/reprocess", data={"csrf_token": "forged"}).status_code == 400
        assert client.post(f"/studies/{uid}/reprocess").status_code == 400
        assert client.post(f"/api/studies/{uid}/reprocess", json={}).status_code == 400
        assert client.post(f"/api/studies/{uid}/reprocess", headers={"X-CSRF-Token": "forged"}).status_code == 400
        assert client.post("/logout", data={"csrf_token": ""}).status_code == 400
        assert client.get("/api/studies").status_code == 200  # still logged in
    assert len(web_node.jobs.jobs_for_study(uid)) == jobs_before


@pytest.mark.parametrize(
    "path",
    [
        "/studies/{uid}/stroke/../../users.sqlite3",
        "/studies/{uid}/stroke/..%2F..%2F..%2Fusers.sqlite3",
        "/studies/{uid}/..%2F..%2Fweb-secret.key/mask.nii.gz",
        "/studies/..%2F..%2F/stroke/mask.nii.gz",
        "/studies/{uid}/stroke/%2E%2E%2Freport.json",
        "/studies/{uid}/stroke/mask.nii.gz%00.txt",
        "/studies/{uid}/stroke/users.sqlite3",
        "/studies/{uid}/../stroke/mask.nii.gz",
        "/api/studies/{uid}/volumes/..%2Fdwi/0",
        "/api/studies/..%2F{uid}/volumes",
    ],
)
def test_dot_dot_in_download_paths_is_refused(web_node: Node, path: str) -> None:
    with make_app(web_node).test_client() as client:
        login(client, new_user(web_node))
        response = client.get(path.format(uid=web_node.study_uid))
    assert _forbidden(response), response.status_code
    assert not response.data.startswith(b"SQLite format 3") and b"\x1f\x8b" not in response.data[:2]


def test_cookie_flags_follow_the_settings(web_node: Node) -> None:
    with make_app(web_node).test_client() as client:
        cookie = login(client, new_user(web_node)).headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    secure = dataclasses.replace(web_node.node_settings, web_secure_cookies=True)
    with make_app(web_node, node_settings=secure).test_client() as client:
        token = csrf_from(client.get("/login").get_data(as_text=True))
        cookie = client.post("/login", data={"username": new_user(web_node), "password": PASSWORD,
                                             "csrf_token": token}).headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie


def test_secret_key_is_generated_once_with_mode_0600(web_node: Node, tmp_path: Path) -> None:
    from inference.web.auth import load_secret_key

    first = load_secret_key(tmp_path)
    path = tmp_path / "web-secret.key"
    assert len(first) == 32 and path.stat().st_mode & 0o777 == 0o600
    assert load_secret_key(tmp_path) == first
    assert make_app(web_node).secret_key == (web_node.data_dir / "web-secret.key").read_bytes()


def test_pages_send_security_headers_and_no_store(web_node: Node) -> None:
    with make_app(web_node).test_client() as client:
        login(client, new_user(web_node))
        response = client.get(f"/studies/{web_node.study_uid}")
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff" and response.headers["Cache-Control"] == "no-store"
    assert "<script>" not in response.get_data(as_text=True)  # CSP forbids inline scripts; none are needed


def test_login_redirect_stays_on_the_site(web_node: Node) -> None:
    with make_app(web_node).test_client() as client:
        response = login(client, new_user(web_node), next_path="//evil.example/x")
        assert response.headers["Location"] == "/studies"
        client.get("/login")
        response = login(client, new_user(web_node), next_path=f"/studies/{web_node.study_uid}")
        assert response.headers["Location"] == f"/studies/{web_node.study_uid}"


def test_audit_rows_name_user_time_action_and_study(web_node: Node) -> None:
    with make_app(web_node).test_client() as client:
        name = new_user(web_node)
        login(client, name)
        client.get(f"/api/studies/{web_node.study_uid}")
        client.get(f"/api/studies/{web_node.study_uid}/volumes")
        client.get(f"/studies/{web_node.study_uid}/stroke/report.json")
    events = [e for e in AuditLog(web_node.data_dir).events() if e["user"] == name]
    assert [(e["action"], e["study_uid"]) for e in events] == [
        ("login", None),
        ("view", web_node.study_uid),
        ("view-images", web_node.study_uid),
        ("download", web_node.study_uid),
    ]
    assert all(e["time"].endswith("+00:00") for e in events)
    assert (web_node.data_dir / "audit" / "audit.jsonl").stat().st_mode & 0o777 == 0o600


def test_user_database_holds_no_password(web_node: Node) -> None:
    new_user(web_node)
    database = web_node.data_dir / "users.sqlite3"
    rows = sqlite3.connect(database).execute("SELECT length(salt), length(hash), scrypt_n FROM users").fetchall()
    assert rows and all(row == (16, 32, 1 << 15) for row in rows)
    assert PASSWORD.encode() not in database.read_bytes()
