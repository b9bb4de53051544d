"""Runs that never lose work: exact resume, atomic checkpoints, preemption, the non-finite guard, hostile input."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, assert_resumes_exactly, flat_overrides, precisions, tiny_overrides, train_losses, write_corpus
from engine.backends.torch_backend import TorchLayout
from engine.checkpoint import TRAINER_STATE


def records(out: Path) -> dict[int, dict]:
    """Training records by step (eval records dropped)."""
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: r[k] for k in ("loss", "lr", "epoch")} for r in recs if "loss" in r}


def train(corpus, out: Path, **extra) -> dict:
    """In-process, with the config the CLI builds for the same overrides (the default preset underneath), so runs
    here and `engine train` subprocesses are comparable bit for bit."""
    from engine.config import DEFAULT_PRESET, resolve_config_path
    from engine.config import load_config
    from engine.train import run_training

    return run_training(load_config([resolve_config_path(DEFAULT_PRESET)], flat_overrides(tiny_overrides(corpus, out, **extra))))


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / TorchLayout.TRAINABLE))


@pytest.fixture(scope="module")
def short_epochs(tmp_path_factory):
    """A corpus of a few steps per epoch, so a 12-step run crosses epochs."""
    d = tmp_path_factory.mktemp("short")
    return {"train": write_corpus(d / "train.txt", 30, 11), "validation": write_corpus(d / "valid.txt", 10, 12)}


RESUME = dict(model={"dropout": 0.1}, train={"max_steps": 12}, checkpoint={"every_n_steps": 4, "keep_last": 5})


@pytest.fixture(scope="module")
def uninterrupted(short_epochs, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    train(short_epochs, out, **RESUME)
    return out


def cut_back(full: Path, dest: Path, step: int) -> Path:
    """The run as if it had died right after saving `step`: later checkpoints, the export and the later metrics
    are gone or stale."""
    shutil.copytree(full, dest)
    for ckpt in (dest / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    shutil.rmtree(dest / "model")
    return dest


@pytest.mark.parametrize("stop_at", [4, 8])  # 4: mid-epoch 0; 8: in epoch 1
def test_resume_is_bitwise_equal_to_the_uninterrupted_run(short_epochs, uninterrupted, tmp_path, stop_at):
    state = json.loads((uninterrupted / "checkpoints" / f"step-{stop_at:07d}" / TRAINER_STATE).read_text())
    assert state["step"] == stop_at and set(state["data"]) == {"epoch", "step_in_epoch", "shuffle_seed"}
    ref = records(uninterrupted)
    assert max(r["epoch"] for r in ref.values()) >= 1  # the run crosses an epoch boundary
    assert ref[stop_at + 1]["epoch"] == state["data"]["epoch"] or state["data"]["step_in_epoch"] == 0
    cut = cut_back(uninterrupted, tmp_path / "cut", stop_at)
    train(short_epochs, cut, **{**RESUME, "checkpoint": {**RESUME["checkpoint"], "resume": True}})
    got = records(cut)
    assert got[stop_at + 1]["lr"] == ref[stop_at + 1]["lr"]  # the schedule continues, not restarts
    assert got == ref  # losses, learning rates and epochs: the same floats
    a, b = weights(uninterrupted / "checkpoints" / "step-0000012"), weights(cut / "checkpoints" / "step-0000012")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("in_backward, precision", [*precisions("bf16", "fp16", before=(False,)),
                                                    *precisions("bf16", "fp16", before=(True,))])
def test_16bit_runs_resume_exactly(corpus, tmp_path, in_backward, precision):
    """The precisions users train in: a checkpoint holds what the next step depends on (fp16: GradScaler's scale and
    growth count, or the in-backward step's DynamicLossScale; the schedule of both steps), so a run stopped at step
    4 and resumed logs the same losses, learning rates and epochs, bit for bit."""
    assert_resumes_exactly(corpus, tmp_path, memory={"precision": precision, "optimizer_in_backward": in_backward},
                           optim={"grad_clip": None})


KILL_IN_SAVE = """
import os, sys
import engine.checkpoint as ck
write = ck.write_json_atomic
def dying_write(path, obj):
    if path.name == ck.MANIFEST and obj["step"] == 8:
        os._exit(9)  # killed after the rename, before the manifest: no cleanup of any kind
    write(path, obj)
ck.write_json_atomic = dying_write
from engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_save_killed_midway_leaves_the_previous_checkpoint_resumable(short_epochs, uninterrupted, tmp_path):
    out = tmp_path / "run"
    args = ["train"] + flat_overrides(tiny_overrides(short_epochs, out, **RESUME))
    r = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 9, r.stderr[-2000:]
    assert (out / "checkpoints" / "step-0000008").is_dir()
    assert not (out / "checkpoints" / "step-0000008" / "manifest.json").exists()
    from engine.checkpoint import newest_complete

    warnings = []
    assert newest_complete(out, warn=warnings.append).name == "step-0000004"
    assert "step-0000008" in warnings[0] and "no manifest.json" in warnings[0]
    train(short_epochs, out, **{**RESUME, "checkpoint": {**RESUME["checkpoint"], "resume": True}})
    assert records(out) == records(uninterrupted)


def test_retention_keeps_the_newest_complete_and_the_best(tmp_path):
    from engine.checkpoint import MANIFEST, prune

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        d = root / f"step-{step:07d}"
        d.mkdir(parents=True)
        (d / "w").write_text("x")
        if step != 8:  # step 8: a save that never finished
            (d / MANIFEST).write_text(json.dumps({"step": step, "files": {"w": 1}}))
    prune(root, keep_last=1, keep={"step-0000002"})  # step 2 is the best
    assert sorted(p.name for p in root.iterdir()) == ["step-0000002", "step-0000006", "step-0000008"]


def test_sigterm_saves_at_the_step_boundary_and_exits_0(corpus, tmp_path):
    """A real run gets SIGTERM: it saves at the next step boundary, exits 0 and says how to resume; resuming
    finishes with the losses of the uninterrupted run."""
    extra = dict(train={"max_steps": 60}, model={"dropout": 0.1})
    out = tmp_path / "run"
    args = ["train"] + flat_overrides(tiny_overrides(corpus, out, **extra))
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "SIGTERM received" in stderr
    m = re.search(r"stopped by SIGTERM at step (\d+)/60: checkpoint saved in (\S+)\. Resume with", stdout)
    assert m, stdout[-2000:]
    k = int(m.group(1))
    assert 2 <= k < 60 and Path(m.group(2)).name == f"step-{k:07d}"
    assert max(records(out)) == k and not (out / "model").exists()
    train(corpus, out, **{**extra, "checkpoint": {"resume": True}})
    full = tmp_path / "full"
    train(corpus, full, **extra)
    assert train_losses(out) == train_losses(full)


def test_second_ctrl_c_aborts_and_handlers_are_restored():
    from engine.guards import StopSignal

    before = signal.getsignal(signal.SIGINT)
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.name == "SIGINT"  # the first one only sets the flag
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


class InfGrad(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (an overflow that no loss scale can avoid)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def poison(monkeypatch, from_call: int, how: str) -> None:
    """From the `from_call`-th loss on (one per step here; the run's pre-flight simulation is off), the loss is NaN or
    its gradient infinite."""
    import engine.backends.torch_backend as tb

    real, calls = tb.batch_loss_sum, [0]

    def loss(model, batch, chunk, **kw):
        calls[0] += 1
        s, n = real(model, batch, chunk, **kw)
        if calls[0] >= from_call:
            s = s * float("nan") if how == "nan" else InfGrad.apply(s)
        return s, n

    monkeypatch.setattr(tb, "batch_loss_sum", loss)


def test_non_finite_losses_stop_the_run_with_the_state_saved(corpus, tmp_path, monkeypatch):
    from engine.errors import EngineError

    out = tmp_path / "run"
    poison(monkeypatch, from_call=4, how="nan")
    with pytest.raises(EngineError, match=r"training stopped at step 6: 3 consecutive steps \(from step 4\) had a "
                                          r"non-finite loss.*memory.precision=bf16.*lower optim.lr") as e:
        train(corpus, out, train={"max_steps": 20, "max_bad_steps": 3, "micro_batch_size": 4, "preflight": False},
              checkpoint={"every_n_steps": 2, "keep_last": 1})
    assert "step-0000006" in str(e.value) and "step-0000002" in str(e.value)
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6] and all(r["loss"] != r["loss"] for r in recs[3:])  # raw NaN
    assert all(r["skipped"] for r in recs[3:]) and not any(r["skipped"] for r in recs[:3])
    saved = weights(out / "checkpoints" / "step-0000006")
    assert all(torch.isfinite(v).all() for v in saved.values())  # non-finite steps were skipped, not applied
    assert (out / "checkpoints" / "step-0000002").is_dir()  # the last good one survives keep_last=1


def test_fp16_loss_scale_at_its_minimum_stops_the_run(corpus, tmp_path, monkeypatch):
    from engine.errors import EngineError

    poison(monkeypatch, from_call=1, how="inf")
    with pytest.raises(EngineError, match=r"fp16 loss scale reached its minimum \(1\) at step 16.*bf16"):
        train(corpus, tmp_path / "run", memory={"precision": "fp16"},
              train={"max_steps": 40, "max_bad_steps": 0, "preflight": False})


# --- hostile input: one line, non-zero exit, no traceback, existing outputs untouched ---------------------------


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """A finished run whose checkpoint the bad resumes below point at (copied per test)."""
    out = tmp_path_factory.mktemp("done") / "run"
    train(corpus, out, train={"max_steps": 2})
    return out


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def bad_inputs(d: Path, corpus: dict, run: Path) -> list[tuple[list[str], str]]:
    """(overrides, expected text of the one-line error) for every case; files are written under d."""
    (d / "empty.txt").write_text("")
    (d / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (d / "tiny.txt").write_text("the cat\n")
    (d / "bad.yaml").write_text("train: [unclosed\n")
    (d / "data.jsonl").write_text('{"body": "no text field"}\n')
    ckpt = run / "checkpoints" / "step-0000002"
    corrupt = d / "corrupt"
    shutil.copytree(ckpt, corrupt)
    with open(corrupt / TorchLayout.TRAINABLE, "r+b") as f:
        f.truncate(100)
    escaping = d / "escaping"
    shutil.copytree(ckpt, escaping)
    man = json.loads((escaping / "manifest.json").read_text())
    man["files"]["../../../etc/passwd"] = 1
    (escaping / "manifest.json").write_text(json.dumps(man))
    train_file = str(corpus["train"])
    return [
        (["data.train_file=/nonexistent/train.txt"], "data file not found: /nonexistent/train.txt"),
        ([f"data.train_file={d / 'empty.txt'}"], "data file is empty"),
        ([f"data.train_file={d / 'binary.bin'}"], "looks binary"),
        ([f"data.train_file={d / 'latin1.txt'}"], "not valid UTF-8"),
        ([f"data.train_file={d}"], "is a directory, not a file"),
        ([f"data.train_file={d / 'tiny.txt'}", f"data.validation_file={d / 'tiny.txt'}"], "block"),
        ([f"data.train_file={d / 'data.jsonl'}"], "no 'text' field"),
        (["optim.lrr=1"], "optim.lrr: unknown key"),
        (["train.micro_batch_size=many"], "train.micro_batch_size"),
        (["train.micro_batch_size=0"], "train.micro_batch_size"),
        (["data.block_size=-32"], "data.block_size"),
        (["data.block_size=128"], "block_size"),  # the tiny model's context is 64
        (["train.global_batch_size=5", "train.micro_batch_size=2"], "not divisible"),
        (["memory.optimizer_in_backward=true", "train.grad_accum_steps=2"], "optimizer_in_backward"),
        (["--config", str(d / "bad.yaml")], "bad.yaml"),
        ([f"checkpoint.resume={d / 'nowhere'}"], "is not a checkpoint folder"),
        ([f"checkpoint.resume={corrupt}"], "trainable.safetensors is 100 bytes"),
        ([f"checkpoint.resume={escaping}"], "a path outside the checkpoint folder"),
        ([f"checkpoint.resume={ckpt}", "model.n_embd=64"], "n_embd=32 there, 64 now"),
        ([f"checkpoint.resume={ckpt}", "model.special_tokens.additional=[<X>]"], "vocab_size=50257 there, 50258 now"),
        ([f"checkpoint.resume={ckpt}", "train.micro_batch_size=2"], "global_batch=4 there, 2 now"),
    ]


def test_hostile_input_battery(corpus, finished, tmp_path, capsys):
    from engine.cli import main

    d = tmp_path / "inputs"
    d.mkdir()
    cases = bad_inputs(d, corpus, finished)
    assert len(cases) >= 15
    base = tiny_overrides(corpus, tmp_path / "unused")
    before_run = snapshot(finished)
    for overrides, needle in cases:
        out = tmp_path / "out"
        shutil.copytree(finished, out, dirs_exist_ok=False)  # an existing run in the output folder
        before = snapshot(out)
        cfg_args = overrides[:2] if overrides[0] == "--config" else []
        keys = overrides[2:] if cfg_args else overrides
        args = ["train", *cfg_args, *flat_overrides(base), *keys, f"logging.output_dir={out}",
                "checkpoint.resume=" + next((k.split("=", 1)[1] for k in keys if k.startswith("checkpoint.resume=")),
                                            "false")]
        if not any(k.startswith("checkpoint.resume=") for k in keys):
            args.append("logging.overwrite=true")  # even allowed to replace the run, a bad input must not touch it
        rc = main(args)
        err = capsys.readouterr().err
        lines = [l for l in err.splitlines() if l.strip() and not l.startswith("warning:")]
        assert rc != 0, (overrides, err)
        assert "Traceback" not in err
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (overrides, err)
        assert snapshot(out) == before, overrides  # nothing written, nothing removed
        shutil.rmtree(out)
    assert snapshot(finished) == before_run


def test_every_torch_load_is_weights_only_and_remote_code_needs_the_flag():
    sources = [p for folder in ("engine", "launch", "benchmarks") for p in (ROOT / folder).rglob("*.py")]
    loads = [(p, m) for p in sources for m in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", p.read_text())]
    assert loads  # the scan finds the calls it checks
    for path, m in loads:
        assert "weights_only=True" in m.group(0), f"{path}: {m.group(0)}"
    for path in sources:
        for m in re.finditer(r"trust_remote_code=([\w.]+)", path.read_text()):
            # only ever the config's own flag (model.trust_remote_code, default false)
            assert m.group(1).endswith(".trust_remote_code") or m.group(1) == "False", f"{path}: {m.group(0)}"
