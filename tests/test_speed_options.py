"""The speed options at the same memory.

Selective activation checkpointing (memory.checkpoint_policy=selective) against full recompute and none: recompute
replays the block's forward with the same random numbers, so losses and gradients agree within the precision's
reduction-order tolerance (PARITY_TOL of test_training.py); the memory tracker shows where selective sits between none
and full.

Compiled blocks (train.compile_blocks) against eager: the compiler fuses and reorders, so losses agree within
COMPILE_TOL, with dropout off (compiled dropout draws its masks from the same generator, but not the same masks)."""

import contextlib
import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import precisions, run_inprocess
from engine.config import validate_dict
from engine.errors import ConfigError
from engine.loss import lm_loss_sum
from engine.memory.tracker import MemoryTracker
from engine.model import build_model, compile_blocks, compile_seconds
from test_training import PARITY_TOL

NONE, FULL = {}, {"activation_checkpointing": True}
SELECTIVE = {"activation_checkpointing": True, "checkpoint_policy": "selective"}


def one_backward(memory: dict, precision: str = "fp32", fake: bool = False, dropout: float = 0.1,
                 compiled: bool = False):
    """A 3-layer GPT-2's loss, gradients (by name) and tracked peak breakdown after one forward+backward (dropout
    on: recompute must replay the masks)."""
    cfg = validate_dict({"model": {"init": "random", "n_layer": 3, "n_embd": 64, "n_head": 4, "n_positions": 64,
                                   "dropout": dropout}, "data": {"block_size": 64},
                         "memory": {**memory, "precision": precision}})
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        torch.manual_seed(0)
        model = build_model(cfg, 1000)
        if compiled:
            compile_blocks(model)
        x = torch.randint(0, 1000, (4, 64))
        tracker = MemoryTracker()
        tracker.track_model(model)
        with tracker, torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            torch.manual_seed(1)
            loss_sum, n = lm_loss_sum(model, {"input_ids": x, "labels": x})
            (loss_sum / n).backward()
    grads = {} if fake else {k: p.grad.clone() for k, p in model.named_parameters()}
    return (None if fake else loss_sum.item()), grads, dict(tracker.peak_breakdown)


@pytest.mark.parametrize("precision", precisions("fp32", "bf16"))
def test_selective_recompute_gives_the_gradients_of_no_recompute(precision):
    """Loss and every gradient with selective recompute equal those without recompute and with full recompute."""
    loss0, grads0, _ = one_backward(NONE, precision)
    for memory in (FULL, SELECTIVE):
        loss, grads, _ = one_backward(memory, precision)
        assert loss == pytest.approx(loss0, abs=PARITY_TOL[precision])
        for name, g in grads.items():
            torch.testing.assert_close(g, grads0[name], rtol=0, atol=PARITY_TOL[precision], msg=name)


def test_selective_keeps_less_than_none_and_more_than_full():
    """Tracked activations at the peak (fake tensors: the simulator's view, which the real run matches):
    none > selective > full, selective keeping the matmul and attention outputs full recompute drops."""
    acts = {name: one_backward(mem, fake=True)[2]["activations"]
            for name, mem in (("none", NONE), ("full", FULL), ("selective", SELECTIVE))}
    assert acts["none"] > acts["selective"] > acts["full"], acts
    real = one_backward(SELECTIVE)[2]["activations"]
    assert real == pytest.approx(acts["selective"], rel=0.01)


@pytest.mark.parametrize("precision", precisions("fp32", "bf16"))
def test_selective_recompute_trains_as_full_over_20_steps(corpus, tmp_path, precision):
    """20 steps with dropout on: the losses of selective and full recompute agree within PARITY_TOL."""
    common = {"model": {"dropout": 0.1}, "train": {"max_steps": 20}}
    _, full = run_inprocess(corpus, tmp_path / "full", memory={**FULL, "precision": precision}, **common)
    _, selective = run_inprocess(corpus, tmp_path / "sel", memory={**SELECTIVE, "precision": precision}, **common)
    torch.testing.assert_close(torch.tensor(selective), torch.tensor(full), rtol=0, atol=PARITY_TOL[precision])


