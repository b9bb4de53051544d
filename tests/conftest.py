"""Shared fixtures: a 2-layer GPT-2 on a small corpus the tests write, all on CPU."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying DNS
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # as the CLI sets it: no "Loading weights" bars on stderr

from engine.devices import cpu_has_native_bf16  # noqa: E402

# The precisions users train in, tested where this machine runs them. bf16 where the CPU computes it natively
# (avx512-bf16 / AMX; probed, never assumed): elsewhere it is emulated, slowly, and `memory.precision: auto` is fp32
# there. fp16 on the torch backend everywhere (CPU autocast + GradScaler / the in-backward DynamicLossScale).
NATIVE_BF16 = cpu_has_native_bf16()
needs_native_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16 (avx512-bf16 / AMX): "
                                                               "bf16 would be emulated, and auto trains in fp32 here")


def precisions(*names: str, before: tuple = ()) -> list:
    """pytest params for `names` (each preceded by the values `before`, for several argnames), bf16 skipped (with
    the reason) where the CPU has no native bf16."""
    ids = "-".join(str(v) for v in before)
    return [pytest.param(*before, n, marks=needs_native_bf16 if n == "bf16" else (), id=f"{ids}-{n}" if ids else n)
            for n in names]

WORDS = ("the cat dog bird sat ran flew on under over a red blue green mat tree house and then slept ate "
         "because it was warm cold day night in garden park").split()


def write_corpus(path: Path, n_lines: int, seed: int, min_words: int = 6, max_words: int = 40) -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
                              for _ in range(n_lines)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("corpus")
    return {"train": write_corpus(d / "train.txt", 400, 1), "validation": write_corpus(d / "valid.txt", 40, 2)}


def tiny_overrides(corpus: dict[str, Path], out: Path, **extra) -> dict:
    """A 2-layer, 32-wide GPT-2 with dropout off (so runs are comparable), 32-token blocks."""
    cfg = {
        "model": {"name": "gpt2", "init": "random", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, "dropout": 0.0},
        "data": {"train_file": str(corpus["train"]), "validation_file": str(corpus["validation"]), "block_size": 32},
        "optim": {"lr": 1e-3, "name": "adamw"},
        # fp32 pinned (the default, auto, depends on the CPU) and no pre-flight simulation: tiny runs compare losses
        # across machines and pay for no simulation unless the test is about it.
        "memory": {"precision": "fp32"},
        "schedule": {"warmup_steps": 2},
        "train": {"micro_batch_size": 4, "max_steps": 6, "seed": 7, "preflight": False},
        "eval": {"every_n_steps": 0, "max_batches": 4},
        # plots cost ~2 s a run here: drawn only where tested (test_report.py, the CLI's default run)
        "logging": {"output_dir": str(out), "progress": False, "log_every": 100, "plots": False},
        "sample": {"max_new_tokens": 0},
        "checkpoint": {"every_n_steps": 0},
    }
    return deep_update(cfg, extra)


# Beyond GPT-2 (engine/families/): the named size whose architecture each family's tiny model shrinks.
TINY_OF = {"llama": "SmolLM2-135M", "qwen2": "Qwen2.5-0.5B", "gpt_neox": "pythia-160m"}


def tiny_model(fam: str) -> dict:
    """`model` overrides of a family's tiny random model: 2 blocks, 32 wide, 2 heads (Llama/Qwen2: 1 key/value head),
    64 positions, dropout 0, the GPT-2 tokenizer's 50,257 rows (tests/test_families.py, the 2-rank chain)."""
    return {"name": TINY_OF[fam], "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, "vocab_size": 50257,
            "dropout": 0.0}


def deep_update(base: dict, upd: dict) -> dict:
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def flat_overrides(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += flat_overrides(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v) if not isinstance(v, str) else v}")
    return out


def train_losses(out_dir: Path) -> list[float]:
    recs = [json.loads(l) for l in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def run_inprocess(corpus, out: Path, **extra):
    from engine.config import validate_dict
    from engine.train import run_training

    cfg = validate_dict(tiny_overrides(corpus, out, **extra))
    summary = run_training(cfg)
    return summary, train_losses(out)


def assert_resumes_exactly(corpus, tmp_path: Path, **extra) -> None:
    """8 steps with a checkpoint every 4; the run cut back to step 4 and resumed logs the same losses, lr and epochs,
    bit for bit, as the run that never stopped."""
    from test_resilience import cut_back, records

    extra = {**extra, "train": {**extra.get("train", {}), "max_steps": 8},
             "checkpoint": {"every_n_steps": 4, "keep_last": 5}}
    full = tmp_path / "full"
    run_inprocess(corpus, full, **extra)
    cut = cut_back(full, tmp_path / "cut", 4)
    run_inprocess(corpus, cut, **{**extra, "checkpoint": {**extra["checkpoint"], "resume": True}})
    assert records(cut) == records(full)


def run_cli(args: list[str], cwd: Path | None = None, timeout: int = 600, launcher: list[str] | None = None,
            env_extra: dict | None = None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    cmd = (launcher or [sys.executable, "-m", "engine.cli"]) + args
    return subprocess.run(cmd, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_inprocess_cli(args: list) -> subprocess.CompletedProcess:
    """`run_cli` without a new interpreter (error paths and dry runs): the same fields, from `run_main`."""
    rc, out, err = run_main(args)
    return subprocess.CompletedProcess(args, rc, out, err)


def run_main(args: list) -> tuple[int, str, str]:
    """`engine ARGS` in this process (no interpreter start-up): exit code, stdout, stderr."""
    import contextlib
    import io

    from engine.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse: usage errors and --help
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def two_ranks(corpus, tmp_path_factory):
    """Every 2-rank run of the suite, trained in one launcher start (tests/two_ranks.py)."""
    from two_ranks import train_chain

    return train_chain(corpus, tmp_path_factory.mktemp("two_ranks"))


@pytest.fixture(scope="session")
def lm_runs(tmp_path_factory) -> dict[str, Path]:
    """The seeds' text format (`<BOS> ... <EOS>` per line) fine-tuned twice on a tiny GPT-2: a full run (random
    init, exports model/), then LoRA on that export as its pretrained base (exports adapter/ + merged model/)."""
    from engine.config import validate_dict
    from engine.train import run_training

    d = tmp_path_factory.mktemp("lm")
    raw = write_corpus(d / "raw.txt", 440, 3, min_words=3, max_words=12).read_text().splitlines()
    (d / "train.txt").write_text("".join(f"<BOS> {l} <EOS>\n" for l in raw[:400]))
    (d / "valid.txt").write_text("".join(f"<BOS> {l} <EOS>\n" for l in raw[400:]))
    files = {"train": d / "train.txt", "validation": d / "valid.txt"}
    special = {"special_tokens": {"additional": ["<BOS>", "<EOS>"]}}
    full = d / "full"
    run_training(validate_dict(tiny_overrides(files, full, model=special, optim={"lr": 1e-2},
                                              train={"max_steps": 12, "micro_batch_size": 8})))
    lora = d / "lora"
    run_training(validate_dict(tiny_overrides(
        files, lora, model={"init": "pretrained", "name": str(full / "model"), "n_layer": None, "n_embd": None,
                            "n_head": None, "n_positions": None, **special},
        memory={"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}}, optim={"lr": 1e-2},
        train={"max_steps": 4})))
    return {"dir": d, "full": full, "lora": lora, **files}
