"""The admission webhook's HTTPS server.

Standard library ``ThreadingHTTPServer`` plus ``ssl``: the API server sends
one small JSON document per pod, so a thread per connection is plenty. The
TLS handshake happens in the connection's thread (not in ``accept``), so one
slow or broken client cannot stall the others; every socket has a timeout.
Endpoints: ``POST /mutate``, ``POST /validate``, ``GET /healthz``,
``GET /metrics`` (Prometheus text format).
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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

MAX_BODY = 3 * 1024 * 1024  # the API server's own request limit is about 3 MiB
DRAIN_LIMIT = 4 * MAX_BODY
SOCKET_TIMEOUT = 10.0
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


class WebhookServer(ThreadingHTTPServer):
    """HTTPS admission server; TLS is wrapped per connection, in its thread."""

    # On shutdown, let in-flight reviews finish (sockets time out, so this is bounded).
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], ctx: ssl.SSLContext, policy: Policy,
                 labels_source) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.ctx = ctx
        self.policy = policy
        self.labels_source = labels_source
        self.metrics = Metrics()

    def finish_request(self, request, client_address) -> None:  # type: ignore[override]
        request.settimeout(SOCKET_TIMEOUT)
        try:
            tls = self.ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.metrics.tls_errors.inc()
            log.info("TLS handshake with %s failed: %s", client_address[0], exc)
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            try:
                tls.close()
            except OSError:
                pass

    def handle_error(self, request, client_address) -> None:  # type: ignore[override]
        log.warning("connection from %s failed: %s", client_address[0], sys.exc_info()[1])


def serve(host: str, port: int, ctx: ssl.SSLContext, policy: Policy, labels_source) -> None:
    """Run until interrupted; prints where it listens so callers can wait for it."""
    try:
        server = WebhookServer((host, port), ctx, policy, labels_source)
    except OSError as exc:
        raise EmberError(f"webhook: cannot listen on {host}:{port}: {exc.strerror or exc}"
                         ) from None
    bound = server.server_address[1]
    print(f"ember webhook listening on https://{host}:{bound}", file=sys.stderr, flush=True)
    if isinstance(labels_source, NoNamespaces):
        log.warning("no namespace label source: namespace labels and rules will not match")
    # SIGTERM (what the kubelet sends) stops accepting, then drains; shutdown()
    # must run off the serving thread or it waits for itself.
    signal.signal(signal.SIGTERM,
                  lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    log.info("webhook stopped")
