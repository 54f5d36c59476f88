"""The admission webhook's HTTPS server.

Standard library ``HTTPServer`` plus ``ssl``, served by a fixed pool of
worker threads: the accept loop only queues connections (a full queue closes
the newest at once), so no number of clients makes more threads. Each
connection has a deadline, kept by one watchdog thread: its TLS handshake and
request (and, on a kept-alive connection, each following wait and request)
must finish within ``request_timeout`` seconds or the socket is shut down.
A slow or silent client thus holds a worker for at most that long, and
sending one byte every few seconds does not extend it. Any body that is not
a well-typed AdmissionReview gets HTTP 400, never a dropped connection.
Endpoints: ``POST /mutate``, ``POST /validate``, ``GET /healthz``,
``GET /metrics`` (Prometheus text format).
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import queue
import signal
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from ember.errors import EmberError
from ember.k8s.admission import BadRequest, parse_review, respond, review_pod
from ember.k8s.nslabels import NamespaceLookupError, NoNamespaces
from ember.k8s.policy import Policy
from ember.stopsignal import StopSignals

MAX_BODY = 3 * 1024 * 1024  # the API server's own request limit is about 3 MiB
DRAIN_LIMIT = 4 * MAX_BODY
REQUEST_TIMEOUT = 10.0  # handshake + one request; the API server gives up after <= 30 s
WORKERS = 16
QUEUE_LIMIT = 256  # accepted connections waiting for a worker; past it they are closed
log = logging.getLogger("ember.k8s.webhook")


class Metrics:
    """The webhook's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reviews = Counter("ember_webhook_reviews", "Admission reviews answered",
                               ["endpoint", "result"], registry=self.registry)
        self.bad = Counter("ember_webhook_bad_requests", "Requests refused with HTTP 4xx",
                           ["endpoint"], registry=self.registry)
        self.tls_errors = Counter("ember_webhook_tls_errors", "Failed TLS handshakes",
                                  registry=self.registry)
        self.latency = Histogram("ember_webhook_review_seconds", "Time to answer a review",
                                 ["endpoint"], registry=self.registry)
        self.dropped = Counter("ember_webhook_dropped_connections",
                               "Connections closed unserved (queue full) or past their deadline",
                               ["reason"], registry=self.registry)


class Deadlines:
    """One thread that shuts down sockets whose deadline passed.

    ``shutdown()`` on a duplicate of the socket's descriptor wakes the worker
    blocked reading it (EOF), whatever the TLS layer above was doing.
    """

    def __init__(self, on_expire) -> None:  # type: ignore[no-untyped-def]
        self._heap: list[tuple[float, int]] = []
        self._armed: dict[int, tuple[float, socket.socket]] = {}
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._on_expire = on_expire
        self._thread = threading.Thread(target=self._run, name="deadlines", daemon=True)
        self._thread.start()

    def arm(self, sock: socket.socket, seconds: float) -> int:
        watch = sock.dup()
        with self._cond:
            token = next(self._ids)
            when = time.monotonic() + seconds
            self._armed[token] = (when, watch)
            heapq.heappush(self._heap, (when, token))
            self._cond.notify()
        return token

    def rearm(self, token: int, seconds: float) -> None:
        with self._cond:
            if token in self._armed:
                when = time.monotonic() + seconds
                self._armed[token] = (when, self._armed[token][1])
                heapq.heappush(self._heap, (when, token))

    def disarm(self, token: int) -> None:
        with self._cond:
            entry = self._armed.pop(token, None)
        if entry:
            entry[1].close()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    when, token = heapq.heappop(self._heap)
                    entry = self._armed.get(token)
                    if entry and entry[0] == when:  # not re-armed since
                        try:
                            entry[1].shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                        self._on_expire()
                self._cond.wait(timeout=self._heap[0][0] - now if self._heap else None)


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context, or a one-line error naming the file that is wrong."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for label, path in (("certificate", cert), ("key", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise EmberError(f"webhook: TLS {label} {path}: {exc.strerror or exc}") from None
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise EmberError(f"webhook: cannot use TLS certificate {cert} with key {key}: "
                         f"{exc.reason or exc}") from None
    return ctx


def _describe(request: dict) -> str:
    """namespace/name of the reviewed object, for the log, whatever its shape."""
    obj = request.get("object")
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    name = meta.get("name") or meta.get("generateName") if isinstance(meta, dict) else None
    return f"{request.get('namespace') or '?'}/{name or '?'}"


