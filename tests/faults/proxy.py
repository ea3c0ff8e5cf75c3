"""A fault-injecting HTTP/1.1 reverse proxy to put in front of a real S3 server in tests.

:class:`FaultProxy` listens on ``127.0.0.1`` (a free port) and forwards every request, byte for byte, to the
upstream S3 endpoint (the embedded SeaweedFS). Rules (:class:`Fault`) make it misbehave on chosen request
kinds: answer 503 SlowDown or 500 InternalError in AWS's XML form (or 501 NotImplemented / 405
MethodNotAllowed, as a store without some operation does), reset the client connection mid-body, delay,
truncate a response body, rewrite a response body, forward a request and then lose its response, or hang
(accept a request and then neither answer nor close the connection, as a dead middlebox does). A rule can
also run a callback at the moment it fires, to change the store at an exact point of a client's request
sequence. Every request is logged (:class:`LogEntry`), so tests can count requests by kind and compute
request rates.

What it preserves, so that SigV4 signatures still verify upstream:

* the request line and every end-to-end header, in order and unchanged, the ``Host`` header included. The
  client signs for the proxy's ``host:port`` and SeaweedFS checks the signature against the ``Host`` it
  receives, so the header must arrive as the client sent it. Only hop-by-hop headers are dropped
  (``Connection``, ``Keep-Alive``, ``Proxy-Connection``, and ``Expect``, which the proxy answers itself;
  none of them is ever signed);
* the request body, streamed in slices of at most ``256 KiB`` (a 5 MiB part is never held whole), for
  ``Content-Length`` bodies and raw ``chunked`` framing alike.

Each client connection gets its own upstream connection, kept alive as long as both sides allow it.

``Expect: 100-continue`` is handled like a real S3 front end: the proxy sends ``100 Continue`` only when it
is about to read the body (forwarding, or a reset mid-body); an injected 503/500 is answered before the
body is sent, with ``Connection: close`` (botocore then never sends the body).

Only the standard library is used. All threads are daemons, and :meth:`FaultProxy.stop` shuts the listener
and every open connection down and joins their threads.
"""

from __future__ import annotations

import http.client
import random
import select
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

__all__ = ["ACTIONS", "ANY", "KINDS", "Fault", "FaultProxy", "LogEntry", "classify"]

KINDS = frozenset(
    {
        "PutObject",
        "UploadPart",
        "CreateMultipartUpload",
        "CompleteMultipartUpload",
        "AbortMultipartUpload",
        "GetObject",
        "HeadObject",
        "ListObjectsV2",
        "ListMultipartUploads",
        "DeleteObject",
        "DeleteObjects",
        "HeadBucket",
        "Other",
    }
)
"""Request kinds :func:`classify` returns."""

ACTIONS = frozenset(
    {
        "status_503",
        "status_500",
        "status_501",
        "status_405",
        "reset",
        "delay",
        "truncate",
        "rewrite",
        "drop_response",
        "hang",
    }
)
"""What a :class:`Fault` can do to a request."""

ANY: Any = object()
"""Wildcard for the ``action`` filter of :meth:`FaultProxy.entries` (``None`` there means "not injected")."""

# Bodies are moved in slices of at most this many bytes: a 5 MiB part is never buffered whole.
_SLICE = 256 * 1024
# Hop-by-hop request headers: not forwarded (none of them is covered by a SigV4 signature).
_HOP_BY_HOP_REQUEST = frozenset({"connection", "keep-alive", "proxy-connection", "expect"})
_HOP_BY_HOP_RESPONSE = frozenset({"connection", "keep-alive", "proxy-connection"})
# Query parameters that make an object request something other than a plain Get/Put/Delete.
_OBJECT_SUBRESOURCES = frozenset(
    {"acl", "tagging", "retention", "legal-hold", "attributes", "torrent", "restore", "select", "uploads", "uploadId"}
)
_ERRORS = {
    "status_503": (503, "Service Unavailable", "SlowDown", "Please reduce your request rate."),
    "status_500": (
        500,
        "Internal Server Error",
        "InternalError",
        "We encountered an internal error. Please try again.",
    ),
    # What a store answers to an operation it does not implement (S3 gateways differ on which of the two).
    "status_501": (
        501,
        "Not Implemented",
        "NotImplemented",
        "A header you provided implies functionality that is not implemented.",
    ),
    "status_405": (
        405,
        "Method Not Allowed",
        "MethodNotAllowed",
        "The specified method is not allowed against this resource.",
    ),
}
# The header that makes a PUT a server-side copy (CopyObject, UploadPartCopy); classify() leaves those
# requests under PutObject and UploadPart, and Fault(copy=...) and LogEntry.copy_source tell them apart.
COPY_SOURCE_HEADER = "x-amz-copy-source"


