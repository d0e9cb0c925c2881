"""Who may talk to the kiosk: the token, the Host allowlist (against DNS rebinding), same-origin checks.

Pure functions and one small ASGI middleware; nothing here touches the network or the models.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import secrets
import socket
import stat
from pathlib import Path
from typing import Callable, FrozenSet, Iterable, Optional, Tuple

from edge_shitu.errors import InvalidInputError, MissingFileError

__all__ = ["Guard", "is_loopback", "allowed_hosts", "load_or_create_token", "default_token_path", "MIN_TOKEN_LENGTH"]

MIN_TOKEN_LENGTH = 16
"""Shortest token accepted from a token file (a generated one has 43 characters, 256 bits)."""

_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Sent with every answer: the UI loads only its own files, talks only to this service and is never framed.
_SECURITY_HEADERS = (
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
                                 b"connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)
_OPEN_PATHS = ("/healthz",)


def is_loopback(host: str) -> bool:
    """Whether a bind address or host name only reaches this machine (``localhost``, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _own_addresses() -> Iterable[str]:
    """This machine's host names and the addresses they resolve to locally (``/etc/hosts``, no DNS query
    is needed for the host's own name on the systems we target; a failure just leaves them out)."""
    name = socket.gethostname()
    yield name
    yield f"{name}.local"
    try:
        for *_, addr in socket.getaddrinfo(name, None):
            yield str(addr[0])
    except OSError:
        pass
    # The address of the interface that holds the default route: connecting a UDP socket sends nothing.
    for family, probe in ((socket.AF_INET, "10.255.255.255"), (socket.AF_INET6, "fd00::1")):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                yield s.getsockname()[0]
        except OSError:
            pass


def allowed_hosts(bind: str, extra: Iterable[str] = ()) -> FrozenSet[str]:
    """The host names a request's ``Host`` header may carry, lower-case and without port.

    Loopback names always; the bind address; for a non-loopback bind also this machine's names and
    addresses; plus ``extra`` (``--allow-host``).
    """
    hosts = {"localhost", "127.0.0.1", "::1"}
    if bind not in ("0.0.0.0", "::", ""):
        hosts.add(bind.strip("[]").lower())
    if not is_loopback(bind):
        hosts.update(h.lower() for h in _own_addresses())
    hosts.update(h.strip().strip("[]").lower() for h in extra if h.strip())
    return frozenset(hosts)


def split_host(header: str) -> str:
    """The host part of a ``Host`` header (``name``, ``name:port``, ``[v6]:port``), lower-case."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        return header[1:end] if end > 0 else header
    if header.count(":") == 1:
        return header.split(":", 1)[0]
    return header


def default_token_path() -> Path:
    """``$XDG_STATE_HOME/edge-shitu/token``, else ``~/.local/state/edge-shitu/token``."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "edge-shitu" / "token"


def load_or_create_token(path: Path) -> Tuple[str, bool]:
    """Read the token of ``path``, or generate one and write it there with mode 0600.

    Returns:
      ``(token, created)``.

    Raises:
      InvalidInputError: the file is readable by other users, not a regular file, not UTF-8, or its
        token is shorter than :data:`MIN_TOKEN_LENGTH` or contains spaces.
      MissingFileError: the folder cannot be created.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        info = None
    if info is None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise MissingFileError(f"cannot create the folder of token file {path}: {exc.strerror}") from exc
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
        return token, True
    if not stat.S_ISREG(info.st_mode):
        raise InvalidInputError(f"token file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise InvalidInputError(f"token file {path} can be read by other users (mode {info.st_mode & 0o777:o}); "
                                f"run: chmod 600 {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InvalidInputError(f"token file {path} is not UTF-8 text") from None
    token = lines[0].strip() if lines else ""
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token) or not token.isprintable():
        raise InvalidInputError(f"{path}:1: expected a token of at least {MIN_TOKEN_LENGTH} printable characters "
                                "without spaces")
    return token, False


async def _send_error(send: Callable, status: int, message: str, extra_headers: Tuple = ()) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *extra_headers, *_SECURITY_HEADERS]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: Host allowlist, same-origin state changes, token on ``/api/``, declared body size,
    and security headers (a content security policy, no sniffing, no framing, no referrer) on every answer.

    Args:
      app: the ASGI application behind it.
      hosts: allowed ``Host`` names (see :func:`allowed_hosts`).
      token: the bearer token every ``/api/`` request must carry, or None for none.
      max_body: largest ``Content-Length`` accepted, in bytes (the endpoints also count what they read).
    """

    def __init__(self, app, *, hosts: FrozenSet[str], token: Optional[str], max_body: int) -> None:
        self.app = app
        self.hosts = hosts
        self.token = token
        self.max_body = max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":  # none are served; refuse before anything else
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return
        headers = {}
        for key, value in scope.get("headers", ()):
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        host_header = headers.get("host", "")
        if split_host(host_header) not in self.hosts:
            await _send_error(send, 400, f"Host {host_header!r} is not served here; start the service with "
                                         "--allow-host NAME to serve it")
            return
        method = scope["method"]
        if method in _UNSAFE_METHODS:
            origin = headers.get("origin")
            if origin is not None and origin.lower() != f"{scope.get('scheme', 'http')}://{host_header}".lower():
                await _send_error(send, 403, f"cross-origin {method} refused: Origin {origin!r} is not this service")
                return
            if headers.get("sec-fetch-site") == "cross-site":
                await _send_error(send, 403, f"cross-site {method} refused")
                return
        path = scope.get("path", "")
        if self.token is not None and path.startswith("/api/") and path not in _OPEN_PATHS:
            auth = headers.get("authorization")
            if auth is None:
                await _send_error(send, 401, "this service needs a token: send 'Authorization: Bearer TOKEN' "
                                             "(the token is in the service's token file)",
                                  ((b"www-authenticate", b"Bearer"),))
                return
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                await _send_error(send, 403, "wrong token")
                return
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                await _send_error(send, 400, f"Content-Length must be a whole number, got {length!r}")
                return
            if int(length) > self.max_body:
                await _send_error(send, 413, f"body of {int(length)} bytes is over the limit of {self.max_body}")
                return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *_SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
