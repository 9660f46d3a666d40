"""ETTh data, splits and published numbers shared by the CycleNet benchmarks.

Protocol (CycleNet, Lin et al., NeurIPS 2024; the usual ETT long-term forecasting protocol): train rows
[0, 8640), validation [8640 - L, 11520), test [11520 - L, 14400); a StandardScaler fitted on the train rows;
MSE / MAE on the standardised scale over every stride-1 test window, all steps and all channels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

TRAIN_END, VAL_END, TEST_END = 8640, 11520, 14400
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

#: Published CycleNet results, L=96, mean of 5 seeds: (dataset, backbone, H) -> (MSE, MAE).
PAPER = {
    ("ETTh1", "linear", 96): (0.3785, 0.3915), ("ETTh1", "linear", 192): (0.4266, 0.4195),
    ("ETTh1", "linear", 336): (0.4642, 0.4393), ("ETTh1", "linear", 720): (0.4619, 0.4609),
    ("ETTh2", "linear", 96): (0.2859, 0.3353), ("ETTh2", "linear", 192): (0.3730, 0.3917),
    ("ETTh2", "linear", 336): (0.4218, 0.4332), ("ETTh2", "linear", 720): (0.4540, 0.4583),
    ("ETTh1", "mlp", 96): (0.3752, 0.3953), ("ETTh1", "mlp", 192): (0.4367, 0.4280),
    ("ETTh1", "mlp", 336): (0.4968, 0.4553), ("ETTh1", "mlp", 720): (0.5205, 0.4842),
    ("ETTh2", "mlp", 96): (0.2981, 0.3449), ("ETTh2", "mlp", 192): (0.3726, 0.3962),
    ("ETTh2", "mlp", 336): (0.4313, 0.4395), ("ETTh2", "mlp", 720): (0.4510, 0.4585),
}
#: Acceptance tolerance on the MSE (relative), per backbone.
TOLERANCE = {"linear": 0.02, "mlp": 0.03}


def dataset_name(path: str | Path) -> str:
    return Path(path).stem


class ETT:
    """One ETT csv: raw values (T, C), integer ticks from the timestamps, the train-fitted scaler."""

    def __init__(self, path: str | Path) -> None:
        frame = pd.read_csv(path)
        stamps = pd.to_datetime(frame.iloc[:, 0])
        self.name = dataset_name(path)
        self.columns = list(frame.columns[1:])
        self.timestamps = stamps.to_numpy()
        self.values = frame.iloc[:, 1:].to_numpy(dtype=float)
        step = stamps.diff().median()
        # phase comes from time: ticks count grid steps since the first timestamp
        self.ticks = ((stamps - stamps.iloc[0]) // step).to_numpy(dtype=np.int64)
        self.mean = self.values[:TRAIN_END].mean(axis=0)
        self.std = self.values[:TRAIN_END].std(axis=0)  # population std, as sklearn's StandardScaler

    def standardised(self) -> np.ndarray:
        return (self.values - self.mean) / self.std

    @staticmethod
    def split(name: str, lookback: int) -> slice:
        return {"train": slice(0, TRAIN_END), "val": slice(TRAIN_END - lookback, VAL_END),
                "test": slice(VAL_END - lookback, TEST_END)}[name]


def seasonal_naive(std: np.ndarray, lookback: int, horizon: int, period: int = 24) -> tuple[float, float]:
    """MSE / MAE of "repeat the last ``period`` steps" on the test windows (standardised scale)."""
    test = std[ETT.split("test", lookback)]
    starts = np.arange(test.shape[0] - lookback - horizon + 1)
    steps = np.arange(horizon)
    pred = test[starts[:, None] + lookback - period + steps % period]
    true = test[starts[:, None] + lookback + steps]
    err = pred - true
    return float((err**2).mean()), float(np.abs(err).mean())
