"""Benchmarks fail with a clear message, not a traceback, when an optional dependency is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_conformal_bench_without_mapie_says_how_to_install_it() -> None:
    # sys.modules["mapie"] = None makes `import mapie` fail as if the bench extra were not installed.
    code = ("import runpy, sys; sys.modules['mapie'] = None; sys.argv = ['conformal.py', '--case', 'elec2'];"
            "runpy.run_path('bench/conformal.py', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "make bench" in out.stderr


def test_makefile_has_bench_target_and_a_torch_index_variable() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "\nbench:" in makefile
    assert "TORCH_INDEX_URL ?=" in makefile  # empty by default: pip's configured index
    dry = subprocess.run(["make", "-n", "-B", ".venv/.installed", "TORCH_INDEX_URL=https://example.invalid/cpu"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "--index-url https://example.invalid/cpu torch==" in dry


def test_link_failure_bench_builds_an_engine_of_all_its_models() -> None:
    """Every lane the bench compares (its own MLP included) passes the engine's config: the lane names are
    checked against the registry, which once broke the bench without any test noticing."""
    code = ("import sys; sys.path.insert(0, 'bench'); import link_failure as lf;"
            "from tidecast.stream.config import EngineConfig;"
            "models = lf.make_models(list(lf.MODELS), 0, dict(lf.CFC, members=2));"
            "config = EngineConfig(horizon=lf.HORIZON, models=lf.lane_labels(models), freq='1h');"
            "print(len(config.models), type(models[0]).__name__)")
    assert bench_output(code) == ["7", "CfCEnsemble"]


def test_irregular_bench_builds_its_lanes_with_a_cfc_ensemble() -> None:
    """The README's ensemble commands for bench/irregular.py (``--cfc members=K``, with the bench's default blend
    or ``--cfc persistence_half_life=0``): the ensemble carries the blend, its members do not."""
    code = ("import sys; sys.path.insert(0, 'bench'); import irregular as ir;"
            "lanes = ir.make_lanes(ir.Split(dev=True), dict(ir.CFC, members=2, persistence_half_life=0), 0);"
            "print(*[type(lane.model).__name__ for lane in lanes]);"
            "print(ir.make_lanes(ir.Split(dev=True), ir.CFC, 0)[0].model.persistence_half_life);"
            "ens = ir.make_lanes(ir.Split(dev=True), dict(ir.CFC, members=2), 0)[0].model;"
            "print(ens.get_params()['persistence_half_life'], *[m.persistence_half_life for m in ens.members_])")
    assert bench_output(code) == ["CfCEnsemble", "CycleNetForecaster", "168", "168", "0", "0"]


def test_retrain_oracle_streams_are_in_the_new_regime_and_in_phase_with_it() -> None:
    """bench/retrain.py --oracle fits a model on values already in the post-change regime: on a clean daily sine
    the stream before and after the change point must then be one regime (the same cycle, continuous phase; the
    phase shift has no past for its first half cycle), so the bound measures the regime, not a seam."""
    code = ("import sys; sys.path.insert(0, 'bench'); import numpy as np; import retrain as rb;"
            "base = np.sin(2 * np.pi * np.arange(8000) / 24); at, c = 2611, 24;"
            "rng = np.random.default_rng(0);"
            "both = lambda k: np.concatenate([rb.regime_from_start(k, base, at, 1.0, c, rng),"
            "                                 rb.persistent(k, base, at, 1.0, c, 3500, rng)]);"
            "p = both('phase'); q = both('cycle'); t = both('trend'); lv = both('level');"
            "print(np.abs(p[36:] - p[12:-24]).max(), np.abs(q[12:] - q[:-12]).max(),"
            "      np.abs(np.diff(t - base[:3500]) - 0.05).max(), np.abs(lv - base[:3500] - 3).max())")
    assert all(float(x) < 1e-9 for x in bench_output(code))


def test_bootstrap_grid_replays_the_watchers_alarms_from_its_scores() -> None:
    """bench/drift_bootstrap_grid.py replays the bootstrap watcher's rule on cached scores (spread / scale): the
    alarms must be those a watcher with a real residual scale raises on the spreads themselves, here a series whose
    replicas start to disagree three times as much at t = 300."""
    code = ("import sys; sys.path.insert(0, 'bench'); import numpy as np; import drift_bootstrap_grid as g;"
            "from tidecast.models.naive import SeasonalNaive; from tidecast.monitors.bootstrap import BootstrapMonitor;"
            "rng = np.random.default_rng(0); scale = np.array([[2.0, 4.0]]);"
            "spread = scale * np.exp(rng.normal(0, 0.1, (400, 1, 2))); spread[300:] *= 3;"
            "m = BootstrapMonitor(SeasonalNaive(period=1), horizon=2); m.resize(1);"
            "m.pool_.scale_[:] = scale; m.pool_.count_[:] = 1.0; r = np.array([0]);"
            "real = [t for t in range(400) if len(m.observe(r, np.array([t]), spread[t]))];"
            "replayed = g.replay_alarms((spread / scale).mean(axis=2).T)[0];"
            "print(real == replayed, real[0] if real else -1)")
    same, first = bench_output(code)
    assert same == "True"
    assert 300 <= int(first) < 310


def bench_output(code: str) -> list[str]:
    """The words ``code`` prints, run from the repository root in a fresh interpreter (the benches are scripts)."""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_retrain_coverage_after_promotion_reads_the_promoted_models_intervals_only() -> None:
    """bench/retrain.py scores coverage after a promotion at tick t on the intervals issued at t + 1 .. t + steps,
    every horizon (its arrays are indexed by target tick): an old model's interval for a later target is left out."""
    code = ("import sys; sys.path.insert(0, 'bench'); import numpy as np; import retrain as rb;"
            "T, H = 20, 3; y = np.zeros((1, T + H + 1, 1));"
            "lower = np.full((1, T + H + 1, H), -1.0); upper = np.full((1, T + H + 1, H), 1.0);"
            "lower[0, 11, 2] = 5.0;"  # target 11 at h = 3: issued at 8, before the promotion at 9: a miss, left out
            "lower[0, 14, 1] = 5.0;"  # target 14 at h = 2: issued at 12, after it: a miss, counted
            "run = {'lower': lower, 'upper': upper};"
            "hits = [rb.issued_after(run, y, 9, 4, h) for h in range(H)];"
            "print(*[int(np.nansum(x == 0)) for x in hits], int(sum(np.isfinite(x).sum() for x in hits)))")
    assert bench_output(code) == ["0", "1", "0", "12"]


