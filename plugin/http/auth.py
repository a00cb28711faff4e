"""Who may use the HTTP API: a bearer token (scripts, workers, viewers) or a browser session (people).

A browser cannot send ``Authorization: Bearer`` on a link a radiologist clicks, so the page, the
DICOMweb routes, the similar searches and the status pages also accept a session: a cookie issued by
``POST /login`` to whoever gives the API token or the name and password of a configured user
(``Settings.users_path``, written by ``drh-pacs users``). The cookie is ``HttpOnly`` (no script reads
it), ``SameSite=Lax`` (not sent by another site's requests, except a top-level link such as the
viewer's "Similar cases" button) and ``Secure`` when the request came over HTTPS.

Sessions are signed, not stored: ``kind|name|expiry`` with an HMAC whose key is derived from the
secret in data_dir (it survives restarts) *and* from what the principal logged in with: the API token
for a token session, the stored password hash for a user. Changing the token or a password, or
removing the user, ends their sessions; deleting ``data_dir/session-secret`` ends all of them.

A state-changing request (POST) that relies on the cookie must come from this origin or one allowed
by ``Settings.cors_origins`` (the ``Origin`` header): another site cannot make a logged-in browser
retry failures or send studies (CSRF). CORS itself is Starlette's ``CORSMiddleware``, outside this
one, so a browser's preflight is answered before any credential is asked for.

Failed logins are logged with the name tried and the client address, and a client address with too
many failures is refused for a while (HTTP 429): user passwords can be weak, the token is not.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import html
import logging
import os
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from plugin.core.settings import Settings

log = logging.getLogger("drh.auth")

SESSION_COOKIE = "drh_session"
TOKEN_PRINCIPAL = "token"

# Paths that answer without any credential: liveness (a load balancer has no token), the login
# form, and the page's static files (no patient data in them; the login form needs its stylesheet).
ALWAYS_OPEN = ("/health", "/login", "/logout")
OPEN_PREFIXES = ("/static/",)
# Read-only paths opened by Settings.api_open_readonly.
READONLY_OPEN_PREFIXES = ("/ready", "/metrics", "/status", "/api/status")
# A session is accepted wherever the bearer token is, except on what only machines use: /metrics
# (Prometheus has the token) and the spooled-file download of remote workers.
SESSION_EXCLUDED = ("/metrics", "/api/instances/")
# Pages a browser navigates to: without a credential they redirect to the login form.
BROWSER_PAGES = ("/", "/similar", "/status")
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}

USER_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
# scrypt with the parameters OWASP recommends for interactive logins (16 MiB of memory per check).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MAX_FAILURES = 10
FAILURE_WINDOW_S = 600.0


# -- passwords and the users file -------------------------------------------------------------------
def hash_password(password: str) -> str:
    """``scrypt$N$r$p$salt$hash`` (hex) for the users file; never the password itself."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        computed = hashlib.scrypt(
            password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=len(digest) // 2
        )
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(computed.hex(), digest)


class Users:
    """The users file (``name:hash`` lines), re-read when it changes so ``drh-pacs users`` needs no restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[float, int] | None = None
        self._users: dict[str, str] = {}

    def _current(self) -> dict[str, str]:
        try:
            st = self.path.stat()
            stamp: tuple[float, int] | None = (st.st_mtime, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._users = read_users(self.path) if stamp else {}
                self._stamp = stamp
            return self._users

    def password_hash(self, name: str) -> str | None:
        return self._current().get(name)

    def check(self, name: str, password: str) -> bool:
        encoded = self.password_hash(name)
        if encoded is None:
            verify_password(password, _DUMMY_HASH)  # same time whether the name exists or not
            return False
        return verify_password(password, encoded)


_DUMMY_HASH = "scrypt$16384$8$1$" + "00" * 16 + "$" + "00" * 32


def read_users(path: Path) -> dict[str, str]:
    """The users file as name -> hash; a malformed line is skipped and logged (never half-trusted)."""
    users: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, encoded = line.partition(":")
        if not sep or not USER_NAME.match(name) or not encoded.startswith("scrypt$"):
            log.error("%s line %d is not name:scrypt-hash; ignored", path, n)
            continue
        users[name] = encoded
    return users


def write_users(path: Path, users: dict[str, str]) -> None:
    """Replace the users file atomically, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("# drh-pacs browser users: name:scrypt-hash (drh-pacs users add|remove|list)\n")
        for name, encoded in sorted(users.items()):
            fh.write(f"{name}:{encoded}\n")
    os.replace(tmp, path)


# -- sessions ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Principal:
    """Who made a request: ``kind`` is ``token`` (the API token, as bearer or session) or ``user``."""

    kind: str
    name: str
    via: str  # "bearer", "session" or "open"


