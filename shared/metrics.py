"""The opt-in Prometheus endpoint of one process: its own registry (no process-global state), served
by prometheus-client's HTTP server only when the configuration enables it."""

from __future__ import annotations

from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from shared.config import MetricsConfig


class MetricsEndpoint:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._server: WSGIServer | None = None
        self._thread: Thread | None = None

    def serve(self, config: MetricsConfig) -> None:
        if config.enabled:
            self._server, self._thread = start_http_server(config.port, config.host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
