"""CycleNet on ETTh1/ETTh2 with the paper's protocol, beside the published numbers.

Trains :class:`tidecast.models.cyclenet_net.CycleNet` directly (no streaming) with the paper's recipe
(:class:`tidecast.models.cyclenet_net.BatchFit`) on train rows [0, 8640), early stopping on [8640 - L, 11520), and
scores every stride-1 window of [11520 - L, 14400) on the train-standardised scale. Seeds are averaged. By
default early stopping scores validation as the official loader does (shuffled batches of 256, the last
partial batch dropped, mean of batch means); ``--val full`` uses every window instead.

    python bench/cyclenet_paper.py          # full grid: 2 datasets x 4 horizons x 2 backbones, 3 seeds
    python bench/cyclenet_paper.py --data ../shared/data/ETTh1.csv --horizon 96 --backbone linear --json

With ``--json`` the last line is one JSON object: ``{"mse", "mae", "paper_mse", "seconds_per_epoch", ...}``
(for a grid, the same keys hold lists, plus ``"runs"`` with one object per configuration).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cyclenet_etth import DATA_DIR, ETT, PAPER, TOLERANCE  # noqa: E402

from tidecast.models.cyclenet import detect_cycle  # noqa: E402
from tidecast.models.cyclenet_net import DEFAULT_LR, BatchFit, Windows, build, evaluate  # noqa: E402

HORIZONS = (96, 192, 336, 720)
BACKBONES = ("linear", "mlp")


def run_one(ett: ETT, horizon: int, backbone: str, seed: int, lookback: int, cycle: int, val: str) -> dict:
    """Train one model with the paper's recipe and score the test windows."""
    std = ett.standardised()

    def windows(split: str) -> Windows:
        part = ETT.split(split, lookback)
        return Windows.contiguous(std[part], ett.ticks[part], cycle, lookback, horizon)

    net = build(lookback, horizon, cycle, std.shape[1], backbone, seed=seed)
    fit = BatchFit(net, windows("train"), windows("val"), lr=DEFAULT_LR[backbone], seed=seed,
                   shuffled_val=val == "official")
    began = time.perf_counter()
    fit.run()
    seconds = time.perf_counter() - began
    mse, mae = evaluate(net, windows("test"))
    return {"mse": mse, "mae": mae, "epochs": fit.report["epochs"], "best_epoch": fit.report["best_epoch"],
            "seconds": seconds, "seconds_per_epoch": float(np.mean(fit.report["epoch_seconds"]))}


def run_config(ett: ETT, horizon: int, backbone: str, seeds: list[int], lookback: int, cycle: int,
               val: str) -> dict:
    runs = [run_one(ett, horizon, backbone, s, lookback, cycle, val) for s in seeds]
    paper_mse, paper_mae = PAPER.get((ett.name, backbone, horizon), (float("nan"), float("nan")))
    mse = float(np.mean([r["mse"] for r in runs]))
    return {
        "data": ett.name, "horizon": horizon, "backbone": backbone, "lookback": lookback, "cycle": cycle,
        "seeds": seeds, "val": val,
        "mse": mse, "mae": float(np.mean([r["mae"] for r in runs])),
        "mse_sd": float(np.std([r["mse"] for r in runs])),
        "paper_mse": paper_mse, "paper_mae": paper_mae,
        "rel_diff": mse / paper_mse - 1.0,
        "within_tolerance": bool(abs(mse / paper_mse - 1.0) <= TOLERANCE[backbone]),
        "seconds_per_epoch": float(np.mean([r["seconds_per_epoch"] for r in runs])),
        "epochs": [r["epochs"] for r in runs],
        "mse_seeds": [r["mse"] for r in runs],
    }


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="CycleNet, paper protocol (L=96, standardised scale)")
    for col in ("data", "H", "backbone", "W", "seeds", "MSE", "paper", "diff", "MAE", "paper", "epochs",
                "s/epoch"):
        table.add_column(col, justify="right")
    for r in results:
        ok = "green" if r["within_tolerance"] else "red"
        table.add_row(
            r["data"], str(r["horizon"]), r["backbone"], str(r["cycle"]), str(len(r["seeds"])),
            f"{r['mse']:.4f}±{r['mse_sd']:.4f}", f"{r['paper_mse']:.4f}",
            f"[{ok}]{100 * r['rel_diff']:+.1f}%[/{ok}]", f"{r['mae']:.4f}", f"{r['paper_mae']:.4f}",
            f"{np.mean(r['epochs']):.1f}", f"{r['seconds_per_epoch']:.2f}",
        )
    Console(width=None if sys.stdout.isatty() else 140).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", action="append", help="ETT csv (repeatable); default ETTh1 and ETTh2")
    parser.add_argument("--horizon", type=int, action="append", help=f"default all of {HORIZONS}")
    parser.add_argument("--backbone", choices=BACKBONES, action="append", help="default both")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (2024, 2025, ...)")
    parser.add_argument("--seed0", type=int, default=2024)
    parser.add_argument("--lookback", type=int, default=96)
    parser.add_argument("--cycle", type=int, default=0, help="0: detect on the train rows (24 for ETTh)")
    parser.add_argument("--val", choices=("official", "full"), default="official",
                        help="validation MSE for early stopping: the official loader's (shuffled batches, last "
                             "partial one dropped) or every window in order")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    paths = args.data or [str(DATA_DIR / "ETTh1.csv"), str(DATA_DIR / "ETTh2.csv")]
    seeds = [args.seed0 + i for i in range(args.seeds)]
    results = []
    for path in paths:
        ett = ETT(path)
        cycle = args.cycle or detect_cycle(ett.values[ETT.split("train", args.lookback)])
        for backbone in args.backbone or BACKBONES:
            for horizon in args.horizon or HORIZONS:
                result = run_config(ett, horizon, backbone, seeds, args.lookback, cycle, args.val)
                results.append(result)
                if not args.json:
                    print(f"{result['data']} H={horizon} {backbone}: MSE {result['mse']:.4f} "
                          f"(paper {result['paper_mse']:.4f}, {100 * result['rel_diff']:+.1f}%) "
                          f"MAE {result['mae']:.4f}, {result['seconds_per_epoch']:.2f} s/epoch", flush=True)
    if args.json:
        if len(results) == 1:
            print(json.dumps(results[0]))
        else:
            keys = ("mse", "mae", "paper_mse", "seconds_per_epoch")
            print(json.dumps({**{k: [r[k] for r in results] for k in keys}, "runs": results}))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
