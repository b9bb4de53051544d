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
                 compiled: bool = False, train: dict | None = None):
    """A 3-layer GPT-2's loss, gradients (by name) and tracked peak breakdown after one forward+backward (dropout
    on: recompute must replay the masks)."""
    cfg = validate_dict({"model": {"init": "random", "n_layer": 3, "n_embd": 64, "n_head": 4, "n_positions": 64,
                                   "dropout": dropout}, "data": {"block_size": 64},
                         "memory": {**memory, "precision": precision}, "train": train or {}})
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
            loss_sum, n = lm_loss_sum(model, {"input_ids": x, "labels": x},
                                      fused_head=cfg.memory.fused_head_loss)
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


# ----------------------------------------------------------------------------- fast dropout, the fused head loss

FAST = {"fast_dropout": True}


def test_fast_dropout_masks_keep_1_minus_p_unbiased_and_follow_the_generator():
    from engine.fast_dropout import fast_dropout, keep_mask, keep_scale

    torch.manual_seed(3)
    keep = keep_mask(torch.Size([2048, 1023]), 0.1, torch.device("cpu"))  # an odd count: the last word part-used
    # 2.1M draws: the keep rate's standard deviation is 2.1e-4; 1e-3 is almost 5 of them.
    assert keep.float().mean().item() == pytest.approx(0.9, abs=1e-3)
    assert keep_scale(0.1) == 65536 / (65536 - 6554)
    ones = torch.ones(4096, 1024)
    assert fast_dropout(ones, 0.1).mean().item() == pytest.approx(1.0, abs=2e-3)  # unbiased, as torch's dropout
    torch.manual_seed(3)
    assert torch.equal(keep_mask(torch.Size([2048, 1023]), 0.1, torch.device("cpu")), keep)  # the default generator
    assert not torch.equal(keep_mask(torch.Size([2048, 1023]), 0.1, torch.device("cpu")), keep)
    assert torch.equal(fast_dropout(ones, 0.1, training=False), ones)
    assert torch.equal(fast_dropout(ones, 0.0), ones)
    assert torch.equal(fast_dropout(ones, 1.0), torch.zeros_like(ones))  # p = 1: torch's dropout (keep_scale: 1/0)