def test_the_drift_bench_prints_exactly_the_json_keys_its_issue_names() -> None:
    """The issue's JSON line is a contract: its keys, no others (the tables print the rest)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("drift_bench", REPO / "bench" / "drift.py")
    drift = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = drift  # its dataclasses look their module up
    sys.path.insert(0, str(REPO / "bench"))
    try:
        spec.loader.exec_module(drift)
    finally:
        sys.path.remove(str(REPO / "bench"))
    row = {"detection_rate": 0.7, "median_delay": 13.0, "median_delay_cycles": 0.5, "false_alarms_per_10k": 21.0,
           "false_alarms_per_10k_freeze_rule": 6.0, "us_per_obs": 0.8}
    boot = {"spearman_error": 0.1, "spearman_width": 0.2, "lead_steps": -4.0, "forecast_cost_ratio": 1.7,
            "train_cost_ratio": 5.9, "details": {"streams": 3}}
    full = {"default": "cusum", "detectors": {"cusum": row}, "by_kind": {"level": {"cusum": {
        "detection_rate": 0.6, "median_delay": 11.0}}}, "bootstrap": boot, "nab": {"cusum": {
            "in_window": 20, "outside": 1300}}, "tradeoff": [{"factor": 1.0}]}
    out = drift.contract(full)
    assert set(out) == {"default", "detectors", "by_kind", "bootstrap", "nab"}
    assert set(out["detectors"]["cusum"]) == {"detection_rate", "median_delay", "false_alarms_per_10k", "us_per_obs"}
    assert set(out["bootstrap"]) == {"spearman_error", "spearman_width", "lead_steps", "forecast_cost_ratio",
                                     "train_cost_ratio"}
    assert set(drift.contract({"bootstrap": boot})) == {"bootstrap"}  # --bootstrap-only


def test_irregular_removal_keeps_every_gap_within_the_burst_length() -> None:
    """The issue: 30 % removed, half in bursts of up to 12 steps. Bursts drawn on top of or next to each other (and
    random removals beside them) merged into gaps of up to 48 steps."""
    code = ("import sys; sys.path.insert(0, 'bench'); import irregular as ir;"
            "gone = [ir.removal(14_400, 7, seed) for seed in (0, 1)];"
            "print(*[round(float(g.mean()), 3) for g in gone], *[ir.longest_gap(g) for g in gone], ir.MAX_BURST)")
    words = bench_output(code)
    assert words[:2] == ["0.3", "0.3"] and words[2] == words[3] == words[4] == "12", words


def test_retrain_coverage_after_promotion_weighs_every_promotion_alike() -> None:
    """Merged over the stream groups, the coverage was the mean of each group's mean: a group with one promotion
    weighed as much as one with three (0.85 here instead of 0.875)."""
    code = "\n".join([
        "import sys; sys.path.insert(0, 'bench'); import numpy as np; import retrain as rb",
        "groups = iter([[0.80], [0.90, 0.90, 0.90]])",
        "rb.synthetic = rb.etth2 = lambda *a, **k: type('G', (), {'name': 'g', 'cycle': 24})()",
        "rb.streams = lambda group, seed: (np.zeros((2, 10)), None, None)",
        "rb.run_policy = lambda values, cycle, spec: {'wall': 0.0}",
        "def score(values, ats, cycle, runs):",
        "    cover = next(groups)",
        "    return {name: {'mse': 1.0, 'post_change_mae_ratio': 1.0, 'retrains': len(cover), 'train_seconds': 0.0,",
        "                   'coverage_after_promotion': float(np.mean(cover)), 'promotion_coverages': cover,",
        "                   'shadow_ratios': []} for name in runs}",
        "rb.score_a = score",
        "print(round(rb.part_a(False, ['static'])['static']['coverage_after_promotion'], 4))",
    ])
    assert bench_output(code) == ["0.875"]
