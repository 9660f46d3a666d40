"""Checkpointed per-series state: the blob format, the local store and the Kafka changelog.

What is saved
-------------
Everything the engine knows about a series (``Engine.export_series``: grid, buffers, model rows, calibrators,
pending forecasts, scores, and the ``(partition, offset)`` of the last observation it applied), plus each model's
shared state (``Engine.export_shared``, e.g. a CycleNet backbone). State is grouped by input partition, because
a partition is what moves between consumers.

Blob format (version 1) — one format for local files and changelog values, never pickle::

    b"TDCSTATE"        8 bytes magic
    version            u16 little-endian
    sha256(body)       32 bytes
    body               u32 LE length of meta + meta (UTF-8 JSON) + safetensors(arrays)

A blob whose magic, version or checksum is wrong raises :class:`CorruptState`.

Local store
-----------
One file per partition, ``<root>/<group>/<topic>/partition-<PPPPP>.tcs`` (P zero-padded to 5 digits; a group or
topic name with other characters than letters, digits and ``._-`` gets its plain spelling plus ``~`` and 12 hex
digits of its SHA-256), holding a :class:`Snapshot` of all the partition's series. Written atomically: temporary
file in the same directory, fsync, rename, fsync directory. A snapshot records its topic, partition and group, and
one that names others is refused at load (the changelog is used instead).

Changelog
---------
A topic co-partitioned with the input (changelog partition P holds input partition P's state), written with an
explicit partition so the producer's partitioner never matters. A checkpoint of partition P is a *group* of
records: the partition's series in blocks of consecutive ids (key ``\\0series/<first id>``, arrays stacked over
the block's series, about :data:`BLOCK_BYTES` a record: a restore decodes a few hundred records, not one per
series; a record holding one series under its own id, as written before blocks, is read the same way), one per
changed shared state (key ``\\0shared/<model>``), then a marker (key ``\\0checkpoint``) with the input position
the group reflects and the group's record count. Restore finds the last marker (scanning back from the end),
reads that group and stops at its marker. Restore reads the partition
with last-value-wins per key — refined to "the state with the highest applied offset wins, the later on a tie"
(:class:`LatestRows`) — and keeps only groups closed by a marker, so a checkpoint interrupted half-way is ignored as a
whole; a record that is no state blob is skipped with a warning naming its offset (:class:`TailReader`).
Compaction (``cleanup.policy=compact``) keeps the topic small on real Kafka; nothing relies on it (the test broker
never compacts) and no transactions are used. Series ids are written as keys with ``surrogatepass``, so that no id
can make a checkpoint fail.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from tidecast.stream.config import grid_step
from tidecast.stream.kafka import BrokerLink, BrokerUnavailable, is_unavailable
from tidecast.stream.partitioner import key_bytes

log = logging.getLogger(__name__)

ArrayDict = dict[str, np.ndarray]
SharedState = dict[str, tuple[ArrayDict, dict[str, Any]]]

MAGIC = b"TDCSTATE"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sH32s")
_META_LEN = struct.Struct("<I")

SHARED_KEY_PREFIX = "\x00shared/"
SERIES_BLOCK_KEY_PREFIX = "\x00series/"
#: Target size of one changelog record of series states. Far below Kafka's 1 MB default ``max.message.bytes``, so a
#: changelog topic created by hand with the defaults takes it; large enough that a 10,000-series partition is a few
#: hundred records.
BLOCK_BYTES = 512 * 1024
MARKER_KEY = "\x00checkpoint"
_MARKER = MARKER_KEY.encode()
#: Engine settings that change the meaning or the shape of saved state; a mismatch refuses to restore.
FINGERPRINT_FIELDS = ("horizon", "alpha", "models", "model_params", "calibrator", "calibrator_params", "freq",
                      "max_gap", "coverage_window")


class CorruptState(ValueError):
    """A blob that is not tidecast state, has an unknown version or fails its checksum."""


class IncompatibleState(ValueError):
    """State written under an engine configuration that this process cannot continue."""


# -- blobs ---------------------------------------------------------------------------------------------
def encode_blob(meta: dict[str, Any], arrays: ArrayDict) -> bytes:
    """``meta`` (JSON-able) and ``arrays`` (numeric numpy arrays) as one checksummed, versioned blob.

    Non-finite floats in ``meta`` are written as JSON's common ``Infinity`` / ``NaN`` extension, which
    :func:`decode_blob` reads back exactly: a model's fit report holds an infinite validation error after a fit on
    absurd data, and ``input_limit=inf`` is a valid setting. Strict JSON refused them, every checkpoint then failed
    and serve stopped on each restart at the same data."""
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    tensors = st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()}) if arrays else b""
    body = _META_LEN.pack(len(meta_bytes)) + meta_bytes + tensors
    return _HEADER.pack(MAGIC, FORMAT_VERSION, hashlib.sha256(body).digest()) + body


def decode_blob(blob: bytes) -> tuple[dict[str, Any], ArrayDict]:
    """Inverse of :func:`encode_blob`; raises :class:`CorruptState` on anything unexpected."""
    if len(blob) < _HEADER.size + _META_LEN.size:
        raise CorruptState(f"state blob too short ({len(blob)} bytes)")
    magic, version, digest = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise CorruptState("not a tidecast state blob (bad magic)")
    if version != FORMAT_VERSION:
        raise CorruptState(f"state format version {version}; this build reads {FORMAT_VERSION}")
    body = memoryview(blob)[_HEADER.size:]
    if hashlib.sha256(body).digest() != digest:
        raise CorruptState("state blob checksum mismatch")
    (meta_len,) = _META_LEN.unpack_from(body)
    start = _META_LEN.size
    try:
        meta = json.loads(bytes(body[start:start + meta_len]))
        tensors = bytes(body[start + meta_len:])
        arrays = dict(st_load(tensors)) if tensors else {}
    except (ValueError, UnicodeDecodeError, SafetensorError, RecursionError) as err:  # checksum passed: a writer
        raise CorruptState(f"unreadable state blob: {err}") from err                     # bug, or a forgery
    if not isinstance(meta, dict):
        raise CorruptState(f"state blob metadata is a JSON {type(meta).__name__}, not an object")
    return meta, arrays


def checked_rows(items: Any, arrays: ArrayDict) -> SeriesRows:
    """``items`` (one dict per series) and ``arrays`` as a :class:`SeriesRows`, or :class:`CorruptState` when they
    cannot be one: a series without a string id, an id twice, an array that does not hold one row per series."""
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("series_id"), str)
                                              for i in items):
        raise CorruptState("a series state without a series id")
    if len({i["series_id"] for i in items}) != len(items):
        raise CorruptState("a series state that holds one series twice")
    if any(np.ndim(v) == 0 or len(v) != len(items) for v in arrays.values()):
        raise CorruptState(f"a series state whose arrays do not hold its {len(items)} series")
    return SeriesRows(items, arrays)


def config_fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of an engine configuration that saved state depends on. ``levels`` only when set: state saved
    before levels existed had the one level of ``alpha``, which is what no ``levels`` means."""
    found = {k: config.get(k) for k in FINGERPRINT_FIELDS}
    if config.get("levels") is not None:
        found["levels"] = config["levels"]
    return found