class _Handler(BaseHTTPRequestHandler):
    server: WebhookServer
    protocol_version = "HTTP/1.1"
    server_version = "ember-webhook"

    def handle_one_request(self) -> None:
        """Serve one request, then give the next one (and the wait for it) a fresh deadline."""
        super().handle_one_request()
        self.server.deadlines.rearm(self.server.current.deadline, self.server.request_timeout)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, endpoint: str, code: int, message: str) -> None:
        self.server.metrics.bad.labels(endpoint).inc()
        log.warning("%s: HTTP %d: %s", endpoint, code, message)
        self._send(code, json.dumps({"error": message}).encode())

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send(200, b"ok\n", "text/plain")
        elif path == "/metrics":
            self._send(200, generate_latest(self.server.metrics.registry), CONTENT_TYPE_LATEST)
        else:
            self._error("other", 404, f"no such endpoint {path}")

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path not in ("/mutate", "/validate"):
            self._error("other", 404, f"no such endpoint {path}")
            return
        endpoint = path[1:]
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            self._error(endpoint, 400, "a Content-Length header is required")
            return
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            if 0 < length <= DRAIN_LIMIT:
                # Read what the client sends, so it sees our answer instead of
                # a reset; past DRAIN_LIMIT it is not worth the bandwidth.
                left = length
                while left > 0:
                    chunk = self.rfile.read(min(1 << 16, left))
                    if not chunk:
                        break
                    left -= len(chunk)
            self._error(endpoint, 400, f"body of {length} bytes is over the {MAX_BODY} limit")
            return
        body = self.rfile.read(length)
        started = time.monotonic()
        try:
            review = parse_review(body)
        except BadRequest as exc:
            self._error(endpoint, 400, str(exc))
            return
        try:
            answer, decision = review_pod(review, self.server.labels_source.labels,
                                          self.server.policy, mutate=endpoint == "mutate")
            result = decision.result if decision else "invalid"
        except NamespaceLookupError as exc:
            answer, result = respond(review, False, message=str(exc), code=500), "error"
        except Exception:  # a bug must cost one request, not the connection's thread
            log.exception("%s: review %s failed", endpoint, review.uid)
            answer = respond(review, False, message="ember webhook: internal error", code=500)
            result = "error"
        self.server.metrics.reviews.labels(endpoint, result).inc()
        self.server.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
        log.info("%s %s: %s", endpoint, _describe(review.request), result)
        self._send(200, json.dumps(answer).encode())


class WebhookServer(HTTPServer):
    """HTTPS admission server: a bounded worker pool; TLS is wrapped in the worker."""

    allow_reuse_address = True
    request_queue_size = 128  # listen() backlog

    def __init__(self, address: tuple[str, int], ctx: ssl.SSLContext, policy: Policy,
                 labels_source, workers: int = WORKERS,
                 request_timeout: float = REQUEST_TIMEOUT) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.ctx = ctx
        self.policy = policy
        self.labels_source = labels_source
        self.metrics = Metrics()
        self.request_timeout = request_timeout
        self.deadlines = Deadlines(lambda: self.metrics.dropped.labels("deadline").inc())
        self.current = threading.local()  # per worker: the deadline of its connection
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_LIMIT)
        self._workers = [threading.Thread(target=self._work, name=f"worker-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._workers:
            t.start()

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        """Called by the accept loop: queue the connection, or close it if the queue is full."""
        try:
            self._queue.put_nowait((request, client_address, time.monotonic()))
        except queue.Full:
            self.metrics.dropped.labels("queue_full").inc()
            self.shutdown_request(request)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            request, client_address, queued = item
            try:
                if time.monotonic() - queued < self.request_timeout:
                    self.finish_request(request, client_address)
                else:  # it waited in the queue past its deadline: its client gave up
                    self.metrics.dropped.labels("deadline").inc()
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def finish_request(self, request, client_address) -> None:  # type: ignore[override]
        request.settimeout(self.request_timeout)
        token = self.deadlines.arm(request, self.request_timeout)
        self.current.deadline = token  # the handler re-arms it after each request
        try:
            try:
                tls = self.ctx.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self.metrics.tls_errors.inc()
                log.info("TLS handshake with %s failed: %s", client_address[0], exc)
                return
            try:
                # typeshed wants the handler's server to be Self; it is this server
                self.RequestHandlerClass(tls, client_address, self)  # type: ignore[arg-type]
            finally:
                try:
                    tls.close()
                except OSError:
                    pass
        finally:
            self.deadlines.disarm(token)

    def server_close(self) -> None:
        """Stop the workers (each finishes its connection, bounded by the deadline)."""
        super().server_close()
        workers = getattr(self, "_workers", [])  # absent when binding the port failed
        while workers:  # connections still queued will not be served
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.shutdown_request(item[0])
        for _ in workers:
            self._queue.put(None)
        for t in workers:
            t.join(timeout=self.request_timeout + 1)
        if workers:
            self.deadlines.stop()

    def handle_error(self, request, client_address) -> None:  # type: ignore[override]
        log.warning("connection from %s failed: %s", client_address[0], sys.exc_info()[1])


def serve(host: str, port: int, ctx: ssl.SSLContext, policy: Policy, labels_source,
          workers: int = WORKERS, request_timeout: float = REQUEST_TIMEOUT) -> None:
    """Run until interrupted; prints where it listens so callers can wait for it."""
    try:
        server = WebhookServer((host, port), ctx, policy, labels_source, workers=workers,
                               request_timeout=request_timeout)
    except OSError as exc:
        raise EmberError(f"webhook: cannot listen on {host}:{port}: {exc.strerror or exc}"
                         ) from None
    bound = server.server_address[1]
    print(f"ember webhook listening on https://{host}:{bound}", file=sys.stderr, flush=True)
    if isinstance(labels_source, NoNamespaces):
        log.warning("no namespace label source: namespace labels and rules will not match")
    # SIGTERM (what the kubelet sends) stops accepting, then drains; shutdown()
    # must run off the serving thread or it waits for itself.
    StopSignals([signal.SIGTERM]).on_signal(lambda _sig: server.shutdown())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    log.info("webhook stopped")