@pytest.mark.parametrize("precision", precisions("fp32", "bf16"))
@pytest.mark.parametrize("padded", [False, True])
def test_engine_attention_is_the_math_path_with_its_masks(precision, padded):
    """With dropout, the engine's attention equals softmax(q k^T / sqrt(d) + mask) * keep / (1 - p) @ v computed
    with the same keep mask (drawn again from the same seed), in value and in gradients; without, it is SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from engine.fast_dropout import engine_attention, keep_mask, keep_scale

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    tol = {"fp32": 1e-5, "bf16": 2e-2}[precision]
    module = torch.nn.Module()
    module.is_causal = True
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    allowed = torch.ones(2, 16, 16, dtype=torch.bool).tril()
    mask = None
    if padded:  # sdpa_mask's bool form: the first sequence left-padded by 3 (its first 3 rows see nothing)
        allowed[0, :, :3] = False
        mask = allowed[:, None]
    # Rows that see nothing (padding) feed no loss in a model (their keys are masked for every real row too): their
    # outputs are only held finite, and the loss here is over the real rows.
    real = allowed.any(-1)[:, :, None, None]  # [batch, query, 1, 1], as the output's [batch, query, heads, dim]
    torch.manual_seed(7)
    out, _ = engine_attention(module, q, k, v, mask, dropout=0.2)
    grads = torch.autograd.grad((out.float().square() * real).sum(), (q, k, v))
    torch.manual_seed(7)
    scores = (q.float() @ k.float().transpose(-1, -2)) * 8**-0.5
    scores = scores.masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    probs = torch.softmax(scores, -1).to(dtype).float()
    keep = keep_mask(probs.shape, 0.2, probs.device)
    want = ((probs * keep) @ v.float() * keep_scale(0.2)).transpose(1, 2)
    torch.testing.assert_close(out.float() * real, want * real, rtol=tol, atol=tol)
    for g, w in zip(grads, torch.autograd.grad((want.square() * real).sum(), (q, k, v))):
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol * 10)
    assert torch.isfinite(out).all()  # the padded rows: uniform, not NaN
    if not padded:
        torch.testing.assert_close(engine_attention(module, q, k, v, None)[0], sdpa_attention_forward(module, q, k, v, None)[0],
                                   rtol=0, atol=0)


@pytest.mark.parametrize("precision", precisions("fp32", "bf16"))
def test_fast_dropout_recompute_replays_its_masks(precision):
    """Full and selective recompute with fast dropout give the gradients of no recompute: checkpointing restores the
    generator, and the masks come from it."""
    loss0, grads0, _ = one_backward(NONE, precision, train=FAST)
    for memory in (FULL, SELECTIVE):
        loss, grads, _ = one_backward(memory, precision, train=FAST)
        assert loss == pytest.approx(loss0, abs=PARITY_TOL[precision])
        for name, g in grads.items():
            torch.testing.assert_close(g, grads0[name], rtol=0, atol=PARITY_TOL[precision], msg=name)


def test_fast_dropout_keeps_what_torch_dropout_keeps():
    """Tracked activations at the peak with fast dropout are no more than torch's dropout and SDPA keep, on fake
    tensors (the simulator's view) as on real ones."""
    torch_acts = one_backward(NONE)[2]["activations"]
    fake, real = (one_backward(NONE, fake=f, train=FAST)[2]["activations"] for f in (True, False))
    assert real == pytest.approx(fake, rel=0.01)
    assert real <= torch_acts


@pytest.mark.parametrize("precision", precisions("fp32", "bf16"))
def test_fused_head_loss_gives_autograd_loss_and_gradients(precision):
    loss0, grads0, peak0 = one_backward(NONE, precision, dropout=0.0)
    loss, grads, peak = one_backward({"fused_head_loss": True}, precision, dropout=0.0)
    assert loss == pytest.approx(loss0, rel=1e-6)  # a sum over 256 tokens: same terms, another order (1 ulp seen)
    # In bf16 the logits' gradient is rounded to bf16 before the loss's incoming scale multiplies it (autograd: after),
    # as the chunked loss does: each gradient within bf16's rounding. Measured relative error (norm), largest over
    # the parameters: fp32 9.5e-7, bf16 6.3e-3.
    for name, g in grads.items():
        assert ((g - grads0[name]).norm() / grads0[name].norm()).item() < {"fp32": 1e-5, "bf16": 2e-2}[precision], name
    # Autograd's backward allocates the nll and log-softmax gradients ([tokens x vocab] fp32 each) beside the kept
    # log-softmax output: measured here 171 -> 81 MB (fp32), 176 -> 99 MB (bf16) of tracked peak.
    assert sum(peak.values()) < 0.6 * sum(peak0.values())


@pytest.mark.parametrize("precision", precisions("fp32", "bf16"))
def test_fast_paths_train_over_20_steps(corpus, tmp_path, precision):
    """20 steps, dropout on: fast dropout and the fused head loss against torch's dropout and autograd's loss.
    The masks differ, so the losses differ step by step by dropout's own noise, not by a bias: their mean over the
    last 10 steps within 0.5%; the fused head alone gives the plain step's losses."""
    common = {"model": {"dropout": 0.1}, "train": {"max_steps": 20}}
    mem = {"precision": precision}
    _, plain = run_inprocess(corpus, tmp_path / "plain", memory=mem, **common)
    _, fused = run_inprocess(corpus, tmp_path / "fused", memory={**mem, "fused_head_loss": True}, **common)
    # bf16: the logits' gradient rounded before its scale (above); measured 2.0e-4 at most over the 20 losses.
    tol = {"fp32": PARITY_TOL["fp32"], "bf16": 5e-4}[precision]
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(plain), rtol=0, atol=tol)
    _, fast = run_inprocess(corpus, tmp_path / "fast", memory={**mem, "fused_head_loss": True},
                            **{**common, "train": {**common["train"], **FAST}})
    # Measured: -0.074% (fp32), -0.073% (bf16).
    assert sum(fast[-10:]) / 10 == pytest.approx(sum(plain[-10:]) / 10, rel=0.005)


def test_fast_paths_refuse_what_they_cannot_do():
    for bad, match in (({"memory": {"keep_host_memory": True, "release_host_memory": True}}, "set one of them to false"),
                       ({"memory": {"fused_head_loss": True, "loss_chunk_size": 64}}, "unset one of them"),
                       ({"memory": {"fused_head_loss": True, "zero_stage": 3}}, "outside ZeRO-3's gather hooks"),
                       ({"train": FAST, "model": {"attn_implementation": "eager"}}, "set attn_implementation=sdpa")):
        with pytest.raises((ConfigError, ValueError), match=match):
            validate_dict(bad)


def test_fast_paths_resume_exactly(corpus, tmp_path):
    """Fast dropout's masks come from the default generator, which a checkpoint saves: a run resumed at step 4 draws
    the masks the uninterrupted one drew (and the fused head loss holds no state)."""
    from conftest import assert_resumes_exactly

    assert_resumes_exactly(corpus, tmp_path, model={"dropout": 0.1}, train=FAST, memory={"fused_head_loss": True})
