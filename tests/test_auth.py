"""Browser-grade access: sessions (the API token or a user list), the bearer token everywhere, the
Origin check on cookie-authenticated POSTs, CORS preflights, and ``drh-pacs users``.

The application is the real one (:func:`plugin.http.app.create_app`) over a real Redis, called with
Starlette's TestClient (no server process: these are checks of the guard, not of the network).
"""

from __future__ import annotations

import io
import sys

import pytest
from starlette.testclient import TestClient

from plugin.http import auth
from tests.helpers.peers import make_settings

TOKEN = "test-token"


@pytest.fixture
def settings(tmp_path, redis_server):
    return make_settings(tmp_path, redis_server.url, api_token=TOKEN, cors_origins=["https://ohif.example.org"])


@pytest.fixture
def app(settings, store):
    from plugin.http.app import ApiContext, create_app

    return create_app(ApiContext(settings=settings, store=store))


def _add_user(settings, name: str, password: str) -> None:
    users = auth.read_users(settings.users_path) if settings.users_path.exists() else {}
    users[name] = auth.hash_password(password)
    auth.write_users(settings.users_path, users)


def test_passwords_are_stored_as_scrypt_hashes():
    encoded = auth.hash_password("correct horse battery")
    assert encoded.startswith("scrypt$") and "correct" not in encoded
    assert auth.verify_password("correct horse battery", encoded)
    assert not auth.verify_password("correct horse batterY", encoded)
    assert not auth.verify_password("x", "md5$abc")
    assert auth.hash_password("same") != auth.hash_password("same")  # salted


def test_sessions_are_signed_expire_and_end_with_their_credential(tmp_path):
    users = auth.Users(tmp_path / "users")
    auth.write_users(users.path, {"alice": auth.hash_password("alice-password")})
    sessions = auth.Sessions(b"k" * 64, "the-token", users, hours=1)
    value = sessions.issue("user", "alice", now=1000.0)
    assert sessions.check(value, now=1001.0) == auth.Principal("user", "alice", "session")
    assert sessions.check(value, now=1000.0 + 3601) is None  # expired
    payload, _, mac = value.partition(".")
    forged = auth._b64(auth._unb64(payload).replace(b"alice", b"admin")) + "." + mac
    assert sessions.check(forged, now=1001.0) is None
    assert sessions.check("garbage", now=1001.0) is None
    # a new password (or removing the user) ends the sessions issued with the old one
    auth.write_users(users.path, {"alice": auth.hash_password("another-password")})
    assert sessions.check(value, now=1001.0) is None
    token_session = sessions.issue("token", "token", now=1000.0)
    assert sessions.check(token_session, now=1001.0) is not None
    rotated = auth.Sessions(b"k" * 64, "a-new-token", users, hours=1)
    assert rotated.check(token_session, now=1001.0) is None  # a changed API token ends token sessions
    other_secret = auth.Sessions(b"x" * 64, "the-token", users, hours=1)
    assert other_secret.check(token_session, now=1001.0) is None


def test_the_session_secret_survives_a_restart(settings):
    first = settings.resolved_session_secret()
    assert settings.resolved_session_secret() == first and len(first) >= 32
    assert (settings.data_dir / "session-secret").stat().st_mode & 0o077 == 0


def test_login_with_the_token_or_a_user_and_what_a_session_opens(app, settings):
    _add_user(settings, "alice", "alice-password")
    browser = TestClient(app, base_url="http://drh.test")
    assert browser.get("/api/status").status_code == 401
    page = browser.get("/status", headers={"Accept": "text/html"}, follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login?next=%2Fstatus"
    assert browser.post("/login", data={"password": "nope"}).status_code == 401
    assert browser.post("/login", data={"username": "alice", "password": "wrong-password"}).status_code == 401
    assert browser.post("/login", data={"username": "bob", "password": "alice-password"}).status_code == 401
    login = browser.post(
        "/login", data={"username": "alice", "password": "alice-password", "next": "/status"}, follow_redirects=False
    )
    assert login.status_code == 303 and login.headers["location"] == "/status"
    assert browser.get("/api/session").json() == {"user": "alice", "kind": "user", "via": "session"}
    assert browser.get("/status").status_code == 200 and "drh-pacs status" in browser.get("/status").text
    assert browser.get("/api/status").status_code == 200
    assert browser.get("/api/page").json()["user"] == "alice"
    # what only machines use stays token-only
    assert browser.get("/metrics").status_code == 401
    assert browser.get("/api/instances/1.2.3/file").status_code == 401
    browser.get("/logout")
    assert browser.get("/api/status").status_code == 401


def test_the_bearer_token_keeps_working_everywhere(app):
    client = TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})
    for path in ("/api/status", "/status", "/metrics", "/api/page", "/similar", "/api/session"):
        assert client.get(path).status_code == 200, path
    wrong = TestClient(app, headers={"Authorization": "Bearer nope"})
    assert wrong.get("/api/status").status_code == 401
    assert wrong.get("/api/status").json()["error"] == "wrong bearer token"