def classify(method: str, target: str) -> str:
    """The S3 operation of a path-style request, from its method, path and query (one of :data:`KINDS`).

    Args:
        method: the HTTP method.
        target: the request target, ``/bucket[/key][?query]``.
    """
    parts = urlsplit(target)
    query = parse_qs(parts.query, keep_blank_values=True)
    bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
    m = method.upper()
    if not bucket:
        return "Other"  # ListBuckets
    if key:
        if m == "HEAD":
            return "HeadObject"
        if m == "PUT":
            if "partNumber" in query and "uploadId" in query:
                return "UploadPart"
            return "Other" if _OBJECT_SUBRESOURCES & query.keys() else "PutObject"
        if m == "GET":
            return "Other" if _OBJECT_SUBRESOURCES & query.keys() else "GetObject"
        if m == "POST":
            if "uploads" in query:
                return "CreateMultipartUpload"
            if "uploadId" in query:
                return "CompleteMultipartUpload"
            return "Other"
        if m == "DELETE":
            if "uploadId" in query:
                return "AbortMultipartUpload"
            return "Other" if _OBJECT_SUBRESOURCES & query.keys() else "DeleteObject"
        return "Other"
    if m == "HEAD":
        return "HeadBucket"
    if m == "GET":
        if "uploads" in query:
            return "ListMultipartUploads"
        if query.get("list-type") == ["2"]:
            return "ListObjectsV2"
        return "Other"
    if m == "POST" and "delete" in query:
        return "DeleteObjects"
    return "Other"


