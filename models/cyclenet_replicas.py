"""B CycleNet replicas as one module: stacked weights, one batched forward, Poisson(1)-weighted training.

:class:`Replicas` holds the backbones and cycle tables of B CycleNets (:class:`~tidecast.models.cyclenet_net.CycleNet`)
stacked along a leading replica axis, so the B forecasts of a batch are one ``einsum`` per layer - no Python loop
over replicas. Each replica starts from its own random initialisation (``seed + 1 + b``) and is trained on a
bootstrap of the data: every (window, series) sample carries a weight ``k ~ Poisson(1)`` per replica (online
bagging, Oza & Russell 2001) - fixed per sample for the warm-start fit (a bootstrap resample of the training
windows), drawn afresh at every replay step online.

>>> import numpy as np, torch
>>> reps = Replicas(3, lookback=8, horizon=4, cycle=6, channels=2)
>>> x, phase = torch.randn(5, 8, 2), torch.arange(5) % 6
>>> reps(x, phase).shape  # (replicas, windows, H, channels)
torch.Size([3, 5, 4, 2])
>>> from tidecast.models.cyclenet_net import build
>>> single = build(8, 4, 6, 2, seed=2)  # replica 1 is the CycleNet seeded 2, bit for bit in float32 tolerance
>>> torch.allclose(reps(x, phase)[1], single(x, phase), atol=1e-6)
True
>>> cols = torch.tensor([[0], [1], [1], [0], [1]])  # one series per window: the fast path, the same numbers
>>> torch.allclose(reps(x[:, :, :1], phase, cols)[1], single(x[:, :, :1], phase, cols), atol=1e-6)
True
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from tidecast.models.cyclenet_net import Windows, make_adam, normalise_windows
from tidecast.models.cyclenet_net import build as build_net


class Replicas(nn.Module):
    """B CycleNets' parameters stacked on axis 0 (see the module docstring); the same arguments as
    :class:`~tidecast.models.cyclenet_net.CycleNet`, plus ``replicas`` and ``seed``."""

    def __init__(self, replicas: int, lookback: int, horizon: int, cycle: int, channels: int,
                 backbone: str = "linear", hidden: int = 512, instance_norm: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.replicas, self.lookback, self.horizon, self.cycle = replicas, lookback, horizon, cycle
        self.backbone_kind, self.hidden, self.instance_norm = backbone, hidden, instance_norm
        nets = [build_net(lookback, horizon, cycle, channels, backbone, hidden, instance_norm, seed + 1 + b)
                for b in range(replicas)]
        self.cycle_table = nn.Parameter(torch.stack([n.cycle_table.detach() for n in nets]))  # (B, W, C)
        layers = [m for m in nets[0].backbone if isinstance(m, nn.Linear)]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([[m for m in n.backbone if isinstance(m, nn.Linear)][i].weight.detach()
                                      for n in nets])) for i in range(len(layers)))  # (B, out, in)
        self.biases = nn.ParameterList(
            nn.Parameter(torch.stack([[m for m in n.backbone if isinstance(m, nn.Linear)][i].bias.detach()
                                      for n in nets])) for i in range(len(layers)))  # (B, out)
        roll = (torch.arange(cycle)[:, None] + torch.arange(lookback + horizon)[None, :]) % cycle
        self.register_buffer("_roll", roll, persistent=False)

    @property
    def channels(self) -> int:
        return self.cycle_table.shape[2]

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [*self.weights, *self.biases]

    def forward(self, x: torch.Tensor, phase: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, N, H, C)`` forecasts of every replica from ``x`` (N, L, C); ``phase`` and ``cols`` as in
        :meth:`CycleNet.forward`."""
        if self.instance_norm:  # the same normalisation as CycleNet.forward, shared by the replicas
            x, mean, std = normalise_windows(x)
        t = self._roll[phase]  # (N, L + H)
        if cols is not None and cols.shape[1] == 1:
            y = self._one_series(x[:, :, 0], t, cols[:, 0])[..., None]
        else:
            # Q over the input and output steps of each window: (B, N, L + H, C)
            q = self.cycle_table[:, t] if cols is None else self.cycle_table[:, t[:, :, None], cols[:, None, :]]
            z = x[None] - q[:, :, : self.lookback]  # (B, N, L, C)
            for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
                if i:
                    z = torch.relu(z)
                z = torch.einsum("bnlc,bhl->bnhc", z, w) + b[:, None, :, None]
            y = z + q[:, :, self.lookback :]
        if self.instance_norm:
            y = y * std + mean
        return y

    def _one_series(self, x: torch.Tensor, t: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """One series per window (streaming and replay): ``x`` (N, L) -> (B, N, H), one gather and one batched
        matrix product per layer (the general path's 4-d einsum costs several times more here)."""
        # Q[b, t, col] for each window's steps, read from the flat (B, W * C) table in one index_select (half the
        # time of a column copy and a gather)
        idx = (t * self.channels + col[:, None]).reshape(-1)
        q = torch.index_select(self.cycle_table.reshape(self.replicas, -1), 1, idx).reshape(self.replicas, *t.shape)
        z = x[None] - q[:, :, : self.lookback]
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if i:
                z = torch.relu(z)
            z = torch.baddbmm(b[:, None, :], z, w.transpose(1, 2))  # (B, N, out)
        return z + q[:, :, self.lookback :]

    def grow(self, channels: int) -> None:
        """Append zero columns to every replica's ``Q`` (new series); rebuild an optimiser over it."""
        extra = channels - self.channels
        if extra > 0:
            pad = torch.zeros(self.replicas, self.cycle, extra, dtype=self.cycle_table.dtype)
            self.cycle_table = nn.Parameter(torch.cat([self.cycle_table.detach(), pad], dim=2))

    def load_from(self, other: Replicas, cols: torch.Tensor, source: torch.Tensor | None = None) -> None:
        """Copy ``other``'s backbones, and its cycle columns (``source``, default all) into ``cols`` of this one's
        ``Q``."""
        with torch.no_grad():
            for dst, src in zip(self.backbone_parameters(), other.backbone_parameters(), strict=True):
                dst.copy_(src)
            self.cycle_table[:, :, cols] = other.cycle_table if source is None else other.cycle_table[:, :, source]


def serve_windows(net: nn.Module, replicas: Replicas | None, x: torch.Tensor, phase: torch.Tensor,
                  cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The served CycleNet's forecast ``(N, H)`` of one series per window (``x`` (N, L, 1), ``cols`` (N, 1)) and,
    with ``replicas``, their population standard deviation ``(N, H)``; ``None`` without.

    One pass: ``net`` rides along as replica 0, so each window is normalised and its cycle gathered once into one
    (1 + B)-stacked array, and every backbone layer writes into one output (a batched product for the net, one for
    the replicas). At streaming batch sizes the per-call overhead, not the arithmetic, dominates: at 64 series and
    B = 8 this took ~0.41 ms against ~0.52 ms for the net's forward plus a separate replicas' pass (a loop of
    forecasts alone on this 2-core machine). The forecast is the same with and without replicas to the bit: a
    batched product's slice does not depend on the batch (``nn.Linear`` takes another kernel for small shapes, so
    the net's own ``forward`` may differ from this in the last bit). The spread is not de-normalised per replica
    (shift-free, it scales with the window's std) and is taken by hand: torch's ``std`` over the replica axis took
    ~7x as long."""
    extra = 0 if replicas is None else replicas.replicas
    std = mean = None
    if net.instance_norm:
        x, mean, std = normalise_windows(x)
    t = torch.index_select(net._roll, 0, phase)  # (N, L + H): (phase + step) % W
    # Q[t, col] of every network for each window's steps, each read from its flat (W * C) table by one
    # index_select straight into the stacked array (the net's table may have more columns than the replicas')
    q = torch.empty(1 + extra, t.numel(), dtype=net.cycle_table.dtype)
    col = cols[:, 0, None]
    net_idx = (t * net.channels + col).reshape(-1)
    torch.index_select(net.cycle_table.reshape(1, -1), 1, net_idx, out=q[:1])
    if replicas is not None:
        idx = net_idx if net.channels == replicas.channels else (t * replicas.channels + col).reshape(-1)
        torch.index_select(replicas.cycle_table.reshape(extra, -1), 1, idx, out=q[1:])
    q = q.reshape(1 + extra, *t.shape)
    z = x[None, :, :, 0] - q[:, :, : net.lookback]
    layers = [m for m in net.backbone if isinstance(m, nn.Linear)]
    stacks = [None] * len(layers) if replicas is None else zip(replicas.weights, replicas.biases, strict=True)
    for i, (layer, stack) in enumerate(zip(layers, stacks, strict=True)):
        if i:
            z = torch.relu_(z)
        # each layer's products straight into one (1 + B, N, out) array: the net's, then the replicas' batch
        # (no per-call copy of B weight matrices into a stack)
        out = torch.empty(1 + extra, z.shape[1], layer.out_features, dtype=z.dtype)
        torch.baddbmm(layer.bias[None, None], z[:1], layer.weight[None].transpose(1, 2), out=out[:1])
        if stack is not None:
            w, b = stack
            torch.baddbmm(b[:, None], z[1:], w.transpose(1, 2), out=out[1:])
        z = out
    y = z.add_(q[:, :, net.lookback :])
    forecast, spread = y[0], None
    if replicas is not None:
        spread = (y[1:] - y[1:].mean(dim=0)).square_().mean(dim=0).sqrt_()
    if std is not None:
        forecast = forecast * std[:, :, 0] + mean[:, :, 0]
        spread = None if spread is None else spread * std[:, :, 0]
    return forecast, spread


def weighted_loss(pred: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over replicas of each one's Poisson-weighted MSE: ``pred`` (B, N, H, C), ``y`` (N, H, C), ``weights``
    (B, N, C). Each replica's parameters see only their own term, so the sum trains them independently."""
    err = (pred - y[None]).square().mean(dim=2)  # (B, N, C)
    return (err * weights).sum() / (err.shape[1] * err.shape[2])


def poisson_weights(rng: np.random.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(rng.poisson(1.0, size=shape).astype(np.float32))


class ReplicaFit:
    """The warm-start fit of the replicas: the main fit's recipe (Adam, lr flat then decaying, the same batch
    size) for as many epochs as the main fit's best one, every training window weighted by a fixed
    ``Poisson(1)`` per replica and series. No early stopping: the main fit has chosen the epoch count.
    Resumable like :class:`~tidecast.models.cyclenet_net.BatchFit`: :meth:`run` returns True when done."""

    def __init__(self, reps: Replicas, train: Windows, *, lr: float, epochs: int, batch_size: int,
                 flat_epochs: int = 4, decay: float = 0.8, seed: int = 0) -> None:
        self.reps, self.train, self.lr, self.epochs, self.batch_size = reps, train, lr, epochs, batch_size
        self.flat_epochs, self.decay = flat_epochs, decay
        self.rng = np.random.default_rng(seed + 7919)
        channels = 1 if train.cols is not None else train.data.shape[1]
        self.weights = poisson_weights(self.rng, (reps.replicas, len(train), channels))  # a bootstrap resample
        self.optimizer = torch.optim.Adam(reps.parameters(), lr=lr)
        self.done = False
        self._loop = self._steps()

    def run(self, budget_seconds: float = math.inf) -> bool:
        deadline = time.perf_counter() + budget_seconds
        while not self.done:
            next(self._loop, None)
            if time.perf_counter() >= deadline:
                break
        return self.done

    def _steps(self) -> Iterator[None]:
        reps = self.reps
        for epoch in range(1, self.epochs + 1):
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * self.decay ** max(0, epoch - self.flat_epochs)
            order = self.rng.permutation(len(self.train))
            n_full = max(len(order) // self.batch_size, 1)
            for i in range(n_full):
                idx = order[i * self.batch_size : (i + 1) * self.batch_size]
                x, y, phase, cols = self.train.batch(idx, reps.lookback, reps.horizon)
                loss = weighted_loss(reps(x, phase, cols), y, self.weights[:, torch.as_tensor(idx)])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                yield
        self.done = True


class OnlineReplicas:
    """The serving replicas, their training copy and its Adam (for
    :class:`~tidecast.models.cyclenet.CycleNetForecaster`).

    The forecaster calls :meth:`step` after each of its own replay steps, on the same mini-batch, with fresh
    ``Poisson(1)`` weights, and :meth:`publish` to copy the trained weights into the serving replicas (under its
    lock). State: per-row cycle columns and their Adam moments, shared stacked backbones and theirs.
    """

    def __init__(self, serving: Replicas, lr: float, cycle_lr: float) -> None:
        self.serving = serving
        self.trainer = Replicas(serving.replicas, serving.lookback, serving.horizon, serving.cycle, serving.channels,
                                serving.backbone_kind, serving.hidden, serving.instance_norm)
        self.trainer.load_from(serving, torch.arange(serving.channels))
        self.trainer.train()
        self.opt = make_adam([{"params": self.trainer.backbone_parameters(), "lr": lr},
                              {"params": [self.trainer.cycle_table], "lr": cycle_lr}])
        for p in self.trainer.parameters():  # explicit zero state, so export/import is uniform
            self.opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                 "exp_avg_sq": torch.zeros_like(p)}

    def grow_trainer(self, channels: int) -> None:
        old = self.trainer.cycle_table
        self.trainer.grow(channels)
        new = self.trainer.cycle_table
        for group in self.opt.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = self.opt.state.pop(old)
        extra = new.shape[2] - old.shape[2]
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = torch.cat([state[key], torch.zeros(new.shape[0], new.shape[1], extra)], dim=2)
        self.opt.state[new] = state

    def step(self, x: torch.Tensor, y: torch.Tensor, phase: torch.Tensor, cols: torch.Tensor,
             rng: np.random.Generator) -> None:
        weights = poisson_weights(rng, (self.trainer.replicas, x.shape[0], x.shape[2]))
        loss = weighted_loss(self.trainer(x, phase, cols), y, weights)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def publish(self) -> None:
        """Copy the training copy's weights into the serving replicas (call under the forecaster's lock)."""
        with torch.no_grad():
            for dst, src in zip(self.serving.parameters(), self.trainer.parameters(), strict=True):
                if dst.shape == src.shape:
                    dst.copy_(src)
                else:  # the serving Q grew meanwhile: its new columns are still zero
                    dst[:, :, : src.shape[2]] = src

    # -- state ----------------------------------------------------------------------------------------
    def export_rows(self, cols: torch.Tensor) -> dict[str, np.ndarray]:
        st = self.opt.state[self.trainer.cycle_table]
        take = lambda t: t.detach()[:, :, cols].permute(2, 0, 1).numpy().copy()  # noqa: E731 - (n, B, W)
        return {"boot_cycle_row": take(self.serving.cycle_table), "boot_cycle_adam_m": take(st["exp_avg"]),
                "boot_cycle_adam_v": take(st["exp_avg_sq"])}

    def import_rows(self, cols: torch.Tensor, state: dict[str, Any]) -> None:
        """Rows saved without replicas (or blank rows) start from zero columns, like a series that joins late."""
        zeros = np.zeros((cols.numel(), self.serving.replicas, self.serving.cycle), np.float32)
        st = self.opt.state[self.trainer.cycle_table]
        with torch.no_grad():
            q = torch.from_numpy(np.asarray(state.get("boot_cycle_row", zeros), np.float32)).permute(1, 2, 0)
            self.serving.cycle_table[:, :, cols] = q
            self.trainer.cycle_table[:, :, cols] = q
            for key, name in (("exp_avg", "boot_cycle_adam_m"), ("exp_avg_sq", "boot_cycle_adam_v")):
                moments = np.asarray(state.get(name, zeros), np.float32)
                st[key][:, :, cols] = torch.from_numpy(moments).permute(1, 2, 0)

    def export_shared(self) -> dict[str, np.ndarray]:
        arrays = {}
        for i, p in enumerate(self.trainer.backbone_parameters()):
            st = self.opt.state[p]
            arrays[f"boot_backbone.{i}"] = p.detach().numpy().copy()
            arrays[f"boot_adam_m.{i}"] = st["exp_avg"].numpy().copy()
            arrays[f"boot_adam_v.{i}"] = st["exp_avg_sq"].numpy().copy()
        arrays["boot_adam_step"] = np.array([float(self.opt.state[self.trainer.cycle_table]["step"])])
        return arrays

    def import_shared(self, arrays: dict[str, np.ndarray]) -> None:
        step = torch.tensor(float(np.asarray(arrays["boot_adam_step"])[0]))
        with torch.no_grad():
            for i, (p, served) in enumerate(zip(self.trainer.backbone_parameters(),
                                                self.serving.backbone_parameters(), strict=True)):
                p.copy_(torch.from_numpy(np.asarray(arrays[f"boot_backbone.{i}"])))
                served.copy_(p)
                st = self.opt.state[p]
                st["exp_avg"].copy_(torch.from_numpy(np.asarray(arrays[f"boot_adam_m.{i}"])))
                st["exp_avg_sq"].copy_(torch.from_numpy(np.asarray(arrays[f"boot_adam_v.{i}"])))
        for p in self.trainer.parameters():
            self.opt.state[p]["step"] = step.clone()
