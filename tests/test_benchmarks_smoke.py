"""Tiny smoke runs of benchmark code paths (not the benchmarks themselves)."""

import pytest

from benchmarks.gelu_saving import activation_mib


@pytest.mark.parametrize("fake", [False, True])
def test_gelu_saving_counts_fewer_bytes_when_fused(fake):
    old = activation_mib("distilgpt2", False, 0.0, 64, "fp32", fake)
    new = activation_mib("distilgpt2", True, 0.0, 64, "fp32", fake)
    # NewGELU also saves tanh(.), 0.5x and 1+tanh(.) ([seq x 3072] fp32 each) per block: 6 x 3 x 64 x 3072 x 4 B
    assert old - new == pytest.approx(6 * 3 * 64 * 3072 * 4 / 2**20, rel=0.01)


def run_matrix(out, *extra):
    import csv
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run([sys.executable, "benchmarks/run.py", "benchmarks/matrices/smoke.yaml", "--out", str(out), *extra],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return {row["name"]: row for row in csv.DictReader(open(out / "results.csv"))}


@pytest.mark.slow
def test_benchmark_runner_smoke(tmp_path):
    """The runner on a 2-layer matrix, measured then simulated: the HF Trainer baseline, single-device configs, a
    2-rank ZeRO-2 run under the deepspeed launcher, a bad config recorded, reports written; and each simulated
    peak (CPU kernels, the baseline's recipe, ZeRO rules + reduce bucket) within 5% of the measured one."""
    measured = run_matrix(tmp_path / "measured")
    assert list(measured) == ["baseline (HF Trainer)", "plain", "zero2 2 ranks", "broken"]
    assert "optim.name" in measured["broken"]["error"]
    assert float(measured["baseline (HF Trainer)"]["memory_vs_baseline"]) == 1.0
    assert float(measured["plain"]["useful_tps_vs_baseline"]) > 0
    zero = measured["zero2 2 ranks"]
    assert zero["world_size"] == "2" and float(zero["tokens_per_s"]) > 0
    assert float(zero["gradients_mib"]) >= 5e7 * 4 / 2**20  # DeepSpeed's reduce bucket
    for f in ("results.md", "memory.png", "throughput.png", "env.json"):
        assert (tmp_path / "measured" / f).exists(), f
    simulated = run_matrix(tmp_path / "simulated", "--mode", "simulate", "--kernel", "cpu")
    assert list(simulated) == ["baseline (HF Trainer recipe)", "plain", "zero2 2 ranks", "broken"]
    pairs = [("baseline (HF Trainer)", "baseline (HF Trainer recipe)"), ("plain", "plain"),
             ("zero2 2 ranks", "zero2 2 ranks")]
    for m, s in pairs:
        assert float(simulated[s]["peak_mib"]) == pytest.approx(float(measured[m]["peak_mib"]), rel=0.05), (m, s)
    assert (tmp_path / "simulated" / "memory.png").exists()