class Sessions:
    """Issue and check signed session cookies (see the module docstring for what the key covers)."""

    def __init__(self, secret: bytes, token: str, users: Users, hours: float) -> None:
        self.secret = secret
        self.token = token
        self.users = users
        self.lifetime = hours * 3600.0

    def _key(self, kind: str, name: str) -> bytes | None:
        if kind == "token":
            basis = "token\0" + self.token
        else:
            encoded = self.users.password_hash(name)
            if encoded is None:
                return None
            basis = "user\0" + name + "\0" + encoded
        return hmac.new(self.secret, basis.encode(), hashlib.sha256).digest()

    def issue(self, kind: str, name: str, now: float | None = None) -> str:
        expires = int((now or time.time()) + self.lifetime)
        payload = f"{kind}|{name}|{expires}"
        key = self._key(kind, name)
        assert key is not None, "a session is issued only after a successful login"
        mac = hmac.new(key, payload.encode(), hashlib.sha256).digest()
        return _b64(payload.encode()) + "." + _b64(mac)

    def check(self, value: str, now: float | None = None) -> Principal | None:
        try:
            raw_payload, _, raw_mac = value.partition(".")
            payload = _unb64(raw_payload).decode()
            kind, name, expires = payload.split("|")
            mac = _unb64(raw_mac)
        except (ValueError, UnicodeDecodeError):
            return None
        if kind not in {"token", "user"} or not expires.isdigit() or int(expires) < (now or time.time()):
            return None
        key = self._key(kind, name)
        if key is None:
            return None
        if not hmac.compare_digest(mac, hmac.new(key, payload.encode(), hashlib.sha256).digest()):
            return None
        return Principal(kind, name, "session")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Throttle:
    """Failed logins per client address within a sliding window."""

    def __init__(self, limit: int = MAX_FAILURES, window: float = FAILURE_WINDOW_S) -> None:
        self.limit = limit
        self.window = window
        self._lock = threading.Lock()
        self._failures: dict[str, list[float]] = {}

    def blocked_for(self, client: str, now: float | None = None) -> float:
        """Seconds until ``client`` may try again (0: now)."""
        now = now or time.monotonic()
        with self._lock:
            recent = [t for t in self._failures.get(client, []) if now - t < self.window]
            self._failures[client] = recent
            if len(recent) < self.limit:
                return 0.0
            return self.window - (now - recent[0])

    def failed(self, client: str, now: float | None = None) -> None:
        with self._lock:
            self._failures.setdefault(client, []).append(now or time.monotonic())
            if len(self._failures) > 10_000:  # a scan from many addresses must not grow this forever
                self._failures.pop(next(iter(self._failures)))

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)


# -- the middleware ---------------------------------------------------------------------------------
def _starts(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p.rstrip("/") or path.startswith(p) for p in prefixes)


def same_origin_or_allowed(request: Request, allowed: list[str]) -> bool:
    """Whether a cookie-authenticated unsafe request comes from our own pages or an allowed origin."""
    origin = request.headers.get("origin") or ""
    if not origin:
        referer = request.headers.get("referer") or ""
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}" if parts.netloc else ""
    if not origin or origin == "null":
        return False
    if origin in allowed:
        return True
    return urlsplit(origin).netloc == request.headers.get("host", "")


class Auth(BaseHTTPMiddleware):
    """Let a request through with the bearer token or (where people browse) a valid session."""

    def __init__(self, app: Any, settings: Settings, sessions: Sessions) -> None:
        super().__init__(app)
        self.token = settings.resolved_api_token().encode()
        self.open_readonly = settings.api_open_readonly
        self.cors_origins = list(settings.cors_origins)
        self.sessions = sessions

    async def dispatch(self, request: Request, call_next: Any) -> Response:
        path = request.url.path
        if path in ALWAYS_OPEN or _starts(path, OPEN_PREFIXES):
            return await call_next(request)
        header = request.headers.get("authorization", "")
        if header:
            scheme, _, given = header.partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token):
                request.state.principal = Principal("token", TOKEN_PRINCIPAL, "bearer")
                return await call_next(request)
            # Not our token: maybe a viewer's own (OHIF sends its OpenID Connect token to every
            # DICOMweb server). A valid session below still lets the request in; nothing else does.
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie and not _starts(path, SESSION_EXCLUDED):
            principal = self.sessions.check(cookie)
            if principal is not None:
                if request.method in UNSAFE_METHODS and not same_origin_or_allowed(request, self.cors_origins):
                    return JSONResponse({"error": "cross-site request refused (Origin not allowed)"}, status_code=403)
                request.state.principal = principal
                return await call_next(request)
        if header:
            return _unauthorized("wrong bearer token")
        if self.open_readonly and request.method == "GET" and _starts(path, READONLY_OPEN_PREFIXES):
            request.state.principal = Principal("open", "", "open")
            return await call_next(request)
        if request.method == "GET" and path in BROWSER_PAGES and "text/html" in request.headers.get("accept", ""):
            target = path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
        return _unauthorized("missing bearer token or session" if not cookie else "session expired or not valid")


def _unauthorized(reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=401, headers={"WWW-Authenticate": 'Bearer realm="drh-pacs"'})


