"""Forecasts encoded and sent by child processes, so a member in the JSON format is not held to one core.

In the default format (one JSON message per forecast) encoding the messages and kafka-python's per-message ``send``
took two thirds of the worker's time (docs/serve.md, the profile), all under the one interpreter lock it shares
with fetching, decoding and the engine. With ``--output-processes N`` the worker hands each batch's forecasts, as
raw columns, to N child processes (``python -m tidecast.stream.output_process``) that encode and send them, each
through a producer of its own; a series always goes through the same child, so its messages keep their order. The
messages are byte for byte those of the in-process sink (:class:`~tidecast.stream.kafka.KafkaForecastSink`, which
each child runs).

Delivery is unchanged: a checkpoint flushes every sink before its changelog group and its commit, and
:meth:`ProcessForecastSink.flush` returns only when every child's producer has every forecast acknowledged; a refusal
is :class:`~tidecast.stream.kafka.OutputError` and an outage past the budget
:class:`~tidecast.stream.kafka.BrokerUnavailable`, raised in the member as before. Forecasts that cannot be encoded
(a non-finite mean, a series id UTF-8 cannot hold) are set aside in the member, before the hand-over, and raised as
:class:`~tidecast.stream.kafka.UnsendableForecasts` so their records are dead-lettered. If the member dies, the
child reads the end of its input, sends what it holds and exits; forecasts are at-least-once either way.

The pipe carries no pickles: a frame is one op byte, the body's length (4 bytes, little-endian) and the body.
``C`` (config, JSON), ``W`` (a batch: :func:`encode_batch`), ``F`` (flush; the child answers one JSON line on its
reply pipe) and ``S`` (flush, close, exit). A full pipe is the back-pressure: the worker waits for a child,
ticking its heartbeat.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from tidecast.stream.batch import ForecastBatch, first_steps
from tidecast.stream.kafka import (
    BrokerLink,
    BrokerUnavailable,
    KafkaForecastSink,
    OutputError,
    UnsendableForecasts,
    compact_message_limit,
    destinations,
    forecast_starts,
    set_aside_unsendable,
    take_forecasts,
)

log = logging.getLogger(__name__)

FRAME = struct.Struct("<cI")
#: Per step, with their wire types; issued_at goes per forecast. ``lower``/``upper`` are left out when every level's
#: bounds go and they are the first level's (as the engine's are): a frame is then ~36 bytes a step, ~1.7 MB for a
#: 2,000-observation round.
_COLUMNS = {"h": "<i4", "target_ns": "<i8", "mean": "<f8", "lower": "<f8", "upper": "<f8"}
#: Pipe buffer asked for (Linux's default is 64 KiB; 1 MiB is the most an unprivileged process may ask): each
#: refill costs the reading thread a turn at the interpreter lock, which it may wait milliseconds for.
PIPE_BYTES = 1 << 20
#: kafka-python settings that must be tuples (JSON brings them back as lists).
_TUPLE_SETTINGS = ("api_version",)


# -- batches as bytes ----------------------------------------------------------------------------------------------
def encode_batch(batch: ForecastBatch, partitions: list[int] | None) -> bytes:
    """A forecast batch (rows of one forecast contiguous) as bytes: a JSON header, then the columns as raw arrays.

    >>> b = ForecastBatch(np.array(["a", "a"], object), np.array([5, 5]), np.array(["m", "m"], object),
    ...                   np.array([1, 2]), np.array([6, 7]), np.array([1.0, 2.0]), np.array([0.5, 1.5]),
    ...                   np.array([1.5, np.inf]), 0.1)
    >>> back, parts = decode_batch(encode_batch(b, [3]))
    >>> back.series_id.tolist(), back.upper.tolist(), parts
    (['a', 'a'], [1.5, inf], [3])
    """
    starts = forecast_starts(batch) if len(batch) else np.zeros(0, np.int64)
    counts = np.diff(np.append(starts, len(batch)))
    many = batch.lowers is not None and batch.uppers is not None
    header = {"alpha": float(batch.alpha), "levels": list(batch.levels), "counts": counts.tolist(),
              "series": batch.series_id[starts].tolist(), "models": batch.model[starts].tolist(),
              "partitions": partitions, "many": many, "width": batch.lowers.shape[1] if many else 0,
              # the first level's bounds travel once, unless lower/upper differ from them
              "first": many and np.array_equal(batch.lower, batch.lowers[:, 0], equal_nan=True)
              and np.array_equal(batch.upper, batch.uppers[:, 0], equal_nan=True)}
    columns = [c for c in _COLUMNS if not (header["first"] and c in ("lower", "upper"))]
    arrays = [np.ascontiguousarray(batch.issued_at_ns[starts], "<i8")]
    arrays += [np.ascontiguousarray(getattr(batch, c), _COLUMNS[c]) for c in columns]
    if header["many"]:
        arrays += [np.ascontiguousarray(batch.lowers, "<f8"), np.ascontiguousarray(batch.uppers, "<f8")]
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([struct.pack("<I", len(head)), head, *(a.tobytes() for a in arrays)])


def decode_batch(body: bytes) -> tuple[ForecastBatch, list[int] | None]:
    """What :func:`encode_batch` wrote: the batch and the destination partition of each forecast."""
    (size,) = struct.unpack_from("<I", body)
    header = json.loads(body[4:4 + size])
    counts = np.asarray(header["counts"], np.int64)
    n, f, width = int(counts.sum()), len(counts), int(header["width"])
    at = 4 + size

    def take(dtype: str, length: int) -> np.ndarray:
        nonlocal at
        out = np.frombuffer(body, dtype, length, at).copy()
        at += out.nbytes
        return out

    issued = take("<i8", f)
    cols = {c: take(kind, n) for c, kind in _COLUMNS.items() if not (header["first"] and c in ("lower", "upper"))}
    many = {}
    if header["many"]:
        many = {"lowers": take("<f8", n * width).reshape(n, width), "uppers": take("<f8", n * width).reshape(n, width)}
    if header["first"]:
        cols["lower"], cols["upper"] = many["lowers"][:, 0].copy(), many["uppers"][:, 0].copy()

    def repeat(values: list[str]) -> np.ndarray:
        out = np.empty(f, object)
        out[:] = values
        return np.repeat(out, counts)

    batch = ForecastBatch(repeat(header["series"]), np.repeat(issued, counts), repeat(header["models"]),
                          cols["h"], cols["target_ns"], cols["mean"], cols["lower"], cols["upper"], header["alpha"],
                          tuple(header["levels"]), **many, starts=first_steps(counts))
    return batch, header["partitions"]


# -- the member's side ---------------------------------------------------------------------------------------------
class ProcessForecastSink:
    """A forecast sink (``write``/``flush``/``close``) whose messages ``processes`` child processes encode and send.

    Each series goes through one child (by its destination partition, else a hash of its id), so its messages keep
    their order. ``producer_config`` is the kafka-python producer's keyword arguments (JSON-able, as settings are);
    ``partition_of``, ``output_format``, ``compression`` and ``flush_timeout`` mean what they mean for
    :class:`~tidecast.stream.kafka.KafkaForecastSink`; ``outage_budget`` is the children's
    :class:`~tidecast.stream.kafka.BrokerLink` budget. ``progress`` (a heartbeat) is ticked while waiting for a
    child.
    """

    def __init__(self, producer_config: Mapping[str, Any], topic: str, errors: Any, flush_timeout: float,
                 partition_of: Callable[[str], int | None] | None = None, output_format: str = "json",
                 outage_budget: float = 300.0, progress: Callable[[], None] | None = None,
                 processes: int = 1, compression: str = "lz4") -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, not {processes}")
        self.topic = topic
        self.partition_of = partition_of
        self.flush_timeout = flush_timeout
        self.outage_budget = outage_budget
        self._errors = errors  # tidecast_output_errors_total: the children report their refusals at each flush
        config = {"producer": dict(producer_config), "topic": topic, "flush_timeout": flush_timeout,
                  "output_format": output_format, "compression": compression, "outage_budget": outage_budget}
        try:
            body = json.dumps(config).encode()
        except TypeError as err:
            raise ValueError(f"--output-processes needs Kafka settings JSON can hold: {err}") from err
        self.children = [_Child(progress) for _ in range(processes)]
        for child in self.children:
            child.send(b"C", body)
        self._flush_lock = threading.Lock()  # one flush at a time waits for the answers
        self._closed = False

    @property
    def proc(self) -> subprocess.Popen:
        """The first child's process."""
        return self.children[0].proc

    def write(self, batch: ForecastBatch) -> None:
        if not len(batch):
            return
        starts = forecast_starts(batch)
        sids = batch.series_id[starts].tolist()
        unsendable, origins, bad = set_aside_unsendable(batch, starts, sids)
        counts = np.diff(np.append(starts, len(batch)))
        partitions = destinations(self.partition_of, sids)
        child_of = self._children_of(sids, partitions)
        for k, child in enumerate(self.children):
            mine = ~bad & (child_of == k)
            if not mine.any():
                continue
            part = batch if mine.all() else take_forecasts(batch, mine, counts)
            child.send(b"W", encode_batch(part, None if self.partition_of is None else partitions[mine].tolist()))
        if unsendable:
            raise UnsendableForecasts(unsendable, origins)

    def _children_of(self, sids: list[str], partitions: np.ndarray) -> np.ndarray:
        """Each forecast's child: its destination partition's, else one by a CRC of its series id."""
        n = len(self.children)
        if n == 1:
            return np.zeros(len(sids), np.int64)
        keys = {sid: zlib.crc32(sid.encode("utf-8", "surrogatepass")) for sid in set(sids)}
        by_id = np.array([keys[sid] for sid in sids], np.int64)
        return np.where(partitions >= 0, partitions, by_id) % n

    def flush(self) -> None:
        """Wait until the children have every forecast written so far acknowledged; :class:`OutputError` if the
        broker refused any, :class:`BrokerUnavailable` if the cluster stayed out of reach for the outage budget."""
        with self._flush_lock:
            for child in self.children:  # they flush side by side
                child.send(b"F", b"")
            replies = [child.reply(self.flush_timeout + self.outage_budget + 30.0) for child in self.children]
        errors = sum(int(r.get("errors") or 0) for r in replies)
        if errors:
            self._errors.inc(errors)
        for reply in replies:
            if reply.get("failure") == "unavailable":
                raise BrokerUnavailable(reply["message"])
        for reply in replies:
            if reply.get("failure") is not None:
                raise OutputError(reply["message"])

    def close(self, timeout: float = 10.0) -> None:
        """Flush, stop the children and wait for them (killed past ``timeout``)."""
        if self._closed:
            return
        self._closed = True
        for child in self.children:
            with contextlib.suppress(OutputError):  # the child is gone already
                child.send(b"S", b"")
        for child in self.children:
            child.wait(timeout)


