"""Early stopping on validation loss (patience, min_delta), the best checkpoint kept past keep_last and exported,
the newest checkpoint never deleted, and a resume that continues the patience count."""

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_inprocess, tiny_overrides, write_corpus
from engine.backends.torch_backend import TorchLayout
from engine.checkpoint import TRAINER_STATE


def test_patience_and_min_delta():
    """An eval counts as an improvement only if it beats the last improvement by more than min_delta; the best
    checkpoint follows every new lowest loss all the same."""
    from engine.config import EarlyStoppingConfig
    from engine.early_stopping import EarlyStopping

    es = EarlyStopping(EarlyStoppingConfig(patience=2, min_delta=0.1))
    new_best = [es.update(step, loss) for step, loss in [(10, 5.0), (20, 4.0), (30, 3.95), (40, 3.9)]]
    assert new_best == [True, True, True, True]
    assert es.bad_evals == 2 and es.should_stop and es.stopped_at == 40 and es.best_step == 40
    assert es.best_checkpoint_name() == "step-0000040"
    again = EarlyStopping(EarlyStoppingConfig(patience=2, min_delta=0.1))
    again.load_state_dict(json.loads(json.dumps(es.state_dict())))
    assert again.state_dict() == es.state_dict()

    fresh = EarlyStopping(EarlyStoppingConfig(patience=0))
    assert json.loads(json.dumps(fresh.state_dict()))["best"] is None
    for step in range(1, 20):
        fresh.update(step, 10.0 + step)  # never improves, but patience 0 never stops
    assert not fresh.should_stop and fresh.best_step == 1 and fresh.best == 11.0
    assert fresh.update(20, 0.0, count=False) and fresh.best_step == 20 and fresh.bad_evals == 18  # not counted


@pytest.fixture(scope="module")
def diverging(tmp_path_factory):
    """Train on the word corpus, validate on text of other words: the validation loss rises as training proceeds,
    so early stopping triggers and the best checkpoint is an early one."""
    d = tmp_path_factory.mktemp("es")
    rng = random.Random(5)
    other = "alpha beta gamma delta seven eight nine ten quantum river mountain violin".split()
    (d / "other.txt").write_text("\n".join(" ".join(rng.choice(other) for _ in range(20)) for _ in range(40)) + "\n")
    return {"train": write_corpus(d / "train.txt", 400, 1), "validation": d / "other.txt"}


EXTRA = dict(eval={"every_n_steps": 2, "early_stopping": {"patience": 2}}, train={"max_steps": 30},
             checkpoint={"every_n_steps": 2, "keep_last": 1, "keep_best": True})


def val_records(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in l]


@pytest.fixture(scope="module")
def stopped(diverging, tmp_path_factory):
    out = tmp_path_factory.mktemp("stopped") / "run"
    summary, losses = run_inprocess(diverging, out, **EXTRA)
    periodic = val_records(out)[:-1]  # the last record is the end-of-run eval
    return {"out": out, "summary": summary, "losses": losses, "periodic": periodic,
            "best": min(periodic, key=lambda r: r["val_loss"])}


def test_stops_keeps_best_and_newest_and_exports_best(stopped):
    out, losses, periodic, best = stopped["out"], stopped["losses"], stopped["periodic"], stopped["best"]
    assert best["step"] < len(losses) < 30  # stopped early; the best is not the last step (else nothing to test)
    # Stopped after exactly `patience` evals without improvement since the last improvement.
    steps = [r["step"] for r in periodic]
    last_improvement = max(r["step"] for i, r in enumerate(periodic) if all(r["val_loss"] < p["val_loss"] for p in periodic[:i]))
    assert len(losses) == steps[steps.index(last_improvement) + 2]
    stop = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "early_stop" in l]
    assert len(stop) == 1 and stop[0]["step"] == len(losses) and stop[0]["early_stop"]["best_step"] == best["step"]
    assert stopped["summary"]["best"] == {"step": best["step"], "val_loss": best["val_loss"], "early_stopped_at": len(losses)}
    # keep_last=1 kept only the newest, plus the best.
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [f"step-{best['step']:07d}", f"step-{len(losses):07d}"]
    # The export holds the best checkpoint's weights, not the last step's.
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    for step, same in ((best["step"], True), (len(losses), False)):
        saved = load_file(str(out / "checkpoints" / f"step-{step:07d}" / TorchLayout.TRAINABLE))
        assert all(torch.equal(exported[k], v) for k, v in saved.items()) == same


def test_resume_continues_the_patience_count(diverging, stopped, tmp_path):
    """Resume the stopped run from its best checkpoint (the newest removed, as after a crash): it stops at the same
    step with the same losses, because the count of evals without improvement comes back from the checkpoint (a
    fresh count would take the first eval after the resume as a new best and run 2 steps longer)."""
    cut = tmp_path / "cut"
    shutil.copytree(stopped["out"], cut)
    stopped_at, best = len(stopped["losses"]), stopped["best"]["step"]
    shutil.rmtree(cut / "checkpoints" / f"step-{stopped_at:07d}")
    shutil.rmtree(cut / "model")
    state = json.loads((cut / "checkpoints" / f"step-{best:07d}" / TRAINER_STATE).read_text())
    assert state["early_stopping"]["best_step"] == best and state["early_stopping"]["stopped_at"] is None
    _, resumed = run_inprocess(diverging, cut, **{**EXTRA, "checkpoint": {**EXTRA["checkpoint"], "resume": True}})
    assert resumed == stopped["losses"]  # same steps, bitwise the same losses
    assert [r["step"] for r in val_records(cut)] == [r["step"] for r in val_records(stopped["out"])]


@pytest.mark.parametrize("overrides,message", [
    ({"eval": {"every_n_steps": 0, "early_stopping": {"patience": 3}}}, "eval.early_stopping.patience acts on periodic evals"),
    ({"eval": {"every_n_steps": 0}, "checkpoint": {"keep_best": True}}, "checkpoint.keep_best acts on periodic evals"),
    ({"eval": {"early_stopping": {"min_delta": -1}}}, "eval.early_stopping.min_delta"),
])
def test_early_stopping_needs_periodic_evals(tmp_path, corpus, overrides, message):
    from engine.config import validate_dict
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        validate_dict(tiny_overrides(corpus, tmp_path, **overrides))