@dataclass
class Fault:
    """One injection rule. The first rule (in the order added) that matches a request and fires applies.

    Args:
        kind: request kind to match (see :data:`KINDS`); ``None`` matches every request.
        action: one of :data:`ACTIONS`:

            * ``status_503``: answer ``503 SlowDown`` (AWS's XML error body) without forwarding.
            * ``status_500``: answer ``500 InternalError`` without forwarding.
            * ``status_501`` / ``status_405``: answer ``501 NotImplemented`` / ``405 MethodNotAllowed`` without
              forwarding (a store that lacks the operation).
            * ``reset``: abort the client connection with a TCP RST (``SO_LINGER`` 0) mid-body: after reading
              ``after_bytes`` of the request body (the request never reaches the server), or after forwarding
              the request and ``after_bytes`` of the response body; see ``where``.
            * ``delay``: wait ``delay_s`` seconds, then forward normally.
            * ``truncate``: forward the request, send the response headers (with the full ``Content-Length``)
              and only ``after_bytes`` of the body, then close the connection (FIN).
            * ``rewrite``: forward the request, read the whole response body and return ``rewrite(body)``
              instead (same status and headers, ``Content-Length`` adjusted).
            * ``drop_response``: forward the request (the server processes it), read the whole response,
              then reset the client connection instead of returning it: a lost response.
            * ``hang``: read the request and then send nothing and close nothing, until the client gives up
              (closes its end) or the proxy stops. ``where="request"`` (and ``"auto"``): the request never
              reaches the server; ``"response"``: it is forwarded and processed, and its answer withheld.
        count: inject into at most this many matching requests, then stop; ``None``: no limit.
        probability: chance that a matching request is hit (drawn from the proxy's seeded RNG).
        delay_s: seconds to wait, for ``delay``.
        after_bytes: body bytes let through before ``reset``/``truncate`` cut the connection; ``None``: half
            of the body (when its length is known, else 0).
        where: for ``reset``: ``"request"`` (mid request body), ``"response"`` (mid response body), or
            ``"auto"``: the request body if the request has one (PutObject, UploadPart), else the response.
            For ``hang``: see above.
        skip: let this many matching requests through untouched before the rule can fire.
        path_contains: only match requests whose target (path and query) contains this string.
        duration_s: the rule expires this many seconds after it is added to a proxy.
        copy: ``True``: only match server-side copies (requests with an ``x-amz-copy-source`` header:
            UploadPartCopy, classified ``UploadPart``, and CopyObject, classified ``PutObject``); ``False``:
            only requests without one; ``None``: both.
        rewrite: for ``rewrite``: the new response body, from the server's.
        on_match: called (in the proxy's thread, with the request's :class:`LogEntry`) each time the rule
            fires, before its action is carried out and before the request reaches the server.

    Attributes:
        injected: how many requests this rule has hit so far.
    """

    kind: str | None
    action: str
    count: int | None = None
    probability: float = 1.0
    delay_s: float = 0.5
    after_bytes: int | None = None
    where: str = "auto"
    skip: int = 0
    path_contains: str | None = None
    duration_s: float | None = None
    copy: bool | None = None
    rewrite: Callable[[bytes], bytes] | None = None
    on_match: Callable[[LogEntry], None] | None = None
    injected: int = field(default=0, init=False)
    expires_at: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"unknown request kind {self.kind!r}; known: {sorted(KINDS)}")
        if self.action not in ACTIONS:
            raise ValueError(f"unknown fault action {self.action!r}; known: {sorted(ACTIONS)}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability!r}")
        if self.count is not None and self.count < 0:
            raise ValueError(f"count must be >= 0 or None, got {self.count!r}")
        if self.where not in ("auto", "request", "response"):
            raise ValueError(f"where must be 'auto', 'request' or 'response', got {self.where!r}")
        if (self.action == "rewrite") != (self.rewrite is not None):
            raise ValueError("the 'rewrite' action needs rewrite=, and rewrite= needs the 'rewrite' action")

    @property
    def exhausted(self) -> bool:
        """True once the rule has injected ``count`` faults."""
        return self.count is not None and self.injected >= self.count


@dataclass
class LogEntry:
    """One request seen by the proxy. Logged when its headers arrive; ``status`` is filled in before the
    client receives any byte of the response, so a client that got an answer always finds its entry complete.

    Attributes:
        time: ``time.monotonic()`` when the request headers arrived.
        kind: the request kind (:func:`classify`).
        method: HTTP method.
        path: the request target (path and query).
        action: the injected fault's action, or ``None`` if the request was not touched.
        status: the response status: the server's (even if the client never saw it, after ``reset``,
            ``truncate`` or ``drop_response``), the injected one, or 502 if the server could not be reached;
            ``None`` while it is unknown, and for good if the request was reset before reaching the server.
        copy_source: the ``x-amz-copy-source`` header of a server-side copy (UploadPartCopy, CopyObject);
            ``None`` for any other request.
    """

    time: float
    kind: str
    method: str
    path: str
    action: str | None
    status: int | None
    copy_source: str | None = None


class _ClientGone(Exception):
    """The client connection failed or closed while the proxy was reading from or writing to it."""


