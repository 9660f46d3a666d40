"""Process-wide settings for the numeric libraries behind the models.

Small models are latency-bound, not throughput-bound: on a 2-core machine one intra-op thread runs them 5-40x
faster than torch's default pool (thread hand-off costs more than the maths), so tidecast uses one thread
unless told otherwise. torch is only touched if a model has already imported it.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

#: torch has one process-wide random generator: a network built while another thread builds one (two replays in a
#: thread pool) took its initial weights from the other's seed (forecasts differed from a run alone)
_SEEDED = threading.Lock()


def set_torch_threads(n_threads: int) -> None:
    """Set torch's intra-op threads if torch is in use; no-op otherwise (and never imports it)."""
    torch = sys.modules.get("torch")
    if torch is not None and n_threads > 0:
        torch.set_num_threads(n_threads)


@contextlib.contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """torch's global generator seeded with ``seed`` inside, restored after, one thread at a time: what is built
    inside depends on ``seed`` only. (Another thread's own torch draws meanwhile still share the generator.)"""
    import torch

    with _SEEDED, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def torch_threads(n_threads: int) -> Iterator[None]:
    """:func:`set_torch_threads` for the duration of the block, then the caller's count back (a notebook's own
    torch work ran on one thread after a replay)."""
    torch: Any = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    set_torch_threads(n_threads)
    try:
        yield
    finally:
        torch = sys.modules.get("torch")
        if torch is not None and before is not None and torch.get_num_threads() != before:
            torch.set_num_threads(before)
