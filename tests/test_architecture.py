"""The package's shape: layers without cycles (import-linter contracts in pyproject.toml), imports at the top, and
a training run that releases its run log (files, hooks, dispatch mode) whatever stops it."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, tiny_overrides

ENGINE = ROOT / "engine"


def test_import_contracts_hold():
    """No import cycle inside engine/, and config < data/model/loss/optim < backends < memory < train/plan/preflight
    < commands (import-linter reads the contracts from pyproject.toml; function-local imports count too)."""
    r = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout


def function_local_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "engine":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module}")
                elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "engine" for a in node.names):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} import")
    return found


def test_engine_modules_are_imported_at_the_top():
    """Function-local imports are for heavy or optional third-party libraries only: an engine import inside a function
    would hide a cycle from the reader (import-linter still sees it)."""
    sources = sorted(ENGINE.rglob("*.py"))
    assert len(sources) > 30
    local = [x for p in sources for x in function_local_imports(p)]
    assert not local, local


def test_no_function_in_engine_is_a_wall_of_code():
    """The step loop and its helpers stay readable: no function in engine/ over 80 lines."""
    long = []
    for p in sorted(ENGINE.rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def hooks_and_modes() -> dict:
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return {"dispatch_mode": _get_current_dispatch_mode(), "optimizer_pre_hooks": len(_global_optimizer_pre_hooks),
            "optimizer_post_hooks": len(_global_optimizer_post_hooks)}


def test_a_run_that_raises_mid_step_releases_its_run_log(corpus, tmp_path, monkeypatch):
    """The memory tracker (a dispatch mode plus global optimizer hooks), metrics.jsonl, TensorBoard and the progress
    bar are one RunLog on an ExitStack: an exception in the middle of a step leaves none of them behind."""
    import psutil

    import engine.train as train_mod
    from engine.config import validate_dict

    before = hooks_and_modes()
    real = train_mod.TrainingRecipe.record_step
    calls = []

    def record_then_fail(self, *a, **kw):
        real(self, *a, **kw)
        calls.append(1)
        if len(calls) == 3:
            assert hooks_and_modes() != before  # the tracker is really installed while the loop runs
            raise RuntimeError("boom in step 3")

    monkeypatch.setattr(train_mod.TrainingRecipe, "record_step", record_then_fail)
    out = tmp_path / "run"
    cfg = validate_dict(tiny_overrides(corpus, out, logging={"track_memory": True, "tensorboard": True,
                                                             "progress": True}))
    with pytest.raises(RuntimeError, match="boom in step 3"):
        train_mod.run_training(cfg)
    assert hooks_and_modes() == before
    open_files = {Path(f.path).resolve() for f in psutil.Process().open_files()}
    assert not [f for f in open_files if out.resolve() in f.parents], open_files
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # every record written before the failure is on disk


def test_train_state_and_retention_without_a_run(tmp_path):
    """The trainer state, the sampler's data position and which checkpoints retention keeps are plain objects."""
    import torch

    from engine.data import StepSampler, TokenizedSplit
    from engine.train import TrainState, kept_checkpoints

    sampler = StepSampler(TokenizedSplit("train", "packed", torch.zeros(12, 4, dtype=torch.long), 48), 2, 1, 2, 0, 5, 0)
    assert sampler.steps_per_epoch == 3
    sampler.step_batches(6)  # the 7th step: epoch 2, its first
    assert sampler.state_dict() == {"epoch": 2, "step_in_epoch": 1, "shuffle_seed": 5}
    resumed = StepSampler(sampler.split, 2, 1, 2, 1, 5, 0)
    resumed.load_state_dict(sampler.state_dict())
    assert resumed.state_dict() == sampler.state_dict()
    st = TrainState(step=7, tokens_seen=700)
    d = st.state_dict(sampler.state_dict())
    assert d["step"] == 7 and d["epoch"] == 2 and math.isinf(d["best_val"])
    again = TrainState()
    again.load_state_dict(d, tmp_path / "step-0000007")
    assert (again.step, again.tokens_seen, again.last_good.name) == (7, 700, "step-0000007")
    good = tmp_path / "step-0000004"
    assert kept_checkpoints("step-0000002", False, good) == {"step-0000002"}
    assert kept_checkpoints(None, True, good) == {"step-0000004"}  # while steps fail, the last good one stays
    assert kept_checkpoints("step-0000002", True, good) == {"step-0000002", "step-0000004"}
    assert kept_checkpoints(None, False, good) == set()


def test_one_tokenizer_fingerprint_for_cache_and_resume():
    from engine.config import ModelConfig
    from engine.tokenizer import load_tokenizer, tokenizer_fingerprint

    plain = load_tokenizer(ModelConfig())
    same = load_tokenizer(ModelConfig())
    other_eos = load_tokenizer(ModelConfig(special_tokens={"eos": "<EOS>"}))
    assert tokenizer_fingerprint(plain) == tokenizer_fingerprint(same)
    assert tokenizer_fingerprint(plain) != tokenizer_fingerprint(other_eos)
