"""Gradient clipping with the optimizer stepped inside backward (optim.clip_in_backward): `exact` is the plain step's
clipped update, `stale` a bound of it at no extra cost; neither holds a model-sized buffer; both resume exactly."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_resumes_exactly, precisions, run_inprocess, tiny_overrides
from engine.config import validate_dict

CLIP = 0.5  # below this tiny model's gradient norms (~1-3 early on): every step clips
COMMON = dict(optim={"name": "adamw", "grad_clip": CLIP, "lr": 3e-3}, train={"max_steps": 20})


def norms(out) -> list[float]:
    return [json.loads(l)["grad_norm"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


@pytest.fixture(scope="module")
def plain(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "run"
    return out, run_inprocess(corpus, out, **COMMON)[1]


def test_exact_clipping_in_backward_is_the_plain_steps_clipped_update(corpus, tmp_path, plain):
    """20 steps at a clip every step hits: losses within 1e-4 (fp32: the in-backward step's own tolerance against
    the plain one) and the logged global norms within 1e-4 relative."""
    out, ref = plain
    _, losses = run_inprocess(corpus, tmp_path / "exact", memory={"optimizer_in_backward": True},
                              optim={**COMMON["optim"], "clip_in_backward": "exact"}, train=COMMON["train"])
    assert min(norms(out)) > CLIP  # clipping was active at every step
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor(norms(tmp_path / "exact")), torch.tensor(norms(out)), rtol=1e-4, atol=0)


@pytest.mark.parametrize("last_norm, measuring_first", [(None, True), (10.0, False), (0.1, False)])
def test_stale_clipping_scales_by_the_larger_of_last_steps_norm_and_this_ones(last_norm, measuring_first):
    """White box, through AdamW's first moment (exp_avg = (1 - beta1) x the gradient it was given): a lone weight's
    gradient g (norm n) reaches the optimizer as g x min(1, clip / max(last norm, n)): the last step's norm when it
    is larger (stale), this step's own when it is larger (a spike), and n alone on a first step measured first."""
    from engine.config import OptimConfig
    from engine.optim import InBackwardOptimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(16, 8)
    g = torch.autograd.grad(model(x).square().sum(), model.weight)[0]
    n = float(g.norm())
    clip = n / 2
    opt = InBackwardOptimizer(model, OptimConfig(name="adamw", grad_clip=clip, lr=1e-3, weight_decay=0.0))
    if measuring_first:  # what the backend does on a first step: a measuring backward, then the stepping one
        opt.begin_backward(1.0, measuring=True)
        model(x).square().sum().backward()
        opt.clip_norm = opt.global_norm()
        assert opt.optimizers["weight"].state == {}  # measuring stepped nothing
    else:
        opt.clip_norm = torch.tensor(last_norm)
    opt.begin_backward(1.0, bound_by_partial=True)
    model(x).square().sum().backward()
    divisor = n if last_norm is None else max(last_norm, n)
    expected = g * min(1.0, clip / (divisor + 1e-6))
    got = opt.optimizers["weight"].state[model.weight]["exp_avg"] / 0.1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert float(opt.global_norm()) == pytest.approx(n, rel=1e-6)  # the logged norm is this step's, unclipped


@pytest.mark.parametrize("mode", ["stale", "exact"])
def test_clipping_in_backward_holds_no_model_sized_buffer(corpus, tmp_path, mode):
    """The simulated step (the backend's own, on fake tensors, under the memory tracker): clipping adds scalars, not
    a gradient buffer - the peak moves by less than 1% of the parameters' bytes."""
    from engine.memory.simulate import simulate

    def peak(**optim):
        cfg = validate_dict(tiny_overrides(corpus, tmp_path, model={"n_embd": 128, "n_head": 4},
                                           memory={"optimizer_in_backward": True}, optim=optim))
        return simulate(cfg, kernel="cpu", steps=3)

    off, on = peak(grad_clip=None), peak(grad_clip=1.0, clip_in_backward=mode)
    params = off.breakdown["parameters"]
    assert abs(on.peak_bytes - off.peak_bytes) < 0.01 * params, (on.peak_bytes, off.peak_bytes, params)


@pytest.mark.parametrize("precision", precisions("fp32", "bf16", "fp16"))
def test_stale_clipping_resumes_exactly(corpus, tmp_path, precision):
    """The last step's norm (what the next step's gradients are scaled by) is in the checkpoint."""
    assert_resumes_exactly(corpus, tmp_path, memory={"optimizer_in_backward": True, "precision": precision},
                           optim={"grad_clip": CLIP})


@pytest.mark.parametrize("memory", [
    {"master_weights": "bf16", "precision": "bf16"},  # pieces rounded back stochastically
    {"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}},
])
def test_clipping_composes_with_bf16_weights_and_lora(corpus, tmp_path, memory):
    """The clipped gradients reach the pieced bf16-weight step and LoRA adapters; the run trains and logs its
    global norm every step."""
    _, losses = run_inprocess(corpus, tmp_path / "run", memory={"optimizer_in_backward": True, **memory},
                              optim={"grad_clip": CLIP, "lr": 1e-2}, train={"max_steps": 8})
    assert losses[-1] < losses[0]
    assert all(n is not None and n > 0 for n in norms(tmp_path / "run"))


def test_an_fp16_scale_that_overflows_is_measured_down_before_any_parameter_steps(corpus, tmp_path):
    """fp16 in backward: a loss scale not yet tried (the first step, and after each change) is measured first, and
    halved while that backward overflows, so no parameter skips its update while the others step. Started far
    too high (2^40), the first step comes down to a scale that fits and steps every parameter."""
    from engine.backends import make_backend
    from engine.distributed import dist_env
    from engine.train import TrainingRecipe

    cfg = validate_dict(tiny_overrides(corpus, tmp_path, memory={"optimizer_in_backward": True, "precision": "fp16"},
                                       optim={"grad_clip": None}))
    recipe = TrainingRecipe(cfg, dist_env())
    recipe.setup_data()
    recipe.setup_backend()
    backend = recipe.backend
    backend.loss_scale.scale = 2.0**40
    _, batches = recipe.sampler.step_batches(0)
    before = {n: p.detach().clone() for n, p in backend.model.named_parameters()}
    stats = backend.train_step(batches)
    assert not stats.skipped and backend.optimizer.skipped == 0
    assert 1.0 < stats.loss_scale < 2.0**40 and not backend.loss_scale.untried
    assert all(not torch.equal(p, before[n]) for n, p in backend.model.named_parameters())  # every one stepped