def test_a_viewers_own_bearer_token_does_not_hide_the_session(app):
    """OHIF with OpenID Connect sends its own token to every DICOMweb server: the session decides."""
    browser = TestClient(app)
    browser.post("/login", data={"password": TOKEN})
    assert browser.get("/api/status", headers={"Authorization": "Bearer oidc-token"}).status_code == 200
    browser.cookies.clear()
    assert browser.get("/api/status", headers={"Authorization": "Bearer oidc-token"}).status_code == 401
    assert TestClient(app).get("/health").status_code == 200


def test_login_redirects_only_inside_the_site(app):
    browser = TestClient(app)
    for target in ("https://evil.example.com/", "//evil.example.com/x", "/\\evil.example.com"):
        login = browser.post("/login", data={"password": TOKEN, "next": target}, follow_redirects=False)
        assert login.headers["location"] == "/similar", target


def test_a_cookie_post_from_another_site_is_refused(app):
    browser = TestClient(app, base_url="http://drh.test")
    browser.post("/login", data={"password": TOKEN})
    cross = browser.post("/api/failures/all/retry", headers={"Origin": "https://evil.example.com"})
    assert cross.status_code == 403
    assert browser.post("/api/failures/all/retry").status_code == 403  # no Origin at all: refused too
    same = browser.post("/api/failures/all/retry", headers={"Origin": "http://drh.test"})
    assert same.status_code == 503 and "Celery" in same.json()["error"]  # through the guard, to the handler
    allowed = browser.post("/api/failures/all/retry", headers={"Origin": "https://ohif.example.org"})
    assert allowed.status_code == 503


def test_failed_logins_are_throttled_per_address(app):
    browser = TestClient(app)
    for _ in range(auth.MAX_FAILURES):
        assert browser.post("/login", data={"password": "nope"}).status_code == 401
    blocked = browser.post("/login", data={"password": TOKEN})
    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) > 0


def test_preflight_is_never_401(app):
    client = TestClient(app)
    allowed = client.options(
        "/api/similar/upload",
        headers={"Origin": "https://ohif.example.org", "Access-Control-Request-Method": "POST"},
    )
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://ohif.example.org"
    headers = {"Origin": "https://x.example.com", "Access-Control-Request-Method": "GET"}
    other = client.options("/dicom-web/similar/studies", headers=headers)
    assert other.status_code == 400


def test_open_readonly_opens_the_status_json_too(tmp_path, redis_server, store):
    from plugin.http.app import ApiContext, create_app

    settings = make_settings(tmp_path, redis_server.url, api_token=TOKEN, api_open_readonly=True)
    client = TestClient(create_app(ApiContext(settings=settings, store=store)))
    assert client.get("/api/status").status_code == 200
    assert client.get("/status").status_code == 200
    assert client.get("/dicom-web/studies", params={"StudyInstanceUID": "1.2.3"}).status_code == 401


def test_users_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DRH_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "stdin", io.StringIO("a-long-password\n"))
    assert auth.main(["add", "carol", "--password-stdin"]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    assert auth.main(["add", "dave", "--password-stdin"]) == 1  # too short
    assert auth.main(["add", "bad name!", "--password-stdin"]) == 2
    capsys.readouterr()
    assert auth.main(["list"]) == 0
    assert capsys.readouterr().out.split() == ["carol"]
    users = auth.Users(tmp_path / "http-users")
    assert users.check("carol", "a-long-password") and not users.check("carol", "a-long-passworD")
    assert (tmp_path / "http-users").stat().st_mode & 0o077 == 0
    assert auth.main(["remove", "carol"]) == 0
    assert not users.check("carol", "a-long-password")
    assert auth.main(["remove", "carol"]) == 1
    capsys.readouterr()
    assert auth.main(["list"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "no users in" in err and "only the API token logs in" in err
