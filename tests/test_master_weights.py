"""memory.master_weights=bf16: bf16 weights (no fp32 master copy), each parameter updated in fp32 inside backward
and rounded back stochastically. Parity with fp32 masters, unbiased rounding, exact resume, start-up checks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_resumes_exactly, run_inprocess, tiny_overrides
from engine.backends.torch_backend import TorchLayout
from engine.config import validate_dict
from engine.errors import ConfigError
from engine.optim import stochastic_round_to_bf16

IN_BACKWARD = {"precision": "bf16", "optimizer_in_backward": True}
NO_CLIP = {"grad_clip": None}


def test_stochastic_rounding_is_unbiased():
    """1 + 2^-10 lies 1/8 of the way from 1 to the next bf16 value (1 + 2^-7): round-to-nearest always gives 1,
    stochastic rounding gives 1 + 2^-7 an eighth of the time, so its mean is the fp32 value."""
    x = torch.full((200_000,), 1 + 2**-10)
    torch.manual_seed(0)
    r = stochastic_round_to_bf16(x)
    assert r.dtype == torch.bfloat16 and set(r.float().unique().tolist()) == {1.0, 1 + 2**-7}
    assert r.float().mean().item() == pytest.approx(1 + 2**-10, abs=2e-5)
    assert x.to(torch.bfloat16).float().mean().item() == 1.0  # round-to-nearest loses the difference
    neg = stochastic_round_to_bf16(-x)
    assert neg.float().mean().item() == pytest.approx(-(1 + 2**-10), abs=2e-5)
    exact = torch.tensor([0.0, 1.0, -2.5, float("inf")])
    assert torch.equal(stochastic_round_to_bf16(exact).float(), exact)  # representable values stay


def test_bf16_master_weights_track_fp32_masters(corpus, tmp_path):
    """60 steps under bf16 autocast, both stepped inside backward: the loss decrease at every step stays within 10%
    of the fp32-master run's total decrease, and the final loss within 2%. The checkpointed weights are bf16."""
    common = dict(optim={**NO_CLIP, "lr": 1e-3}, train={"max_steps": 60})
    _, ref = run_inprocess(corpus, tmp_path / "fp32", memory=IN_BACKWARD, **common)
    _, sr = run_inprocess(corpus, tmp_path / "bf16", memory={**IN_BACKWARD, "master_weights": "bf16"}, **common)
    drop, ref_drop = sr[0] - torch.tensor(sr), ref[0] - torch.tensor(ref)
    assert (drop - ref_drop).abs().max() <= 0.1 * ref_drop.max(), (sr[-5:], ref[-5:])
    assert sr[-1] == pytest.approx(ref[-1], rel=0.02)
    ckpt = sorted((tmp_path / "bf16" / "checkpoints").iterdir())[-1]
    assert {t.dtype for t in load_file(str(ckpt / TorchLayout.TRAINABLE)).values()} == {torch.bfloat16}


def test_bf16_master_weights_resume_exactly(corpus, tmp_path):
    """The rounding draws from the RNG a checkpoint restores: a run cut at step 4 and resumed logs the same losses,
    bit for bit, as the run that never stopped (8-bit states included)."""
    assert_resumes_exactly(corpus, tmp_path, memory={**IN_BACKWARD, "master_weights": "bf16"},
                           optim={**NO_CLIP, "name": "adamw_8bit"})


def test_bf16_weights_compute_in_fp16_where_there_is_no_bf16(corpus, tmp_path):
    """The T4 form: bf16 weights, fp16 matmuls under loss scaling. The residual stream stays fp16 (embedding outputs
    are cast; bf16 + fp16 would promote it to fp32), and 30 steps track fp32 masters under the same fp16 autocast:
    final loss within 2%."""
    from engine.model import compute_fp16_from_bf16
    from engine.model import build_model

    fp16 = {**IN_BACKWARD, "precision": "fp16"}
    common = dict(optim={**NO_CLIP, "lr": 1e-3}, train={"max_steps": 30})  # fp16 matmuls are slow on most CPUs
    _, ref = run_inprocess(corpus, tmp_path / "fp32", memory=fp16, **common)
    _, bf16 = run_inprocess(corpus, tmp_path / "bf16", memory={**fp16, "master_weights": "bf16"}, **common)
    assert bf16[-1] == pytest.approx(ref[-1], rel=0.02), (bf16[-5:], ref[-5:])
    assert ref[0] - bf16[-1] >= 0.9 * (ref[0] - ref[-1])

    cfg = validate_dict(tiny_overrides(corpus, tmp_path / "r", memory={**fp16, "master_weights": "bf16"}, optim=NO_CLIP))
    model = build_model(cfg, 50257)
    compute_fp16_from_bf16(model)
    seen = []
    model.transformer.h[0].register_forward_hook(lambda _m, _a, out: seen.append(out[0].dtype))
    with torch.autocast("cpu", dtype=torch.float16):
        model(torch.zeros(1, 8, dtype=torch.long))
    assert seen == [torch.float16]


@pytest.mark.parametrize("memory,message", [
    ({"master_weights": "bf16", "precision": "bf16"}, "set memory.optimizer_in_backward=true"),
    ({**IN_BACKWARD, "master_weights": "bf16", "precision": "fp32"}, "computes in 16 bits, not memory.precision=fp32"),
])
def test_incompatible_settings_are_rejected(corpus, tmp_path, memory, message):
    with pytest.raises(ConfigError, match=message):
        validate_dict(tiny_overrides(corpus, tmp_path / "r", memory=memory, optim=NO_CLIP))


def test_the_planner_offers_bf16_weights_on_every_gpu():
    """bf16 compute where the GPU has it, fp16 compute from the bf16 weights on a T4: both valid configurations."""
    from engine.config import load_config
    from engine.memory.gpus import GPUS
    from engine.plan import Request, activation_choices, config_overrides, strategies

    for gpu, precision in (("a100-40g", "bf16"), ("t4", "fp16")):
        req = Request(gpu=GPUS[gpu])
        bf16 = [s for s in strategies(req) if "bf16 weights" in s.name]
        assert len(bf16) == 3  # 8-bit, 4-bit AdamW, Adafactor
        # the measured gaps, printed with a plan; a recipe over the 1% bar would be marked in the table
        assert all("vs fp32 AdamW clipped at 1.0" in s.quality for s in bf16)
        assert all((s.quality_over is not None) == ("OVER 1%" in s.quality) for s in bf16)
        for s in bf16:
            cfg = load_config(None, ["model.init=random", *config_overrides(req, s, activation_choices(s)[0], 1, 1)])
            assert (cfg.memory.master_weights, cfg.memory.precision) == ("bf16", precision)


def test_large_weights_step_in_pieces_with_the_same_result(corpus, tmp_path, monkeypatch):
    """A weight is updated in fp32 a piece at a time (bounding the transient fp32 copy); pieces change nothing: with
    round-to-nearest in place of the random rounding, 1000-element pieces and whole weights give identical runs."""
    import engine.optim

    monkeypatch.setattr(engine.optim, "stochastic_round_to_bf16", lambda x: x.to(torch.bfloat16))
    extra = dict(memory={**IN_BACKWARD, "master_weights": "bf16"}, optim=NO_CLIP, train={"max_steps": 4})
    _, whole = run_inprocess(corpus, tmp_path / "whole", **extra)
    monkeypatch.setattr(engine.optim, "FP32_PIECE", 1000)
    _, pieces = run_inprocess(corpus, tmp_path / "pieces", **extra)
    assert pieces == whole


def test_a_bf16_model_is_built_in_bf16(corpus, tmp_path):
    """No fp32 copy of a bf16-weight model on the host: the model is built in bf16 (random init or pretrained)."""
    from engine.model import build_model

    cfg = validate_dict(tiny_overrides(corpus, tmp_path / "r", memory={**IN_BACKWARD, "master_weights": "bf16"},
                                       optim=NO_CLIP))
    assert {p.dtype for p in build_model(cfg, 50257).parameters()} == {torch.bfloat16}
    fp32 = validate_dict(tiny_overrides(corpus, tmp_path / "r"))
    assert {p.dtype for p in build_model(fp32, 50257).parameters()} == {torch.float32}