class FaultProxy:
    """A threaded HTTP/1.1 reverse proxy to ``upstream_url`` that injects faults by rule.

    Args:
        upstream_url: the real S3 endpoint, ``http://host:port``.
        seed: seed of the RNG behind probability-based rules (reproducible runs).
        host: interface to listen on.
        upstream_timeout_s: socket timeout towards the upstream server.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        upstream_url: str,
        *,
        seed: int = 0,
        host: str = "127.0.0.1",
        upstream_timeout_s: float = 120.0,
    ) -> None:
        up = urlsplit(upstream_url)
        if up.scheme != "http" or not up.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream_url!r}")
        self.upstream_host: str = up.hostname
        self.upstream_port: int = up.port or 80
        self.upstream_timeout_s = upstream_timeout_s
        self._host = host
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._rules: list[Fault] = []
        self._log: list[LogEntry] = []
        self._errors: list[BaseException] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()  # releases hung requests

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Bind a free port and start serving in a daemon thread."""
        if self._server is not None:
            raise RuntimeError("proxy already started")
        self._stopping.clear()
        self._server = _Server((self._host, 0), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fault-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop listening, close every client connection and join all threads (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        server.close_connections(timeout_s)
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        if self._server is None:
            raise RuntimeError("proxy not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: the endpoint to give the S3 client."""
        return f"http://{self._host}:{self.port}"

    @property
    def errors(self) -> list[BaseException]:
        """Unexpected exceptions raised inside the proxy's handlers (bugs of the proxy, not network failures,
        which are part of its job). A test fixture should check this is empty."""
        with self._lock:
            return list(self._errors)

    @property
    def open_connections(self) -> int:
        """Client connections currently open."""
        return 0 if self._server is None else self._server.connection_count()

    # -- rules ------------------------------------------------------------------------------------------------

    def add(self, fault: Fault) -> Fault:
        """Add a rule (it applies to requests that arrive from now on) and return it."""
        with self._lock:
            if fault.duration_s is not None:
                fault.expires_at = time.monotonic() + fault.duration_s
            self._rules.append(fault)
        return fault

    def inject(self, kind: str | None, action: str, **options: Any) -> Fault:
        """Shorthand for ``add(Fault(kind, action, **options))``."""
        return self.add(Fault(kind, action, **options))

    def remove(self, fault: Fault) -> None:
        """Remove one rule (no error if it is already gone)."""
        with self._lock:
            self._rules = [r for r in self._rules if r is not fault]

    def clear(self) -> None:
        """Remove every rule: from now on every request is forwarded untouched."""
        with self._lock:
            self._rules.clear()

    def reseed(self, seed: int) -> None:
        """Reset the RNG behind probability-based rules."""
        with self._lock:
            self._rng = random.Random(seed)

    @property
    def rules(self) -> list[Fault]:
        """The active rules (a copy of the list)."""
        with self._lock:
            return list(self._rules)

    def _pick(self, kind: str, target: str, copy: bool = False) -> Fault | None:
        """The rule that fires for this request, with its counters updated; None if none does."""
        now = time.monotonic()
        with self._lock:
            self._rules = [r for r in self._rules if r.expires_at is None or r.expires_at > now]
            for rule in self._rules:
                if rule.kind is not None and rule.kind != kind:
                    continue
                if rule.path_contains is not None and rule.path_contains not in target:
                    continue
                if rule.copy is not None and rule.copy != copy:
                    continue
                if rule.exhausted:
                    continue
                if rule.skip > 0:
                    rule.skip -= 1
                    continue
                if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                    continue
                rule.injected += 1
                return rule
        return None

    # -- log ---------------------------------------------------------------------------------------------------

    def _record(self, entry: LogEntry) -> None:
        with self._lock:
            self._log.append(entry)

    @property
    def log(self) -> list[LogEntry]:
        """Every request seen so far, in order of arrival (a copy of the list; treat entries as read-only)."""
        with self._lock:
            return list(self._log)

    def clear_log(self) -> None:
        """Forget the requests seen so far."""
        with self._lock:
            self._log.clear()

    def entries(
        self,
        kind: str | None = None,
        *,
        action: Any = ANY,
        since: float | None = None,
        until: float | None = None,
    ) -> list[LogEntry]:
        """Logged requests, filtered.

        Args:
            kind: only this request kind (``None``: all).
            action: only requests with this injected action; ``None``: only untouched requests;
                :data:`ANY` (default): all.
            since, until: only requests that arrived in ``[since, until)`` (``time.monotonic()`` values).
        """
        out = []
        for e in self.log:
            if kind is not None and e.kind != kind:
                continue
            if action is not ANY and e.action != action:
                continue
            if since is not None and e.time < since:
                continue
            if until is not None and e.time >= until:
                continue
            out.append(e)
        return out

    def count(
        self, kind: str | None = None, *, action: Any = ANY, since: float | None = None, until: float | None = None
    ) -> int:
        """How many logged requests match (same filters as :meth:`entries`)."""
        return len(self.entries(kind, action=action, since=since, until=until))

    def rate(self, since: float, until: float, kind: str | None = None) -> float:
        """Requests per second that arrived in ``[since, until)`` (of ``kind``, or all)."""
        if until <= since:
            raise ValueError("empty time window")
        return self.count(kind, since=since, until=until) / (until - since)


class _Server(ThreadingHTTPServer):
    """The listening server: one daemon thread per client connection, all tracked so they can be closed."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], proxy: FaultProxy) -> None:
        self.proxy = proxy
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"fault-proxy-conn-{client_address[1]}",
            daemon=True,
        )
        with self._conns_lock:
            self._conns[request] = thread
        thread.start()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conns_lock:
                self._conns.pop(request, None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Connection errors are part of the job here; anything else is a proxy bug, kept for the fixture."""
        exc = sys.exc_info()[1]
        if exc is not None and not isinstance(exc, OSError):
            with self.proxy._lock:
                self.proxy._errors.append(exc)

    def connection_count(self) -> int:
        with self._conns_lock:
            return len(self._conns)

    def close_connections(self, timeout_s: float) -> None:
        """Shut every open client connection down and join its thread."""
        with self._conns_lock:
            conns = list(self._conns.items())
        for sock, _ in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout_s
        for _, thread in conns:
            thread.join(max(0.0, deadline - time.monotonic()))


class _Handler(BaseHTTPRequestHandler):
    """Handles one client connection: each request is forwarded (or faulted) on its own upstream connection."""

    protocol_version = "HTTP/1.1"
    server_version = "FaultProxy"
    # Idle keep-alive connections are closed after this long, so no thread lingers forever.
    timeout = 60.0
    server: _Server

    def setup(self) -> None:
        super().setup()
        self._upstream: http.client.HTTPConnection | None = None
        self._continue_pending = False

    def finish(self) -> None:
        self._close_upstream()
        try:
            super().finish()
        except OSError:
            pass

    def parse_request(self) -> bool:
        self._continue_pending = False
        return super().parse_request()

    def handle_expect_100(self) -> bool:
        # Deferred: "100 Continue" is sent only when the body is actually wanted (see _send_continue).
        self._continue_pending = True
        return True

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the proxy keeps its own structured log."""

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    # -- one request ------------------------------------------------------------------------------------------

    def _handle(self) -> None:
        proxy = self.server.proxy
        arrived = time.monotonic()
        kind = classify(self.command, self.path)
        copy_source = self.headers.get(COPY_SOURCE_HEADER)
        fault = proxy._pick(kind, self.path, copy_source is not None)
        action = fault.action if fault else None
        self._entry = LogEntry(arrived, kind, self.command, self.path, action, None, copy_source)
        proxy._record(self._entry)
        try:
            if fault is not None and fault.on_match is not None:
                fault.on_match(self._entry)
            if fault is None:
                self._forward(None)
            elif fault.action == "delay":
                time.sleep(fault.delay_s)
                self._forward(None)
            elif fault.action in _ERRORS:
                self._reply_error(fault.action)
            elif fault.action == "hang" and fault.where != "response":
                self._send_continue()
                for _ in self._request_body():
                    pass
                self._hang()
            elif fault.action == "reset" and self._reset_in_request(fault):
                self._send_continue()
                limit = fault.after_bytes if fault.after_bytes is not None else self._request_length() // 2
                read = 0
                for piece in self._request_body():
                    read += len(piece)
                    if read >= limit:
                        break
                self._reset()
            else:
                self._forward(fault)
        except _ClientGone:
            self.close_connection = True
            self._close_upstream()

    def _reset_in_request(self, fault: Fault) -> bool:
        if fault.where == "auto":
            return self._has_body()
        return fault.where == "request"

    def _forward(self, fault: Fault | None) -> None:
        """Send the request upstream and relay the response (faulted as ``fault`` says)."""
        action = fault.action if fault is not None else None
        try:
            conn = self._upstream_connection()
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP_REQUEST:
                    conn.putheader(name, value)
            conn.endheaders()
        except (OSError, http.client.HTTPException) as exc:
            self._close_upstream()
            self._reply_bad_gateway(exc)
            return
        self._send_continue()
        try:
            for piece in self._request_body():
                conn.send(piece)
            resp = conn.getresponse()
        except _ClientGone:
            raise
        except (OSError, http.client.HTTPException) as exc:
            self._close_upstream()
            self._reply_bad_gateway(exc)
            return
        self._entry.status = resp.status

        if action == "hang":
            try:
                while resp.read(_SLICE):
                    pass
            except (OSError, http.client.HTTPException):
                pass
            self._close_upstream()
            self._hang()
            return

        if action == "rewrite":
            assert fault is not None and fault.rewrite is not None
            try:
                body = fault.rewrite(resp.read())
            except (OSError, http.client.HTTPException):
                self._close_upstream()
                self._close_client()
                return
            if resp.will_close:
                self._close_upstream()
            self.send_response_only(resp.status, resp.reason)
            for name, value in resp.getheaders():
                if name.lower() not in _HOP_BY_HOP_RESPONSE | {"content-length", "transfer-encoding"}:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self._write_headers()
            if self.command != "HEAD":
                self._write(body)
            return

        if action == "drop_response":
            # The server has processed the request; read its answer, then lose it.
            try:
                while resp.read(_SLICE):
                    pass
            except (OSError, http.client.HTTPException):
                self._close_upstream()
            resp.close()
            if resp.will_close:
                self._close_upstream()
            self._reset()
            return

        chunked = bool(resp.chunked)
        until_close = not chunked and resp.length is None
        length = resp.length
        self.send_response_only(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in _HOP_BY_HOP_RESPONSE:
                self.send_header(name, value)
        if until_close or self.close_connection:
            self.send_header("Connection", "close")
            self.close_connection = True
        self._write_headers()

        limit: int | None = None
        if fault is not None and action in ("reset", "truncate"):
            limit = fault.after_bytes if fault.after_bytes is not None else (length or 0) // 2
        sent = 0
        try:
            while limit is None or sent < limit:
                want = _SLICE if limit is None else min(_SLICE, limit - sent)
                data = resp.read1(want)
                if not data:
                    break
                self._write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                sent += len(data)
        except (OSError, http.client.HTTPException):
            # The server broke off mid-body: pass the damage on to the client.
            self._close_upstream()
            self._close_client()
            return
        if action == "reset":
            self._close_upstream()
            self._reset()
        elif action == "truncate":
            self._close_upstream()
            self._close_client()
        else:
            resp.close()  # fully read: frees the upstream connection for the next request
            if chunked:
                self._write(b"0\r\n\r\n")
            if resp.will_close:
                self._close_upstream()

    # -- replies made by the proxy itself -----------------------------------------------------------------

    def _reply_error(self, action: str) -> None:
        """Answer with AWS's XML error for ``action`` without forwarding the request."""
        status, reason, code, message = _ERRORS[action]
        # A client waiting for "100 Continue" has not sent the body: answer at once and close the connection
        # (as S3 does). Otherwise read the body first so the connection can be kept alive.
        if not self._continue_pending:
            for _ in self._request_body():
                pass
        else:
            self.close_connection = True
        self._send_xml_error(status, reason, code, message)
        if self.close_connection:
            self._lingering_close()

    def _reply_bad_gateway(self, exc: BaseException) -> None:
        """The upstream failed before answering: a 502, and the client connection closed after it."""
        self.close_connection = True
        try:
            self._send_xml_error(502, "Bad Gateway", "BadGateway", f"upstream failed: {type(exc).__name__}")
        except _ClientGone:
            return
        self._lingering_close()

    def _send_xml_error(self, status: int, reason: str, code: str, message: str) -> None:
        request_id = uuid.uuid4().hex[:16].upper()
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>"
            f"<Resource>{escape(urlsplit(self.path).path)}</Resource><RequestId>{request_id}</RequestId>"
            f"<HostId>{uuid.uuid4().hex}</HostId></Error>"
        ).encode()
        self._entry.status = status
        self.send_response_only(status, reason)
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Date", formatdate(usegmt=True))
        self.send_header("Server", "AmazonS3")
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self._write_headers()
        if self.command != "HEAD":
            self._write(body)

    # -- client side -----------------------------------------------------------------------------------------

    def _has_body(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower() or self._request_length() > 0

    def _request_length(self) -> int:
        try:
            return max(0, int(self.headers.get("Content-Length") or 0))
        except ValueError:
            return 0

    def _request_body(self) -> Iterator[bytes]:
        """The request body as it is on the wire (chunk framing included), in slices of at most ``_SLICE``."""
        try:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                while True:
                    line = self.rfile.readline(65537)
                    if not line:
                        raise _ClientGone("client closed mid-body")
                    yield line
                    size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        while True:  # trailers, up to the blank line
                            trailer = self.rfile.readline(65537)
                            if not trailer:
                                raise _ClientGone("client closed mid-body")
                            yield trailer
                            if trailer in (b"\r\n", b"\n"):
                                return
                    yield from self._read_exact(size + 2)  # data and its CRLF
            else:
                yield from self._read_exact(self._request_length())
        except (OSError, ValueError) as exc:
            raise _ClientGone(str(exc)) from exc

    def _read_exact(self, n: int) -> Iterator[bytes]:
        while n > 0:
            data = self.rfile.read1(min(_SLICE, n))
            if not data:
                raise _ClientGone("client closed mid-body")
            n -= len(data)
            yield data

    def _send_continue(self) -> None:
        if self._continue_pending:
            self._continue_pending = False
            self.send_response_only(100)
            self._write_headers()

    def _write_headers(self) -> None:
        try:
            self.end_headers()
        except OSError as exc:
            raise _ClientGone(str(exc)) from exc

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
        except OSError as exc:
            raise _ClientGone(str(exc)) from exc

    def _reset(self) -> None:
        """Abort the client connection with a TCP RST (SO_LINGER 0, then close)."""
        self.close_connection = True
        sock = self.connection
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            self.rfile.close()  # drops the makefile() reference, so close() really closes the descriptor
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass

    def _hang(self) -> None:
        """Send nothing and keep the connection open until the client closes it or the proxy stops; then
        close our end too (the client has given up, so nothing it could read is left)."""
        self.close_connection = True
        sock = self.connection
        stopping = self.server.proxy._stopping
        while not stopping.is_set():
            try:
                readable, _, _ = select.select([sock], [], [], 0.1)
                if readable and not sock.recv(_SLICE):
                    break  # EOF: the client timed out and closed (any bytes it still sent are discarded)
            except OSError:
                break
        self._close_client()

    def _close_client(self) -> None:
        """End the client connection gracefully (FIN) after what was sent so far."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _lingering_close(self) -> None:
        """Close after a reply the client may still be sending a body for: FIN, then discard what arrives
        until the client closes (at most 2 s), so unread bytes do not turn the close into a reset."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(2.0)
            while self.rfile.read1(_SLICE):
                pass
        except OSError:
            pass

    # -- upstream side ---------------------------------------------------------------------------------------

    def _upstream_connection(self) -> http.client.HTTPConnection:
        conn = self._upstream
        if conn is not None and conn.sock is not None:
            # An idle keep-alive connection the server has closed reads as "readable" (EOF): replace it
            # before sending, because a request streamed into a dead socket cannot be replayed.
            readable, _, _ = select.select([conn.sock], [], [], 0)
            if readable:
                self._close_upstream()
                conn = None
        if conn is None:
            proxy = self.server.proxy
            conn = http.client.HTTPConnection(
                proxy.upstream_host, proxy.upstream_port, timeout=proxy.upstream_timeout_s
            )
            self._upstream = conn
        return conn

    def _close_upstream(self) -> None:
        conn, self._upstream = self._upstream, None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass
