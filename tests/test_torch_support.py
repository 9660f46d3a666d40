"""CycleNet's online optimiser on a torch without a fused CPU Adam (torch < 2.4), simulated on the installed one.

Only torch 2.13.0 (CPU) installs here, so an older torch is imitated the way it fails: its ``Adam(fused=True)``
over CPU tensors raises ``RuntimeError`` at construction (2.2, 2.3), or a build without the kernel fails at the
first step (``NotImplementedError``, a ``RuntimeError``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tidecast.models import cyclenet_net
from tidecast.models.cyclenet import CycleNetForecaster
from tidecast.models.cyclenet_net import fused_adam_available, make_adam

REAL_ADAM = torch.optim.Adam


class AdamWithoutFusedCPUAtInit(REAL_ADAM):
    """torch 2.2/2.3: the fused kernel exists for CUDA only and Adam says so when built."""

    def __init__(self, params, *args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                               "devices: ['cuda', 'xpu', 'privateuseone'].")
        super().__init__(params, *args, fused=fused, **kwargs)


class AdamWithoutFusedCPUAtStep(REAL_ADAM):
    """A build that accepts ``fused=True`` but has no CPU kernel to run."""

    def step(self, closure=None):
        if self.defaults.get("fused"):
            raise NotImplementedError("Could not run 'aten::_fused_adam_' with arguments from the 'CPU' backend.")
        return super().step(closure)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: small models, two CI cores


@pytest.fixture
def fresh_probe():
    fused_adam_available.cache_clear()
    yield
    fused_adam_available.cache_clear()


def online_model() -> CycleNetForecaster:
    """Warm-started and past a few online replay steps, on a 12-step cycle."""
    model = CycleNetForecaster(horizon=6, lookback=24, cycle=12, warm_start=200, epochs=2, batch_size=32,
                               replay_window=64, replay_batch=16, defer=False, seed=1)
    rows = np.array([0, 1])
    for tick in range(260):
        model.learn_many(rows, np.full(2, tick), np.sin(2 * np.pi * tick / 12) + np.array([0.0, 3.0]))
    return model


@pytest.mark.parametrize("old_adam", [AdamWithoutFusedCPUAtInit, AdamWithoutFusedCPUAtStep])
def test_cyclenet_learns_online_without_a_fused_cpu_adam(monkeypatch, fresh_probe, old_adam):
    monkeypatch.setattr(torch.optim, "Adam", old_adam)
    assert fused_adam_available("cpu") is False
    model = online_model()
    assert not model._opt.defaults.get("fused")
    step = float(model._opt.state[model._trainer.cycle_table]["step"])
    assert step > 0  # replay steps were taken with the fallback optimiser
    assert np.isfinite(model.forecast_many(np.array([0, 1]), 6)).all()


def test_the_fused_kernel_is_used_where_torch_has_it(fresh_probe):
    """The installed torch (2.13 CPU) has it; the probe finds it and CycleNet uses it."""
    assert fused_adam_available("cpu") is True
    assert online_model()._opt.defaults["fused"] is True


def test_fallback_and_fused_take_the_same_steps(monkeypatch, fresh_probe):
    """The fallback changes the kernel, not the update: a few steps agree to float32 rounding."""
    def run(adam_cls) -> tuple[torch.Tensor, bool]:
        fused_adam_available.cache_clear()
        monkeypatch.setattr(torch.optim, "Adam", adam_cls)
        param = torch.nn.Parameter(torch.linspace(-1, 1, 16))
        optimizer = make_adam([param], lr=0.01)
        for _ in range(5):
            optimizer.zero_grad()
            (param**3).sum().backward()
            optimizer.step()
        return param.detach().clone(), bool(optimizer.defaults.get("fused"))

    fused, was_fused = run(REAL_ADAM)
    fallback, was_fallback_fused = run(AdamWithoutFusedCPUAtInit)
    assert was_fused and not was_fallback_fused
    torch.testing.assert_close(fused, fallback)


def test_the_probe_runs_once(monkeypatch, fresh_probe):
    calls = []

    class Counting(REAL_ADAM):
        def __init__(self, *args, **kwargs):
            calls.append(kwargs.get("fused"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", Counting)
    for _ in range(3):
        make_adam([torch.nn.Parameter(torch.zeros(2))])
    assert calls.count(True) == 4  # one probe, then three fused optimisers
    assert cyclenet_net.fused_adam_available.cache_info().misses == 1