class _Child:
    """One output process and its two pipes: frames in on its stdin, flush answers back on a pipe of their own
    (its stdout and stderr stay the member's, for its log lines)."""

    def __init__(self, progress: Callable[[], None] | None) -> None:
        self.progress = progress
        reply_read, reply_write = os.pipe()
        self.proc = subprocess.Popen([sys.executable, "-P", "-m", "tidecast.stream.output_process", str(reply_write)],
                                     stdin=subprocess.PIPE, pass_fds=(reply_write,))
        os.close(reply_write)
        self._replies = os.fdopen(reply_read, "rb")
        assert self.proc.stdin is not None
        self._stdin = self.proc.stdin.fileno()
        os.set_blocking(self._stdin, False)
        with contextlib.suppress(AttributeError, OSError):  # not Linux, or a lower pipe-max-size: the default
            fcntl.fcntl(self._stdin, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._lock = threading.Lock()  # the worker writes and the checkpoint thread flushes: frames go out whole

    def send(self, op: bytes, body: bytes) -> None:
        with self._lock:
            self._write(memoryview(FRAME.pack(op, len(body)) + body))

    def _write(self, data: memoryview) -> None:
        while data:
            try:
                data = data[os.write(self._stdin, data):]
            except BlockingIOError:  # the child is behind: wait for it, but keep the heartbeat
                self._alive()
                if self.progress is not None:
                    self.progress()
                select.select([], [self._stdin], [], 0.5)
            except BrokenPipeError as err:
                raise OutputError(f"the forecast output process exited ({self.proc.poll()})") from err

    def reply(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self._replies], [], [], 0.5)
            if ready:
                line = self._replies.readline()
                if not line:
                    break
                return json.loads(line)
            self._alive()
            if self.progress is not None:
                self.progress()
        self._alive()
        raise OutputError(f"the forecast output process did not answer a flush within {timeout:.0f} s")

    def _alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise OutputError(f"the forecast output process exited with status {code}")

    def wait(self, timeout: float) -> None:
        reap(self.proc, timeout, "forecast output process")
        self._replies.close()


