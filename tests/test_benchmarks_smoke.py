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


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """The GPU truth kit's whole flow on the CPU (tiny model, no CUDA calls), so it cannot rot before a GPU comes:
    recipes measured in their own processes beside the simulator's prediction, the planner's verdicts for an emulated
    budget, the CUDA-only test subset collected, results written."""
    import csv
    import json
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "gpu_check"
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry", "--out", str(out), "--recipes", "t4 preset",
                        "zero2 1 rank", "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    recipes = [x for x in rows if x["section"] == "recipe"]
    assert [x["config"] for x in recipes] == ["t4 preset", "zero2 1 rank"] and all(x["status"] == "ran" for x in recipes)
    for x in recipes:  # CPU kernels: the simulation matches the tracked peak
        assert abs(float(x["error_raw"])) < 0.05, x
        assert float(x["tokens_per_s"]) > 0
    budget = [x for x in rows if x["section"] == "budget"]
    assert budget[0]["config"].startswith("dry 900 MiB recommended") and budget[0]["status"] == "ran"
    assert "as predicted" in budget[0]["note"]
    assert budget[1]["config"].startswith("dry 900 MiB not_fitting") and float(budget[1]["predicted_margin_mib"]) > 900
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] and env["deepspeed"] and env["tests"]["status"] == "passed"  # test_gpu.py collected
    assert "| recipe | gpt2 | t4 preset |" in (out / "results.md").read_text()