# The memory features selective recompute composes with, each trained 6 steps with full and with selective recompute.
COMPOSED = {
    "in-backward 8-bit AdamW": ({"optimizer_in_backward": True}, {"name": "adamw_8bit", "grad_clip": 1.0}, "fp32"),
    "bf16 weights + 8-bit AdamW in backward": ({"optimizer_in_backward": True, "master_weights": "bf16"},
                                               {"name": "adamw_8bit", "grad_clip": 1.0}, "bf16"),
    "bf16 weights + 4-bit AdamW in backward": ({"optimizer_in_backward": True, "master_weights": "bf16"},
                                               {"name": "adamw_4bit", "grad_clip": 1.0}, "bf16"),
    "LoRA": ({"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}}, {}, "fp32"),
    "QLoRA": ({"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "quantize_base": "nf4"}}, {}, "bf16"),
}


@pytest.mark.parametrize("name", [pytest.param(k, marks=precisions(v[2])[0].marks) for k, v in COMPOSED.items()])
def test_selective_recompute_composes(corpus, tmp_path, name):
    memory, optim, precision = COMPOSED[name]
    losses = [run_inprocess(corpus, tmp_path / policy, optim=optim,
                            memory={**memory, **mem, "precision": precision})[1]
              for policy, mem in (("full", FULL), ("selective", SELECTIVE))]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=0, atol=PARITY_TOL[precision])


def test_selective_needs_checkpointing():
    with pytest.raises((ConfigError, ValueError), match="activation_checkpointing=false: enable it"):
        validate_dict({"memory": {"checkpoint_policy": "selective"}})


# Compiled against eager over 20 steps, dropout off. Measured on the 2-core Xeon (AMX), torch 2.13: fp32 1.9e-6
# (plain step), 9.5e-7 (in-backward 8-bit + selective); bf16 9.0e-5 (autocast), 2.8e-4 (bf16 weights + 4-bit
# AdamW in backward), 1.2e-4 (QLoRA + selective).
COMPILE_TOL = {"fp32": 2e-5, "bf16": 1e-3}


def test_compiled_blocks_give_the_gradients_of_eager():
    loss0, grads0, _ = one_backward(SELECTIVE, dropout=0.0)
    loss, grads, _ = one_backward(SELECTIVE, dropout=0.0, compiled=True)
    assert loss == pytest.approx(loss0, abs=COMPILE_TOL["fp32"])
    for name, g in grads.items():
        torch.testing.assert_close(g, grads0[name], rtol=1e-4, atol=1e-6, msg=name)


COMPILED = {
    "in-backward 8-bit AdamW + selective": ({"optimizer_in_backward": True, "activation_checkpointing": True,
                                             "checkpoint_policy": "selective"}, {"name": "adamw_8bit", "grad_clip": 1.0},
                                            "fp32"),
    "bf16 weights + 4-bit AdamW in backward + full": ({"optimizer_in_backward": True, "master_weights": "bf16",
                                                       "activation_checkpointing": True},
                                                      {"name": "adamw_4bit", "grad_clip": 1.0}, "bf16"),
    "QLoRA + selective": ({"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "quantize_base": "nf4"},
                           "activation_checkpointing": True, "checkpoint_policy": "selective"}, {}, "bf16"),
}


@pytest.mark.parametrize("name", [pytest.param(k, marks=precisions(v[2])[0].marks) for k, v in COMPILED.items()])
def test_compiled_blocks_train_as_eager_over_20_steps(corpus, tmp_path, name):
    memory, optim, precision = COMPILED[name]
    runs = [run_inprocess(corpus, tmp_path / str(compiled), optim=optim, memory={**memory, "precision": precision},
                          train={"max_steps": 20, "compile_blocks": compiled}) for compiled in (False, True)]
    assert runs[1][0]["compile_s"] > 0 and "compile_s" not in runs[0][0]  # compiled, and the time reported
    torch.testing.assert_close(torch.tensor(runs[1][1]), torch.tensor(runs[0][1]), rtol=0, atol=COMPILE_TOL[precision])


def test_compiled_blocks_still_free_each_gradient_when_it_is_used(corpus, tmp_path):
    """In-backward stepping with compiled blocks: a block's backward is one compiled graph, whose gradients the
    autograd engine hands to the parameters one by one; each is stepped and freed before the next one arrives, in
    every block (with the plain step they would all live to the end of backward)."""
    import weakref

    from conftest import tiny_overrides
    from engine.distributed import dist_env
    from engine.train import TrainingRecipe

    cfg = validate_dict(tiny_overrides(corpus, tmp_path / "run", memory={"optimizer_in_backward": True},
                                       model={"n_layer": 3}, optim={"grad_clip": None},
                                       train={"compile_blocks": True, "max_steps": 2}))
    recipe = TrainingRecipe(cfg, dist_env())
    recipe.setup_data()
    recipe.setup_backend()
    blocks = recipe.backend.model.transformer.h
    params = [p for b in blocks for p in b.parameters()]
    arrived: list[int] = []

    def on_grad(i: int):
        def hook(grad):  # before this gradient is accumulated: no earlier one may still be held
            held = sum(p.grad is not None for p in params)
            assert held == 0, f"a gradient of block {i} arrived while {held} earlier gradients are held"
            arrived.append(i)
        return hook

    for i, block in enumerate(blocks):
        for p in block.parameters():
            p.register_hook(on_grad(i))
    for step in range(2):
        arrived.clear()
        recipe.backend.train_step(recipe.sampler.step_batches(step)[1])
        assert len(arrived) == len(params)  # every block's gradients came
    assert compile_seconds() > 0  # and the blocks were compiled


def test_compiled_blocks_refuse_the_memory_tracker_and_zero3():
    with pytest.raises((ConfigError, ValueError), match="memory tracker cannot see"):
        validate_dict({"train": {"compile_blocks": True}, "logging": {"track_memory": True}})
    with pytest.raises((ConfigError, ValueError), match="use zero_stage<=2, or turn compile_blocks off"):
        validate_dict({"train": {"compile_blocks": True}, "memory": {"zero_stage": 3}})


@pytest.mark.slow
def test_the_speed_options_compose_with_zero(two_ranks):
    """2 ranks under the deepspeed launcher (the shared chain, tests/two_ranks.py): selective recompute on ZeRO-3 and
    selective + compiled blocks on ZeRO-1 train as the same ZeRO stage without them (6 steps)."""
    from conftest import train_losses

    for run, ref, tol in (("zero3_selective", "zero3", PARITY_TOL["fp32"]),
                          ("zero1_selective_compiled", "zero1", COMPILE_TOL["fp32"])):
        losses, ref_losses = train_losses(two_ranks[run]), train_losses(two_ranks[ref])[:6]
        assert len(losses) == 6
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=0, atol=tol, msg=run)
    summary = json.loads((two_ranks["zero1_selective_compiled"] / "summary.json").read_text())
    assert summary["compile_s"] > 0
