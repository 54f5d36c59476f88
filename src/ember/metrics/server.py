"""``ember metrics serve``: the collector's registry over HTTP (Prometheus text format).

``/metrics`` is prometheus_client's WSGI exposition of our own registry (no
process/platform collectors of the exporter itself); ``/`` says where to look.
Requests are served in threads; the collector lets one scrape run at a time.
A background thread reads the sandbox records every second, so a crash or an
OOM kill is counted (and logged) even between scrapes.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, disable_created_metrics, make_wsgi_app

from ember.config import Config
from ember.errors import EmberError
from ember.metrics import DEFAULT_LISTEN, DEFAULT_TIMEOUT
from ember.metrics.collector import EmberCollector

log = logging.getLogger("ember.metrics")

WATCH_INTERVAL = 1.0


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT or :PORT (all addresses) -> (host, port); EmberError if bad."""
    text = value.strip()
    host, sep, port = text.rpartition(":")
    if not sep or not port:
        raise EmberError(f"--listen {value!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise EmberError(f"--listen {value!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise EmberError(f"--listen {value!r}: write an IPv6 address in brackets, "
                         "e.g. [::1]:8090")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise EmberError(f"--listen {value!r}: port must be a number from 0 (any free port) "
                         "to 65535")
    return host or "0.0.0.0", int(port)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base's name
        log.debug("%s " + format, self.address_string(), *args)


def _server_class(host: str) -> type[_Server]:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise EmberError(f"--listen: cannot resolve {host!r}: {exc.strerror}") from None
    family = infos[0][0]

    class Server(_Server):
        address_family = family
    return Server


def _index(app):
    def serve(environ, start_response):
        if environ.get("PATH_INFO", "/") in ("/", ""):
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ember metrics: see /metrics\n"]
        return app(environ, start_response)
    return serve


class MetricsServer:
    def __init__(self, cfg: Config, listen: str = DEFAULT_LISTEN,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        host, port = parse_listen(listen)
        disable_created_metrics()  # no *_created series: they double every counter
        self.registry = CollectorRegistry()
        self.collector = EmberCollector(cfg, self.registry, timeout=timeout)
        try:
            self.httpd = make_server(host, port, _index(make_wsgi_app(self.registry)),
                                     _server_class(host), handler_class=_Handler)
        except OSError as exc:
            self.collector.close()
            raise EmberError(f"--listen {listen}: cannot listen: "
                             f"{exc.strerror or exc}") from None
        self._stop = threading.Event()
        self.collector.watch()  # the records already there are the counters' baseline

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL):
            try:
                self.collector.watch()
            except Exception:  # noqa: BLE001 - keep watching whatever one pass met
                log.exception("watching sandbox records")

    def serve_forever(self) -> None:
        threading.Thread(target=self._watch, name="watch-records", daemon=True).start()
        try:
            self.httpd.serve_forever(poll_interval=0.5)
        finally:
            self.close()

    def shutdown(self) -> None:
        """From another thread: stop serve_forever."""
        self._stop.set()
        self.httpd.shutdown()

    def close(self) -> None:
        self._stop.set()
        self.httpd.server_close()
        self.collector.close()