def reap(proc: subprocess.Popen, timeout: float, child: str) -> None:
    """Wait for a child process that was told to stop; killed past ``timeout``."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("the %s did not stop within %.0f s: killed", child, timeout)
        proc.kill()
        proc.wait()


# -- the child's side ----------------------------------------------------------------------------------------------
class _Count:
    """The child's count of refused messages (the producer's IO thread counts them), reported and zeroed at each
    flush."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def inc(self, n: int = 1) -> None:
        with self._lock:
            self.value += n

    def take(self) -> int:
        with self._lock:
            value, self.value = self.value, 0
        return value


def read_frame(stream: Any) -> tuple[bytes, bytes]:
    head = stream.read(FRAME.size)
    if len(head) < FRAME.size:
        return b"", b""  # the member is gone
    op, size = FRAME.unpack(head)
    return op, stream.read(size)


def write_frame(stream: Any, op: bytes, body: bytes) -> None:
    """One frame to a blocking stream (the fetch process's pipes; the output processes' own pipe is non-blocking)."""
    stream.write(FRAME.pack(op, len(body)) + body)
    stream.flush()


def read_ahead(stream: Any, depth: int = 8, name: str = "tidecast-output-reader") -> queue.Queue:
    """Frames read on a thread of their own, up to ``depth`` ahead (0: unbounded), until ``S`` or the end of input:
    the member's writes seldom wait for a batch being sent (with one pipe buffer between them, each side waited for
    the other ~20 % of the time), and a full queue still holds the member back."""
    frames: queue.Queue = queue.Queue(maxsize=depth)

    def read() -> None:
        while True:
            op, body = read_frame(stream)
            frames.put((op, body))
            if op in (b"", b"S"):
                return

    threading.Thread(target=read, name=name, daemon=True).start()
    return frames