def principal_of(request: Request) -> Principal | None:
    return getattr(request.state, "principal", None)


# -- login routes -----------------------------------------------------------------------------------
_LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>drh-pacs: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/static/similar.css"></head>
<body class="login"><main>
<h1>drh-pacs</h1>
<form method="post" action="/login" id="login-form">
<input type="hidden" name="next" value="{next}">
<p class="error" role="alert" id="login-error">{error}</p>
<label for="username">User name</label>
<input id="username" name="username" autocomplete="username" autofocus>
<label for="password">Password, or the API token (leave the user name empty)</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit" id="login-submit">Log in</button>
</form></main></body></html>"""


def _safe_next(target: str) -> str:
    """Only a path of this site (never ``//other.site`` or a scheme): no open redirect."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/similar"
    return target


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def routes(settings: Settings, sessions: Sessions) -> list[Route]:
    throttle = Throttle()
    token = settings.resolved_api_token()

    def login_form(request: Request) -> Response:
        target = _safe_next(request.query_params.get("next", "/similar"))
        return HTMLResponse(_LOGIN_PAGE.format(next=html.escape(target), error=""))

    async def login(request: Request) -> Response:
        form = await request.form()
        username = str(form.get("username") or "").strip()
        password = str(form.get("password") or "")
        target = _safe_next(str(form.get("next") or "/similar"))
        wants_json = "application/json" in request.headers.get("accept", "")
        client = _client(request)
        wait = throttle.blocked_for(client)
        if wait > 0:
            log.warning("login refused: %s has too many failed attempts", client)
            message = f"too many failed attempts: try again in {int(wait) + 1} s"
            headers = {"Retry-After": str(int(wait) + 1)}
            if wants_json:
                return JSONResponse({"error": message}, status_code=429, headers=headers)
            page = _LOGIN_PAGE.format(next=html.escape(target), error=html.escape(message))
            return HTMLResponse(page, status_code=429, headers=headers)
        if username:
            ok = USER_NAME.match(username) is not None and sessions.users.check(username, password)
            kind, name = "user", username
        else:
            ok = bool(password) and hmac.compare_digest(password.strip().encode(), token.encode())
            kind, name = "token", TOKEN_PRINCIPAL
        if not ok:
            throttle.failed(client)
            log.warning("login refused for %s from %s", name if USER_NAME.match(name) else "(bad name)", client)
            message = "wrong user name or password" if username else "wrong token"
            if wants_json:
                return JSONResponse({"error": message}, status_code=401)
            page = _LOGIN_PAGE.format(next=html.escape(target), error=html.escape(message))
            return HTMLResponse(page, status_code=401)
        throttle.succeeded(client)
        log.info("login: %s %s from %s", kind, name, client)
        response: Response = (
            JSONResponse({"user": name, "kind": kind}) if wants_json else RedirectResponse(target, status_code=303)
        )
        response.set_cookie(
            SESSION_COOKIE,
            sessions.issue(kind, name),
            max_age=int(sessions.lifetime),
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    def logout(request: Request) -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    def session(request: Request) -> Response:
        principal = principal_of(request)
        if principal is None:
            return _unauthorized("no session")
        return JSONResponse({"user": principal.name, "kind": principal.kind, "via": principal.via})

    return [
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["GET", "POST"]),
        Route("/api/session", session, methods=["GET"]),
    ]


# -- drh-pacs users ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``drh-pacs users add|remove|list``: the people who may log in to the page with a password."""
    from plugin.core.settings import SettingsError, load_settings

    parser = argparse.ArgumentParser(prog="drh-pacs users", description=main.__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="add a user or change their password (asked twice, or read from stdin)")
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    remove = sub.add_parser("remove", help="remove a user (their sessions end)")
    remove.add_argument("name")
    sub.add_parser("list", help="list the users")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"drh-pacs users: {exc}", file=sys.stderr)
        return 2
    path = settings.users_path
    users = read_users(path) if path.exists() else {}
    if args.action == "list":
        for name in sorted(users):
            print(name)
        if not users:  # said on stderr: a script reading the names gets none
            print(f"drh-pacs users: no users in {path}: only the API token logs in", file=sys.stderr)
        return 0
    if not USER_NAME.match(args.name):
        print("drh-pacs users: a name is 1-64 letters, digits, '.', '_', '@' or '-'", file=sys.stderr)
        return 2
    if args.action == "remove":
        if args.name not in users:
            print(f"drh-pacs users: no user {args.name} in {path}", file=sys.stderr)
            return 1
        del users[args.name]
        write_users(path, users)
        print(f"removed {args.name} from {path}")
        return 0
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            print("drh-pacs users: the passwords differ", file=sys.stderr)
            return 1
    if len(password) < 10:
        print("drh-pacs users: a password has at least 10 characters", file=sys.stderr)
        return 1
    existed = args.name in users
    users[args.name] = hash_password(password)
    write_users(path, users)
    print(f"{'changed the password of' if existed else 'added'} {args.name} in {path}")
    return 0
