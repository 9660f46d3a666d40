"""Process-wide settings for the numeric libraries behind the models.

Small models are latency-bound, not throughput-bound: on a 2-core machine one intra-op thread runs them 5-40x
faster than torch's default pool (thread hand-off costs more than the maths), so tidecast uses one thread
unless told otherwise. torch is only touched if a model has already imported it.
"""

from __future__ import annotations

import sys


def set_torch_threads(n_threads: int) -> None:
    """Set torch's intra-op threads if torch is in use; no-op otherwise (and never imports it)."""
    torch = sys.modules.get("torch")
    if torch is not None and n_threads > 0:
        torch.set_num_threads(n_threads)