def client_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """A kafka-python client's keyword arguments as the member gave them (JSON turned its tuples into lists)."""
    out = dict(config)
    for key in _TUPLE_SETTINGS:
        if isinstance(out.get(key), list):
            out[key] = tuple(out[key])
    return out


def read_config(stream: Any, child: str) -> dict[str, Any] | None:
    """A child process's first frame, its config (``C``); ``None`` (said in the log) if the member sent another."""
    op, body = read_frame(stream)
    if op != b"C":
        log.error("the %s expected its config first, got %r", child, op)
        return None
    return json.loads(body)


def serve_child(stream: Any, replies: Any) -> int:
    """The child's loop: frames from ``stream`` until ``S`` or the end of input; flush answers on ``replies``."""
    from kafka import KafkaProducer

    config = read_config(stream, "forecast output process")
    if config is None:
        return 2
    producer = KafkaProducer(**client_kwargs(config["producer"]))
    errors = _Count()
    sink = KafkaForecastSink(producer, config["topic"], errors, config["flush_timeout"],
                             link=BrokerLink(config["outage_budget"]), output_format=config["output_format"],
                             compression=config["compression"],
                             message_bytes=compact_message_limit(config["producer"].get("max_request_size")))
    failure: dict[str, Any] | None = None  # a send that failed: the next flush reports it
    frames = read_ahead(stream)
    try:
        while True:
            op, body = frames.get()
            if op == b"W":
                batch, partitions = decode_batch(body)
                if partitions is None:
                    sink.partition_of = None
                else:
                    sids = batch.series_id[forecast_starts(batch)].tolist()
                    home = {sid: (None if p < 0 else p) for sid, p in zip(sids, partitions, strict=True)}
                    sink.partition_of = home.get
                failure = failure or _write(sink, batch)
            elif op == b"F":
                reply = _flush(sink, errors, failure)
                replies.write(json.dumps(reply).encode() + b"\n")
                replies.flush()
            else:  # S, or the end of input: the member stopped or died
                _flush(sink, errors, failure)
                return 0
    finally:
        producer.close(timeout=config["flush_timeout"])


def _attempt(action: Callable[[], None]) -> dict[str, Any] | None:
    """Run a send or a flush; the failure the member is to raise, if it failed: ``unavailable``
    (:class:`BrokerUnavailable`) or ``refused`` (:class:`OutputError`)."""
    try:
        action()
    except BrokerUnavailable as err:
        return {"failure": "unavailable", "message": str(err)}
    except OutputError as err:
        return {"failure": "refused", "message": str(err)}
    return None


def _write(sink: KafkaForecastSink, batch: ForecastBatch) -> dict[str, Any] | None:
    """Send one batch; a failure to report at the next flush, if it failed."""
    def send() -> None:
        try:
            sink.write(batch)
        except UnsendableForecasts as err:  # the member set these aside already: nothing should get here
            log.error("forecasts of %d series could not be encoded and were not sent: %s", len(err.series),
                      sorted(err.series)[:5])

    return _attempt(send)


def _flush(sink: KafkaForecastSink, errors: _Count, failure: dict[str, Any] | None) -> dict[str, Any]:
    failure = failure or _attempt(sink.flush)
    return {"failure": None, "message": None, **(failure or {}), "errors": errors.take()}


def start_child(child: str) -> None:
    """A child process's logging and signals. The member tells the child when to stop (``S``, or the end of its
    input if it died); a Ctrl-C sent to the whole process group must not cut the child off before the member's
    last flush."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s ({child}): %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    start_child("output process")
    # The frame reader and the producer's IO thread wait on the encoding thread for the interpreter lock; a shorter
    # switch interval than the default 5 ms lets them in sooner.
    sys.setswitchinterval(0.001)
    with os.fdopen(int(args[0]), "wb") as replies:
        return serve_child(sys.stdin.buffer, replies)


if __name__ == "__main__":
    sys.exit(main())
