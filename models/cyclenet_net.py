"""CycleNet's network and its batch training recipe, in plain torch (no streaming, no I/O).

CycleNet (Lin et al., "CycleNet: Enhancing Time Series Forecasting through Modeling Periodic Patterns",
NeurIPS 2024) adds *residual cycle forecasting* (RCF) to a small backbone:

* a learnable table ``Q`` of shape (cycle length W, channels), initialised to zeros, is the mean cycle of
  every channel and is trained jointly with the backbone;
* per input window: instance normalisation (mean and unbiased variance + 1e-5 over the lookback, per channel,
  no affine parameters; switchable) -> subtract the ``Q`` slice aligned with the input -> backbone over the
  time axis, one set of weights for every channel -> add the ``Q`` slice that continues right after the
  input -> undo the normalisation.

The phase of a window is ``tick % W`` of its first input step, where ``tick`` counts grid steps from a fixed
anchor of the *timestamps*; the official loader uses the CSV row number instead, which a gap would shift.

:class:`BatchFit` is the paper's recipe (Adam on MSE, lr flat for 4 epochs then x0.8 per epoch, early stopping
on the validation MSE with patience 5, best weights restored) as a resumable loop, so a streaming wrapper can
run it a slice at a time. The validation MSE is taken over *every* validation window by default; the official
loader instead shuffles them, drops the last partial batch and averages the batch means (``shuffled_val=True``
reproduces that). The noise matters where two epochs score alike: ETTh1 MLP H=720 stops at epoch 1 or 2 by
chance, 0.48 vs 0.54 test MSE.

>>> import numpy as np, torch
>>> net = CycleNet(lookback=8, horizon=4, cycle=6, channels=2)
>>> sum(p.numel() for p in net.parameters())  # 8*4 + 4 backbone + 6*2 cycle table
48
>>> series = np.sin(2 * np.pi * np.arange(400) / 6)[:, None].repeat(2, axis=1)
>>> fit = BatchFit(net, Windows.contiguous(series, np.arange(400), 6, 8, 4),
...                Windows.contiguous(series[300:], np.arange(300, 400), 6, 8, 4), lr=0.01, epochs=3)
>>> fit.run()
True
>>> fit.report["epochs"] <= 3
True
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tidecast.models.runtime import seeded_torch

BACKBONES = ("linear", "mlp")
#: The paper's learning rates at L=96 (ETT scripts of the official repository).
DEFAULT_LR = {"linear": 0.01, "mlp": 0.005}


@functools.cache
def fused_adam_available(device: str = "cpu") -> bool:
    """Whether this torch has a fused Adam kernel for ``device`` (for the CPU, torch >= 2.4).

    Found out once, by building a fused Adam over one tensor and taking a step: an older torch refuses with a
    ``RuntimeError`` ("`fused=True` requires all the params to be floating point Tensors of supported
    devices"). The version number is not read: builds differ, and the kernel is what matters.
    """
    param = torch.zeros(1, device=device, requires_grad=True)
    try:
        optimizer = torch.optim.Adam([param], fused=True)
        param.grad = torch.ones_like(param)
        optimizer.step()
    except RuntimeError:
        return False
    return True


def make_adam(params: Iterable[Any], device: str = "cpu", **options: Any) -> torch.optim.Adam:
    """``torch.optim.Adam``, fused (one kernel per step: a quarter of the per-step overhead on the CPU) where
    :func:`fused_adam_available`, the default implementation otherwise (the same update, up to rounding)."""
    if fused_adam_available(device):
        options["fused"] = True
    return torch.optim.Adam(params, **options)


def normalise_windows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CycleNet's instance normalisation of windows ``x`` (N, L, C) over the steps: ``(x - mean) / std``, the mean
    and the std (unbiased, as in the paper, plus 1e-5 under the root), each (N, 1, C)."""
    mean = x.mean(dim=1, keepdim=True)
    x = x - mean
    # two-pass by hand: torch.var is ~10x slower on CPU here
    std = torch.sqrt(x.square().sum(dim=1, keepdim=True) / (x.shape[1] - 1) + 1e-5)
    return x / std, mean, std


class CycleNet(nn.Module):
    """RCF + a Linear or MLP backbone over time, shared by all channels.

    Parameters
    ----------
    lookback, horizon
        Input length L and output length H.
    cycle
        Cycle length W (rows of the cycle table ``Q``).
    channels
        Columns of ``Q``: one per series (channel) the model serves.
    backbone
        ``"linear"`` (one L->H map) or ``"mlp"`` (L->hidden, ReLU, hidden->H).
    hidden
        Width of the MLP's hidden layer (512 in the paper).
    instance_norm
        Per-window normalisation (RevIN without affine parameters), on in the paper.
    """

    def __init__(
        self,
        lookback: int,
        horizon: int,
        cycle: int,
        channels: int,
        backbone: str = "linear",
        hidden: int = 512,
        instance_norm: bool = True,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
        if cycle < 1 or lookback < 2 or horizon < 1:
            raise ValueError("lookback must be >= 2, horizon and cycle >= 1")
        self.lookback, self.horizon, self.cycle = lookback, horizon, cycle
        self.backbone_kind, self.hidden, self.instance_norm = backbone, hidden, instance_norm
        self.cycle_table = nn.Parameter(torch.zeros(cycle, channels))  # Q
        if backbone == "linear":
            self.backbone = nn.Sequential(nn.Linear(lookback, horizon))
        else:
            self.backbone = nn.Sequential(nn.Linear(lookback, hidden), nn.ReLU(), nn.Linear(hidden, horizon))
        roll = (torch.arange(cycle)[:, None] + torch.arange(lookback + horizon)[None, :]) % cycle
        self.register_buffer("_roll", roll, persistent=False)

    @property
    def channels(self) -> int:
        return self.cycle_table.shape[1]

    def _cycle_window(self, phase: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
        """``Q`` over the input and output steps of each window, (B, L + H, C), in one gather."""
        t = self._roll[phase]  # (phase + step) % W, precomputed for every phase
        if cols is None:
            return self.cycle_table[t]
        if cols.shape[1] == 1:  # one series per window (streaming): gather along that series' column
            return torch.gather(self.cycle_table.T[cols[:, 0]], 1, t)[:, :, None]
        return self.cycle_table.reshape(-1)[t[:, :, None] * self.channels + cols[:, None, :]]

    def forward(self, x: torch.Tensor, phase: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """Forecast ``(B, H, C)`` from ``x`` of shape ``(B, L, C)``.

        ``phase[b]`` is ``tick % W`` of the first input step of window ``b``. ``cols`` (``(B, C)`` long) picks
        the ``Q`` column of every channel of every window; ``None`` means channel ``c`` is column ``c``.
        """
        if self.instance_norm:
            x, mean, std = normalise_windows(x)
        q = self._cycle_window(phase, cols)
        x = x - q[:, : self.lookback]
        y = self.backbone(x.transpose(1, 2)).transpose(1, 2)
        y = y + q[:, self.lookback :]
        if self.instance_norm:
            y = y * std + mean
        return y

    def grow(self, channels: int) -> None:
        """Append zero columns to ``Q`` (new series); an optimizer over the old parameter must be rebuilt."""
        extra = channels - self.channels
        if extra > 0:
            pad = torch.zeros(self.cycle, extra, dtype=self.cycle_table.dtype)
            self.cycle_table = nn.Parameter(torch.cat([self.cycle_table.detach(), pad], dim=1))


def build(
    lookback: int,
    horizon: int,
    cycle: int,
    channels: int,
    backbone: str = "linear",
    hidden: int = 512,
    instance_norm: bool = True,
    seed: int = 0,
) -> CycleNet:
    """A :class:`CycleNet` whose initial weights depend on ``seed`` only (the global RNG is left alone)."""
    with seeded_torch(seed):
        return CycleNet(lookback, horizon, cycle, channels, backbone, hidden, instance_norm)


@dataclass
class Windows:
    """Training windows over a (T, C) array: window ``i`` reads rows ``starts[i] : starts[i] + L + H``.

    ``phases[i]`` is ``tick % W`` of row ``starts[i]``; ``cols`` (N, C), if given, names the ``Q`` column of
    each channel of each window (``None``: channel c is column c). Batches are gathered on the fly, so the
    windows are never materialised.
    """

    data: torch.Tensor
    starts: np.ndarray
    phases: np.ndarray
    cols: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.starts.size)

    @classmethod
    def contiguous(
        cls, values: np.ndarray, ticks: np.ndarray, cycle: int, lookback: int, horizon: int
    ) -> Windows:
        """Every stride-1 window of a gap-free (T, C) block whose row ``t`` has tick ``ticks[t]``."""
        values = np.asarray(values)
        values = values[:, None] if values.ndim == 1 else values
        starts = np.arange(max(values.shape[0] - lookback - horizon + 1, 0))
        phases = np.asarray(ticks, dtype=np.int64)[starts] % cycle
        return cls(torch.as_tensor(values, dtype=torch.float32), starts, phases)

    def batch(self, idx: np.ndarray, lookback: int, horizon: int) -> tuple[torch.Tensor, ...]:
        """``(x, y, phase, cols)`` for windows ``idx``: x (B, L, C), y (B, H, C)."""
        starts = self.starts[idx]
        rows = torch.as_tensor(starts[:, None] + np.arange(lookback + horizon))
        xy = self.data[rows]
        cols = None if self.cols is None else self.cols[torch.as_tensor(idx)]
        return xy[:, :lookback], xy[:, lookback:], torch.as_tensor(self.phases[idx]), cols


def predict(net: CycleNet, windows: Windows, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Forecasts and targets for every window, in order: two (N, H, C) float32 tensors."""
    preds, trues = [], []
    with torch.inference_mode():
        for lo in range(0, len(windows), batch_size):
            idx = np.arange(lo, min(lo + batch_size, len(windows)))
            x, y, phase, cols = windows.batch(idx, net.lookback, net.horizon)
            preds.append(net(x, phase, cols))
            trues.append(y)
    return torch.cat(preds), torch.cat(trues)


def evaluate(net: CycleNet, windows: Windows) -> tuple[float, float]:
    """MSE and MAE over all windows, steps and channels (accumulated in float64)."""
    pred, true = predict(net, windows)
    err = (pred - true).double()
    return float((err**2).mean()), float(err.abs().mean())


class BatchFit:
    """The paper's training recipe as a resumable loop.

    Adam on MSE; batches of ``batch_size`` windows reshuffled every epoch (the last partial batch dropped, as
    the official loader does, unless there is no full batch); lr flat for ``flat_epochs`` epochs, then times
    ``decay`` per epoch; at most ``epochs`` epochs; early stopping when the validation MSE has not improved
    for ``patience`` epochs; the best weights are loaded back at the end. ``val=None`` trains every epoch and
    keeps the last weights. ``shuffled_val`` scores validation the official loader's way (see the module
    docstring); it draws from the same RNG as the training shuffles.

    :meth:`run` advances the loop until it finishes (returns True) or ``budget_seconds`` has passed (returns
    False; call again to continue), one optimiser step at a time. The net is trained in place.
    """

    def __init__(
        self,
        net: CycleNet,
        train: Windows,
        val: Windows | None,
        *,
        lr: float,
        epochs: int = 30,
        patience: int = 5,
        batch_size: int = 256,
        flat_epochs: int = 4,
        decay: float = 0.8,
        seed: int = 0,
        shuffled_val: bool = False,
    ) -> None:
        if len(train) == 0:
            raise ValueError("no training windows")
        self.net, self.train, self.val = net, train, val
        self.lr, self.epochs, self.patience, self.batch_size = lr, epochs, patience, batch_size
        self.flat_epochs, self.decay, self.shuffled_val = flat_epochs, decay, shuffled_val
        self.optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        self.rng = np.random.default_rng(seed)
        self.report: dict[str, Any] = {"epochs": 0, "best_epoch": 0, "val_mse": [], "train_mse": [],
                                       "epoch_seconds": []}
        self.done = False
        self._loop = self._steps()

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 1-based ``epoch``."""
        return self.lr * self.decay ** max(0, epoch - self.flat_epochs)

    def run(self, budget_seconds: float = math.inf) -> bool:
        deadline = time.perf_counter() + budget_seconds
        while not self.done:
            next(self._loop, None)
            if time.perf_counter() >= deadline:
                break
        return self.done

    def _val_mse(self) -> float:
        if not self.shuffled_val:
            return evaluate(self.net, self.val)[0]
        # the official loader's way: shuffled batches, last partial batch dropped, mean of the batch means
        order = self.rng.permutation(len(self.val))
        n_full = max(len(order) // self.batch_size, 1)
        losses = []
        with torch.inference_mode():
            for i in range(n_full):
                x, y, phase, cols = self.val.batch(order[i * self.batch_size : (i + 1) * self.batch_size],
                                                   self.net.lookback, self.net.horizon)
                losses.append(float(torch.mean((self.net(x, phase, cols) - y) ** 2)))
        return float(np.mean(losses))

    def _epoch_batches(self) -> list[np.ndarray]:
        order = self.rng.permutation(len(self.train))
        n_full = len(order) // self.batch_size
        if n_full == 0:
            return [order]
        return [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(n_full)]

    def _steps(self) -> Iterator[None]:
        net, best, best_state, bad = self.net, math.inf, None, 0
        for epoch in range(1, self.epochs + 1):
            began, losses = time.perf_counter(), []
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(epoch)
            net.train()
            for idx in self._epoch_batches():
                x, y, phase, cols = self.train.batch(idx, net.lookback, net.horizon)
                loss = torch.mean((net(x, phase, cols) - y) ** 2)
                if not torch.isfinite(loss):  # shared weights never step on a non-finite loss
                    self.report["skipped_steps"] = self.report.get("skipped_steps", 0) + 1
                    yield
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                losses.append(loss.item())
                yield
            net.eval()
            self.report["train_mse"].append(float(np.mean(losses)) if losses else None)
            self.report["epochs"] = epoch
            if self.val is not None and len(self.val):
                val_mse = self._val_mse()
                self.report["val_mse"].append(val_mse)
                if val_mse <= best:
                    best, bad, self.report["best_epoch"] = val_mse, 0, epoch
                    best_state = copy.deepcopy(net.state_dict())
                else:
                    bad += 1
            self.report["epoch_seconds"].append(time.perf_counter() - began)
            if self.val is not None and bad >= self.patience:
                break
            yield
        if best_state is not None:
            net.load_state_dict(best_state)
        self.done = True