def check_fingerprint(saved: dict[str, Any] | None, current: dict[str, Any], where: str) -> None:
    if saved is None:
        return
    a, b = _comparable(saved), _comparable(current)
    diff = {k: (saved.get(k, a.get(k)), current.get(k, b.get(k))) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)}
    if diff:
        # name the settings that differ as written (a default that follows another setting, such as no --max-gap
        # following --horizon, differed only through it and was listed as "(None, None)")
        diff = {k: pair for k, pair in diff.items() if pair[0] != pair[1]} or diff
        raise IncompatibleState(
            f"state in {where} was written with a different engine configuration {diff} (saved, current); "
            "use a new --group-id (and --state-dir, and --changelog-topic if you set one) to start fresh, or "
            "restore the old configuration")


def _comparable(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint with settings that mean the same spelled one way. ``alpha`` alone is the one level
    ``100 (1 - alpha)``: ``--alpha 0.1`` and ``--level 90`` save the same arrays (the first level sets ``alpha``).
    ``freq`` is its step in nanoseconds (``1h`` and ``60min`` are one grid), and no ``max_gap`` is its default, the
    horizon: each pair was refused as "a different engine configuration", whose only advice is to start over."""
    out = dict(fingerprint)
    if isinstance(out.get("freq"), str):
        with contextlib.suppress(ValueError):  # not a step this build reads: compared as written
            out["freq"] = int(grid_step(out["freq"]).value)
    if out.get("max_gap") is None and "horizon" in out:
        out["max_gap"] = out["horizon"]
    alpha = out.get("alpha")
    if out.get("levels") is None and isinstance(alpha, int | float):
        out["levels"] = [100.0 * (1.0 - alpha)]
    if out.get("levels") is not None:
        out["levels"] = [round(float(level), 9) for level in out["levels"]]
    if isinstance(alpha, int | float):  # --level 99.9 makes alpha (100 - 99.9) / 100 = 0.0009999999999999432
        out["alpha"] = round(float(alpha), 12)
    return out


# -- per-series tables ----------------------------------------------------------------------------------
@dataclass
class SeriesRows:
    """State of several series: one meta dict per series and arrays whose first axis runs over them."""

    meta: list[dict[str, Any]]
    arrays: ArrayDict

    def __len__(self) -> int:
        return len(self.meta)

    @property
    def series_ids(self) -> list[str]:
        return [m["series_id"] for m in self.meta]

    def take(self, index: Iterable[int]) -> SeriesRows:
        idx = np.asarray(list(index), dtype=np.int64)
        return SeriesRows([self.meta[i] for i in idx.tolist()], {k: v[idx] for k, v in self.arrays.items()})

    def rows(self) -> Iterable[tuple[str, SeriesRows]]:
        """One single-series table per series."""
        for i, item in enumerate(self.meta):
            yield item["series_id"], SeriesRows([item], {k: v[i:i + 1] for k, v in self.arrays.items()})

    @staticmethod
    def concat(parts: list[SeriesRows]) -> SeriesRows:
        parts = [p for p in parts if len(p)]
        if not parts:
            return SeriesRows([], {})
        keys = parts[0].arrays.keys()
        for p in parts[1:]:
            if p.arrays.keys() != keys:
                raise IncompatibleState("series states with different array layouts cannot be combined")
        return SeriesRows([m for p in parts for m in p.meta],
                          {k: _stack(k, [p.arrays[k] for p in parts]) for k in keys})

    def applied_offsets(self) -> dict[str, tuple[int, int]]:
        """``series_id -> (partition, offset)`` of the last applied observation."""
        parts = self.arrays.get("engine/applied_partition")
        offs = self.arrays.get("engine/applied_offset")
        if parts is None or offs is None:
            return {}
        return {sid: (int(p), int(o)) for sid, p, o in zip(self.series_ids, parts.tolist(), offs.tolist(),
                                                           strict=True)}


def _stack(key: str, arrays: list[np.ndarray]) -> np.ndarray:
    """Rows of several exports of one array. Byte blobs (``uint8``, a river model's JSON state) are padded to the
    widest: each export pads to its own longest state, so two partitions' blobs differ in width (their lengths
    are kept beside them); any other shape mismatch is a layout this process cannot combine."""
    if len({a.shape[1:] for a in arrays}) > 1:
        if not all(a.dtype == np.uint8 and a.ndim == 2 for a in arrays):
            raise IncompatibleState(f"series states with different shapes of {key!r} cannot be combined")
        width = max(a.shape[1] for a in arrays)
        arrays = [np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in arrays]
    return np.concatenate(arrays)


_Entry = tuple[SeriesRows, int, int]  # the block holding a series' state, its row there, its applied offset


class LatestRows(Mapping[str, SeriesRows]):
    """The newest state of each series over whole blocks of series, kept unsplit: the higher applied offset wins,
    the later on a tie. Plain last-value-wins would let a late write from a member that lost the partition (no
    transactions fence it) replace a newer state with an older one; a series' applied offset only ever grows.

    A restore folds a partition's blocks (changelog records, a local snapshot) into this and assembles one table at
    the end (:meth:`table`): a 10,000-series partition is a few hundred row selections, not 10,000 one-row
    tables concatenated. As a mapping it reads like ``{series_id: one-row SeriesRows}``.

    >>> block = SeriesRows([{"series_id": "a"}, {"series_id": "b"}],
    ...                    {"engine/applied_offset": np.array([5, 6]), "x": np.array([1.0, 2.0])})
    >>> late = SeriesRows([{"series_id": "a"}], {"engine/applied_offset": np.array([4]), "x": np.array([9.0])})
    >>> latest = LatestRows()
    >>> latest.add(block); latest.add(late)  # a late writer's older state of "a" loses
    >>> sorted(latest), latest.table().arrays["x"].tolist()
    (['a', 'b'], [1.0, 2.0])
    """

    def __init__(self) -> None:
        self._at: dict[str, _Entry] = {}

    def add(self, block: SeriesRows, newest: bool = True) -> None:
        """Take each series of ``block`` if it is at least as advanced as the one held (every one with
        ``newest=False``: within one checkpoint group the later record wins)."""
        applied = block.arrays.get("engine/applied_offset")
        offsets = applied.tolist() if applied is not None and len(applied) == len(block) else [-1] * len(block)
        for row, (sid, offset) in enumerate(zip(block.series_ids, offsets, strict=True)):
            self._put(sid, (block, row, int(offset)), newest)

    def absorb(self, other: LatestRows) -> None:
        """Fold another set in, keeping the more advanced state of each series."""
        for sid, entry in other._at.items():
            self._put(sid, entry, True)

    def _put(self, sid: str, entry: _Entry, newest: bool) -> None:
        held = self._at.get(sid)
        if not newest or held is None or entry[2] >= held[2]:
            self._at[sid] = entry

    def table(self) -> SeriesRows:
        """All held states as one table, in first-seen order (one row selection per run of a block)."""
        parts: list[SeriesRows] = []
        run_block: SeriesRows | None = None
        run: list[int] = []
        for block, row, _ in self._at.values():
            if block is not run_block:
                if run_block is not None:
                    parts.append(run_block.take(run))
                run_block, run = block, []
            run.append(row)
        if run_block is not None:
            parts.append(run_block.take(run))
        return SeriesRows.concat(parts)

    def __getitem__(self, sid: str) -> SeriesRows:
        block, row, _ = self._at[sid]
        return block.take([row])

    def __iter__(self) -> Iterator[str]:
        return iter(self._at)

    def __len__(self) -> int:
        return len(self._at)


def _pack_shared(shared: SharedState) -> tuple[dict[str, Any], ArrayDict]:
    meta = {name: m for name, (_, m) in shared.items()}
    arrays = {f"shared/{name}/{k}": v for name, (arrs, _) in shared.items() for k, v in arrs.items()}
    return meta, arrays


def _unpack_shared(meta: dict[str, Any], arrays: ArrayDict) -> SharedState:
    for name, lane in meta.items():
        _check_shared_meta(name, lane)
    out: SharedState = {name: ({}, m) for name, m in meta.items()}
    for key, value in arrays.items():
        if key.startswith("shared/"):
            name, _, sub = key[len("shared/"):].partition("/")
            out.setdefault(name, ({}, {}))[0][sub] = value
    return out


def _check_shared_meta(name: str, meta: Any) -> None:
    """A lane's shared JSON: an object, whose engine entries are objects or null: ``lane_clock`` of whole numbers
    (or nulls), ``retrain`` with a ``policy`` object whose ``version`` is a whole number. Read before any import
    (the version picks the newest of several partitions' states: a string there stopped every restore)."""
    def whole(value: Any) -> bool:
        return type(value) is int

    clock, retrain = (meta.get(k) if isinstance(meta, dict) else None for k in ("lane_clock", "retrain"))
    policy = retrain.get("policy") if isinstance(retrain, dict) else None
    fits = (isinstance(meta, dict) and isinstance(clock, dict | None) and isinstance(retrain, dict | None)
            and (clock is None or all(v is None or whole(v) for v in clock.values()))
            and isinstance(policy, dict | None) and (policy is None or whole(policy.get("version", 0))))
    if not fits:
        raise CorruptState(f"the shared state of lane {name!r} is not a JSON object of the expected shape")


def shared_digest(arrays: ArrayDict, meta: dict[str, Any]) -> str:
    """A content hash, so unchanged shared state is not re-sent on every checkpoint."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()


def _is_empty_shared(arrays: ArrayDict, meta: dict[str, Any]) -> bool:
    return not arrays and not meta


# -- snapshots ---------------------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """A partition's state at one checkpoint.

    position: the next input offset; every record below it is reflected in the state (applied, skipped as a
        duplicate, or dead-lettered).
    changelog_offset: the changelog partition's next offset after this checkpoint's group; a restore reads the
        changelog from here to catch up with anything written later (by another consumer).
    """

    topic: str
    partition: int
    position: int
    changelog_offset: int
    config: dict[str, Any] | None
    rows: SeriesRows
    shared: SharedState = field(default_factory=dict)
    written_at: float = 0.0
    group: str | None = None  # the consumer group it was written for (None: written before snapshots recorded it)

    def to_blob(self) -> bytes:
        shared_meta, shared_arrays = _pack_shared(self.shared)
        meta = {"kind": "snapshot", "topic": self.topic, "partition": self.partition, "position": self.position,
                "changelog_offset": self.changelog_offset, "config": self.config, "series": self.rows.meta,
                "shared": shared_meta, "written_at": self.written_at}
        if self.group is not None:
            meta["group"] = self.group
        arrays = {f"series/{k}": v for k, v in self.rows.arrays.items()} | shared_arrays
        return encode_blob(meta, arrays)

    @classmethod
    def from_blob(cls, blob: bytes) -> Snapshot:
        meta, arrays = decode_blob(blob)
        if meta.get("kind") != "snapshot":
            raise CorruptState(f"expected a snapshot, got {meta.get('kind')!r}")
        try:
            rows = checked_rows(meta["series"], {k[len("series/"):]: v for k, v in arrays.items()
                                                 if k.startswith("series/")})
            snapshot = cls(str(meta["topic"]), int(meta["partition"]), int(meta["position"]),
                           int(meta["changelog_offset"]), meta.get("config"), rows,
                           _unpack_shared(meta.get("shared") or {}, arrays), float(meta.get("written_at", 0.0)),
                           meta.get("group"))
        except CorruptState:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CorruptState(f"snapshot without a valid {err}") from err
        if not (0 <= snapshot.position < 2**63 and 0 <= snapshot.changelog_offset < 2**63):
            raise CorruptState(f"snapshot with an offset out of range ({snapshot.position}, "
                               f"{snapshot.changelog_offset})")
        return snapshot


class LocalStateStore:
    """Per-partition snapshots in a directory, written atomically.

    Every snapshot records the topic, partition and consumer group it belongs to, and :meth:`load` refuses one
    that names another (a file copied into the wrong slot would otherwise hand a partition someone else's state,
    and its position would skip records): the restore then rebuilds the partition from the changelog. A snapshot
    written before snapshots recorded their group is accepted once, with a warning, and rewritten with it.
    ``skipped`` counts the snapshots refused or unreadable.
    """

    SUFFIX = ".tcs"

    def __init__(self, root: str | Path, group: str, topic: str) -> None:
        self.group = group
        self.topic = topic
        self.dir = Path(root) / _safe_name(group) / _safe_name(topic)
        self.dir.mkdir(parents=True, exist_ok=True)
        # the folder earlier versions used for a name with other characters (shared by "team/a" and "team_a"):
        # read there until this folder holds the partition; a snapshot there of another group is refused on load
        legacy = Path(root) / _plain_name(group) / _plain_name(topic)
        self.legacy_dir = legacy if legacy != self.dir and not {group, topic} & {".", ".."} else None
        self.skipped = 0
        self._remove_partial_writes()

    def path(self, partition: int) -> Path:
        return self.dir / f"partition-{partition:05d}{self.SUFFIX}"

    def save(self, snapshot: Snapshot) -> None:
        """Write ``snapshot`` as this store's group's (the store owns the identity it checks on load)."""
        write_atomic(self.path(snapshot.partition), replace(snapshot, group=self.group).to_blob())

    def load(self, partition: int) -> Snapshot | None:
        """The partition's snapshot, or ``None`` if there is none, it is unreadable or it belongs elsewhere
        (logged; the changelog is used instead)."""
        path = self.path(partition)
        if not path.exists() and self.legacy_dir is not None and (self.legacy_dir / path.name).is_file():
            path = self.legacy_dir / path.name
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:  # a directory or an unreadable file where the snapshot should be
            return self._skip(f"ignoring local state {path}: {err} (restoring from the changelog)")
        try:
            snapshot = Snapshot.from_blob(blob)
        except CorruptState as err:
            return self._skip(f"ignoring local state {path}: {err} (restoring from the changelog)")
        wanted = {"topic": self.topic, "partition": partition, "group": self.group}
        found = {"topic": snapshot.topic, "partition": snapshot.partition, "group": snapshot.group}
        wrong = {k: v for k, v in found.items() if v != wanted[k] and not (k == "group" and v is None)}
        if wrong:
            said = ", ".join(f"{k} {v!r}" for k, v in wrong.items())
            return self._skip(f"ignoring local state {path}: it was written for {said}, not for "
                              f"{', '.join(f'{k} {wanted[k]!r}' for k in wrong)} (a file copied into the wrong "
                              "slot?); restoring the partition from the changelog")
        if snapshot.group is None:
            log.warning("local state %s was written before snapshots recorded their consumer group; accepting it "
                        "for group %r once and rewriting it with the group", path, self.group)
            self.save(snapshot)
            snapshot.group = self.group
        return snapshot

    def _skip(self, message: str) -> None:
        log.warning("%s", message)
        self.skipped += 1
        return None

    def partitions(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.dir.glob(f"partition-*{self.SUFFIX}"))

    def _remove_partial_writes(self) -> None:
        """Delete what a crash between write and rename left (:func:`write_atomic`'s temp files) once it is
        :data:`STALE_TEMP_SECONDS` old. Age, not the writer's pid: members sharing one state directory would
        otherwise delete each other's snapshot half-way (failing the writer's rename, so its checkpoint, so its
        service), and a pid says nothing across containers (both are often pid 1)."""
        now = time.time()
        for tmp in self.dir.glob(".*.tmp-*"):
            try:
                if now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                    tmp.unlink(missing_ok=True)
            except FileNotFoundError:  # its writer renamed it meanwhile
                continue


#: Age past which a snapshot's temp file is a crash's leftover: a live write renames it within seconds.
STALE_TEMP_SECONDS = 900.0


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _safe_name(name: str) -> str:
    """``name`` as one folder name, distinct for distinct names: kept when it is plain (letters, digits, ``._-``;
    not ``.`` or ``..``, which would leave the state directory), else made plain and suffixed with a hash of the
    name (``team/a`` and ``team_a`` shared one folder and overwrote each other's snapshots)."""
    plain = _plain_name(name)
    if plain == name and name not in ("", ".", ".."):
        return name
    return f"{plain.strip('.')}~{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"


def _plain_name(name: str) -> str:
    """``name`` with every character but letters, digits and ``._-`` made ``_``: the folder name of versions before
    the hash suffix."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "_"


# -- changelog ---------------------------------------------------------------------------------------------
@dataclass
class ChangelogTail:
    """What a changelog partition adds on top of a base: complete groups only, last value per key."""

    rows: LatestRows = field(default_factory=LatestRows)
    shared: SharedState = field(default_factory=dict)
    position: int | None = None  # input position of the last complete group
    config: dict[str, Any] | None = None
    next_offset: int = 0  # changelog offset after the last complete group
    end_offset: int = 0  # changelog highwater when read
    n_records: int = 0
    n_bytes: int = 0  # keys and values read
    n_incomplete: int = 0  # records after the last marker (an interrupted checkpoint), ignored
    last_group_short: bool = False  # the last group held fewer series than its marker says (read from mid-group)
    n_skipped: int = 0  # records that are no state blob (or not one of ours), skipped with a warning
    written_at: float = 0.0  # when the last complete group's marker was written (0: unknown)

    @property
    def empty(self) -> bool:
        return self.position is None


class TailReader:
    """Folds changelog records (in offset order) into a :class:`ChangelogTail`.

    A record that is no state blob, or a blob of an unknown kind or shape (written by something else, damaged), is
    skipped with a warning naming ``where`` (topic and partition) and its offset, and counted in ``n_skipped``:
    one stray record must not stop every restore of the partition.
    """

    def __init__(self, start: int, where: str = "changelog", quiet: bool = False) -> None:
        self.tail = ChangelogTail(next_offset=start)
        self.where = where
        self.quiet = quiet  # keep the warnings in ``held`` instead of logging them
        self.held: list[str] = []
        self._rows = LatestRows()  # the open group's series
        self._shared: SharedState = {}

    def add(self, offset: int, key: bytes | None, value: bytes | None) -> None:
        self.tail.n_records += 1
        self.tail.n_bytes += len(key or b"") + len(value or b"")
        if value is None:  # a tombstone: not ours
            return
        try:
            self._fold(offset, value)
        except (CorruptState, KeyError, TypeError, ValueError) as err:
            self.tail.n_skipped += 1
            shown = key[:64] if key is not None else None
            text = (f"skipping changelog record at {self.where} offset {offset} (key {shown!r}): "
                    f"{err if isinstance(err, CorruptState) else f'{type(err).__name__}: {err}'}; restoring the rest")
            if self.quiet:
                self.held.append(text)
            else:
                log.warning("%s", text)

    def _fold(self, offset: int, value: bytes) -> None:
        meta, arrays = decode_blob(value)
        kind = meta.get("kind")
        if kind == "series":  # one series (``series`` is its dict) or a block (a list of them)
            items = meta["series"] if isinstance(meta["series"], list) else [meta["series"]]
            if not items:
                raise CorruptState("a series record without a series")
            self._rows.add(checked_rows(items, arrays), newest=False)
        elif kind == "shared":
            _check_shared_meta(str(meta["model"]), meta["meta"])
            self._shared[str(meta["model"])] = (arrays, dict(meta["meta"]))
        elif kind == "checkpoint":
            if not 0 <= int(meta["position"]) < 2**63:  # checked before it closes a group
                raise CorruptState(f"a checkpoint marker at position {meta['position']}")
            self._close_group(offset, meta)
        else:
            raise CorruptState(f"unknown changelog record kind {kind!r}")

    def _close_group(self, offset: int, meta: dict[str, Any]) -> None:
        short = len(self._rows) < int(meta.get("n_series") or 0)
        self.tail.last_group_short = short
        self.tail.rows.absorb(self._rows)
        self.tail.shared.update(self._shared)
        self._rows, self._shared = LatestRows(), {}
        # Every record below a complete group's position is reflected in the series states (see :class:`LatestRows`),
        # so the highest such position is a safe place to resume. A group short of series (a record of it skipped,
        # or read from its middle) is not: its missing series keep an older group's state, and resuming at its
        # position skipped their records in between for good (a block of 150 series reset their models). Resuming
        # at the last complete group's re-reads those; the series the short group holds skip them by their applied
        # offsets.
        if not short:
            self.tail.position = max(int(meta["position"]), self.tail.position or 0)
        elif self.tail.position is None:
            self.tail.position = 0  # no complete group before it: from the partition's start
        self.tail.config = meta.get("config")
        self.tail.written_at = max(self.tail.written_at, float(meta.get("written_at") or 0.0))
        self.tail.next_offset = offset + 1

    def finish(self, end_offset: int) -> ChangelogTail:
        self.tail.end_offset = end_offset
        self.tail.n_incomplete = len(self._rows) + len(self._shared)
        return self.tail


def series_record(item: dict[str, Any], arrays: ArrayDict) -> bytes:
    return encode_blob({"kind": "series", "series": item}, arrays)


def series_blocks(rows: SeriesRows, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[bytes, bytes]]:
    """``(key, record)`` of ``rows`` in blocks of consecutive series of about ``block_bytes`` each (at least one
    series a block); the key is the block's first series id."""
    if not len(rows):
        return
    per_series = max(1, sum(v.nbytes for v in rows.arrays.values()) // len(rows))
    size = max(1, block_bytes // per_series)
    for lo in range(0, len(rows), size):
        block = rows.take(range(lo, min(lo + size, len(rows))))
        key = key_bytes(SERIES_BLOCK_KEY_PREFIX + block.meta[0]["series_id"])
        yield key, encode_blob({"kind": "series", "series": block.meta}, block.arrays)


def shared_record(model: str, arrays: ArrayDict, meta: dict[str, Any]) -> bytes:
    return encode_blob({"kind": "shared", "model": model, "meta": meta}, arrays)


def marker_record(position: int, config: dict[str, Any] | None, n_series: int, n_records: int = 0) -> bytes:
    """The record that closes a checkpoint group; ``n_records`` counts the group's records, this one included,
    so that a reader finding the last marker knows where its group starts (the producer is idempotent: a group's
    records are contiguous and in order)."""
    return encode_blob({"kind": "checkpoint", "position": position, "config": config, "n_series": n_series,
                        "records": n_records, "written_at": time.time()}, {})


class ChangelogStore:
    """Writes checkpoint groups to, and reads them back from, a changelog topic (kafka-python clients).

    ``producer`` is shared and thread-safe; ``consumer_factory`` builds the group-less consumer used to read
    partitions back (owned by the thread that restores). ``progress`` is called on every fetch of a read and while
    waiting for the cluster, so a long restore or an outage keeps the calling thread's heartbeat fresh. With a
    ``link`` (:class:`~tidecast.stream.kafka.BrokerLink`) an unreachable cluster is waited out within the outage
    budget; without one, a read that makes no progress for ``timeout_seconds`` and a write not acknowledged within
    it fail.
    """

    def __init__(self, topic: str, producer: Any, consumer_factory: Callable[[], Any],
                 timeout_seconds: float = 30.0, progress: Callable[[], None] | None = None,
                 link: BrokerLink | None = None, block_bytes: int = BLOCK_BYTES) -> None:
        self.topic = topic
        self.block_bytes = block_bytes
        self.producer = producer
        self._consumer_factory = consumer_factory
        self._consumer = None
        self.timeout_seconds = timeout_seconds
        self._progress = progress
        self.link = link
        self.bytes_written = 0

    def write(self, groups: list[tuple[int, SeriesRows, SharedState, int]], config: dict[str, Any] | None
              ) -> dict[int, int]:
        """Send checkpoint groups ``(partition, series, shared state, position)`` and wait until they are durable;
        returns each partition's next changelog offset. :attr:`bytes_written` adds up what was sent."""
        markers = {}
        for partition, rows, shared, position in groups:
            n = 1
            for key, record in series_blocks(rows, self.block_bytes):
                self._send(key, record, partition)
                n += 1
            for model, (arrays, meta) in shared.items():
                self._send((SHARED_KEY_PREFIX + model).encode(), shared_record(model, arrays, meta), partition)
                n += 1
            markers[partition] = self._send(MARKER_KEY.encode(), marker_record(position, config, len(rows), n),
                                            partition)
        if self.link is None:
            self.producer.flush(timeout=self.timeout_seconds)
        else:
            self.link.call(f"writing changelog {self.topic}",
                           lambda timeout: self.producer.flush(timeout=timeout), self._progress)
        # The producer is idempotent and ordered per partition: the marker landing means its group landed.
        offsets = {}
        for p, marker in markers.items():
            try:
                offsets[p] = marker.get(timeout=self.timeout_seconds).offset + 1
            except Exception as err:
                if self.link is not None and is_unavailable(err):  # the producer gave up after the whole budget
                    raise BrokerUnavailable(f"changelog {self.topic}[{p}] was not written within the outage "
                                            f"budget ({self.link.budget:.0f} s): {err!r}") from err
                raise
        return offsets

    def _send(self, key: bytes, value: bytes, partition: int) -> Any:
        self.bytes_written += len(key) + len(value)

        def send(_timeout: float = 0.0) -> Any:
            return self.producer.send(self.topic, key=key, value=value, partition=partition)

        if self.link is None:
            return send()
        try:
            return send()
        except Exception as err:
            if not is_unavailable(err):
                raise
            return self.link.call(f"writing changelog {self.topic}", send, self._progress)

    def read(self, partition: int, start: int) -> ChangelogTail:
        """Complete checkpoint groups of ``partition`` from offset ``start`` to the current end."""
        reader = TailReader(start, f"{self.topic}[{partition}]")
        end = self._fetch(partition, start, reader.add)
        return reader.finish(end)

    def read_latest(self, partition: int, start: int = 0) -> ChangelogTail:
        """Like :meth:`read`, but from the start of the last complete group when that is later than ``start``, and
        only up to that group's marker: every group holds the whole partition, so a restore reads one group's
        worth, not the changelog's history (which only grows where the topic is not compacted) nor the records of
        a checkpoint interrupted after it (which a restore ignores anyway)."""
        base, marker = self.last_group(partition)
        if base <= start:
            return self.read(partition, start)
        reader = TailReader(base, f"{self.topic}[{partition}]", quiet=True)
        tail = reader.finish(self._fetch(partition, base, reader.add, stop=marker + 1))
        if tail.empty or tail.last_group_short:
            # the group was not where its marker said (a foreign record inside it): read everything from start
            return self.read(partition, start)
        for text in reader.held:
            log.warning("%s", text)
        return tail

    def last_group(self, partition: int) -> tuple[int, int]:
        """``(first offset, marker offset)`` of the last complete group; ``(0, -1)`` when no marker turns up.

        Windows of records before the end are read, each 8 times longer than the one after it and never read
        twice, until one holds a marker: the cost is about what follows the last marker (a checkpoint cut off by
        a crash) plus the window that finds it."""
        end = self._end(partition)
        back, stop = 64, end
        while stop > 0:
            start = max(0, stop - back)
            found: list[tuple[int, int]] = []

            def marker(offset: int, key: bytes | None, value: bytes | None,
                       found: list[tuple[int, int]] = found) -> None:
                if key == _MARKER and value is not None:
                    try:
                        meta, _ = decode_blob(value)
                        first = offset - int(meta["records"]) + 1 if meta.get("records") else 0
                        found.append((max(0, first), offset))
                    except (CorruptState, KeyError, TypeError, ValueError):
                        pass

            self._fetch(partition, start, marker, stop=stop)
            if found:
                return found[-1]
            stop, back = start, back * 8
        return 0, -1

    def _end(self, partition: int) -> int:
        """The partition's highwater, off one fetch response (ListOffsets is not trusted on every broker)."""
        from kafka import TopicPartition

        consumer = self._reader()
        tp = TopicPartition(self.topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        deadline = time.monotonic() + self.timeout_seconds
        while consumer.highwater(tp) is None:
            consumer.poll(timeout_ms=200, max_records=1)
            if self._progress is not None:
                self._progress()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer reading the end of changelog {self.topic}[{partition}]")
        return int(consumer.highwater(tp))

    def _fetch(self, partition: int, start: int, sink: Callable[[int, bytes | None, bytes | None], None],
               stop: int | None = None) -> int:
        """Feed ``sink(offset, key, value)`` every record from ``start`` to the end, or to before offset ``stop``;
        returns the end offset (the partition's highwater)."""
        from kafka import TopicPartition

        consumer = self._reader()
        tp = TopicPartition(self.topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, start)
        where = f"reading changelog {self.topic}[{partition}]"
        # Without progress for this long the cluster counts as unreachable (waited out within the outage budget
        # when there is a link).
        stall = min(self.timeout_seconds, self.link.attempt_seconds) if self.link else self.timeout_seconds
        deadline = time.monotonic() + stall
        while True:
            fetched = False
            done = False
            for records in consumer.poll(timeout_ms=200).values():
                for rec in records:
                    if stop is not None and rec.offset >= stop:
                        done = True
                        break
                    sink(rec.offset, rec.key, rec.value)
                    fetched = True
            if self._progress is not None:
                self._progress()
            # highwater comes with every fetch response (ListOffsets is not trusted: some brokers get it wrong).
            highwater = consumer.highwater(tp)
            limit = highwater if stop is None or highwater is None else min(stop, highwater)
            if done or (limit is not None and consumer.position(tp) >= limit):
                if self.link is not None:
                    self.link.ok()
                return highwater if highwater is not None else stop  # records came, so a highwater did too
            if fetched:
                deadline = time.monotonic() + stall
            elif time.monotonic() > deadline:
                stalled = TimeoutError(f"{where}: no progress for {stall:.0f} s")
                if self.link is None:
                    raise stalled
                self.link.failed(where, stalled)  # raises once the outage outlasts the budget
                deadline = time.monotonic() + stall

    def _reader(self) -> Any:
        if self._consumer is None:
            if self.link is None:
                self._consumer = self._consumer_factory()
            else:
                self._consumer = self.link.call(f"connecting to read changelog {self.topic}",
                                                lambda _timeout: self._consumer_factory(), self._progress)
        return self._consumer

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


def merge(base: Snapshot | None, tail: ChangelogTail, topic: str, partition: int) -> Snapshot | None:
    """The newest state of a partition: ``base`` (local snapshot) updated by the changelog groups after it."""
    if tail.empty:
        return base
    rows = LatestRows()
    if base is not None:
        rows.add(base.rows)
    rows.absorb(tail.rows)
    shared = dict(base.shared) if base is not None else {}
    shared.update(tail.shared)
    assert tail.position is not None
    position = max(tail.position, base.position if base is not None else 0)
    config = tail.config if tail.config is not None else (base.config if base is not None else None)
    written_at = max(tail.written_at, base.written_at if base is not None else 0.0) or time.time()  # when written
    return Snapshot(topic, partition, position, tail.next_offset, config, rows.table(), shared, written_at)


def nonempty_shared(shared: SharedState) -> SharedState:
    return {k: v for k, v in shared.items() if not _is_empty_shared(*v)}
