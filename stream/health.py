"""Health endpoints for ``serve``: ``/healthz`` (liveness), ``/readyz`` (readiness) beside ``/metrics``.

prometheus-client answers ``/metrics`` from its own thread, so a scrape succeeds while the worker is stuck; a probe
pointed at it says nothing about the service. Instead each service loop owns a :class:`Heartbeat` that it ticks
on every turn, idle or not:

* ``/healthz`` is 200 while every heartbeat is younger than the limit, else 503 naming the stale loop and its age.
  Heavy model work (fits, replay steps) runs on the trainer thread, so a fit never stops the worker's heartbeat.
* ``/readyz`` is 200 once the service has started and no assigned partition is waiting for its state, else 503
  with the partitions still restoring.

Both answer a small JSON object. One :class:`HealthServer` (``http.server``, a thread per request) serves all
three paths on the metrics port.

>>> clock = iter([0.0, 0.0, 5.0]).__next__
>>> beat = Heartbeat(clock)
>>> beat.tick()
>>> beat.age()
5.0
>>> ready = Readiness()
>>> ready.mark_started()
>>> ready.begin_restore({0, 1})
>>> ready.end_restore(0)
>>> ready.status()
(False, {'status': 'restoring', 'restoring': [1]})
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler

log = logging.getLogger(__name__)


class Heartbeat:
    """When a loop last went round (monotonic clock); written by its loop, read by the health server."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()

    def tick(self) -> None:
        self._last = self._clock()

    def age(self) -> float:
        """Seconds since the last tick."""
        return self._clock() - self._last


class Readiness:
    """Whether every assigned partition has its state: partitions enter at assignment and leave once restored
    (or revoked). Thread-safe: the rebalance listener, the poll thread and the health server all use it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = False
        self._restoring: set[int] = set()

    def mark_started(self) -> None:
        """The service is up: connected, subscribed, and joined its group (its first assignment, maybe empty)."""
        with self._lock:
            self._started = True

    @property
    def started(self) -> bool:
        with self._lock:
            return self._started

    def begin_restore(self, partitions: Iterable[int]) -> None:
        with self._lock:
            self._restoring |= set(partitions)

    def end_restore(self, partition: int) -> None:
        """Restored, or no longer ours: either way nothing to wait for."""
        with self._lock:
            self._restoring.discard(partition)

    def is_restoring(self, partition: int) -> bool:
        with self._lock:
            return partition in self._restoring

    def status(self) -> tuple[bool, dict[str, Any]]:
        """(ready, what /readyz answers)."""
        with self._lock:
            if not self._started:
                return False, {"status": "starting"}
            if self._restoring:
                return False, {"status": "restoring", "restoring": sorted(self._restoring)}
            return True, {"status": "ready"}


def liveness(heartbeats: Mapping[str, Heartbeat], limit_seconds: float) -> tuple[bool, dict[str, Any]]:
    """(alive, what /healthz answers): alive while every heartbeat is at most ``limit_seconds`` old.

    >>> liveness({"worker": Heartbeat(iter([0.0, 90.0]).__next__)}, 60.0)
    (False, {'status': 'stale', 'stale': ['worker'], 'heartbeat_age_seconds': {'worker': 90.0}, 'limit_seconds': 60.0})
    """
    ages = {name: round(beat.age(), 3) for name, beat in heartbeats.items()}
    stale = sorted(name for name, age in ages.items() if age > limit_seconds)
    body = {"status": "stale" if stale else "ok", "stale": stale, "heartbeat_age_seconds": ages,
            "limit_seconds": limit_seconds}
    return not stale, body


class _Handler(MetricsHandler):
    """``/metrics`` from prometheus-client's handler; ``/healthz`` and ``/readyz`` from the server's checks."""

    server: HealthServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/metrics":
            super().do_GET()
        elif path == "/healthz":
            self._answer(*liveness(self.server.heartbeats, self.server.limit_seconds))
        elif path == "/readyz":
            self._answer(*self.server.readiness.status())
        else:
            self._answer(False, {"status": "not found", "paths": ["/metrics", "/healthz", "/readyz"]}, 404)

    def _answer(self, ok: bool, body: dict[str, Any], failed: int = 503) -> None:
        data = json.dumps(body).encode()
        self.send_response(200 if ok else failed)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class HealthServer(ThreadingHTTPServer):
    """``/metrics``, ``/healthz`` and ``/readyz`` on one port; :meth:`start` serves from a daemon thread."""

    daemon_threads = True

    def __init__(self, address: str, port: int, registry: CollectorRegistry, heartbeats: Mapping[str, Heartbeat],
                 readiness: Readiness, limit_seconds: float) -> None:
        self.address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
        handler = type("Handler", (_Handler,), {"registry": registry})
        super().__init__((address, port), handler)
        self.heartbeats = heartbeats
        self.readiness = readiness
        self.limit_seconds = limit_seconds
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> HealthServer:
        self._thread = threading.Thread(target=self.serve_forever, name="tidecast-health", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
