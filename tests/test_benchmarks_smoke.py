"""Tiny smoke runs of benchmark code paths (not the benchmarks themselves)."""

import pytest

from benchmarks.gelu_saving import activation_mib


@pytest.mark.parametrize("fake", [False, True])
def test_gelu_saving_counts_fewer_bytes_when_fused(fake):
    old = activation_mib("distilgpt2", False, 0.0, 64, "fp32", fake)
    new = activation_mib("distilgpt2", True, 0.0, 64, "fp32", fake)
    # NewGELU also saves tanh(.), 0.5x and 1+tanh(.) ([seq x 3072] fp32 each) per block: 6 x 3 x 64 x 3072 x 4 B
    assert old - new == pytest.approx(6 * 3 * 64 * 3072 * 4 / 2**20, rel=0.01)


def test_benchmark_runner_smoke(tmp_path):
    """The runner on a 2-layer matrix: baseline + configs measured, a bad config recorded, reports written."""
    import csv
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run([sys.executable, "benchmarks/run.py", "benchmarks/matrices/smoke.yaml", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    names = [row["name"] for row in rows]
    assert names == ["baseline (HF Trainer)", "plain", "checkpointing", "broken"]
    assert "optim.name" in rows[-1]["error"]
    assert float(rows[0]["memory_vs_baseline"]) == 1.0 and float(rows[1]["peak_mib"]) > 0
    assert float(rows[1]["useful_tps_vs_baseline"]) > 0
    for f in ("results.md", "memory.png", "throughput.png", "env.json"):
        assert (tmp_path / f).exists(), f
