"""CUDA-only checks (`pytest -m gpu`; skipped without a GPU). The GPU truth kit (benchmarks/gpu_check.py) runs them
on a GPU machine: fp16 loss scaling on CUDA, bitsandbytes 8-bit and paged optimizers on CUDA, the SDPA kernel
actually chosen, on-vs-off parity of each memory feature on CUDA, and a one-rank DeepSpeed ZeRO-2 run on NCCL."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_inprocess

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/gpu_check.py)")]

CUDA = {"train": {"device": "cuda"}}


def on_cuda(corpus, out, **extra):
    for key, value in CUDA.items():
        extra[key] = {**value, **extra.get(key, {})}
    return run_inprocess(corpus, out, **extra)


@pytest.fixture(scope="module")
def cuda_baseline(corpus, tmp_path_factory):
    """fp32, every memory feature at its default, on the GPU."""
    return on_cuda(corpus, tmp_path_factory.mktemp("cuda") / "base")[1]


def records(out) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def test_fp16_loss_scaling_on_cuda(corpus, tmp_path, cuda_baseline):
    """torch's GradScaler on CUDA: the scale is reported, no step is skipped at this scale, and the loss decrease
    tracks fp32's within 5%."""
    _, losses = on_cuda(corpus, tmp_path / "run", memory={"precision": "fp16"})
    recs = records(tmp_path / "run")
    assert all(r["loss_scale"] == 65536.0 and not r["skipped"] for r in recs)
    drop = torch.tensor(losses[0]) - torch.tensor(losses)
    ref = torch.tensor(cuda_baseline[0]) - torch.tensor(cuda_baseline)
    assert (drop - ref).abs().max() <= 0.05 * ref.max(), (losses, cuda_baseline)


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_bitsandbytes_optimizers_on_cuda(corpus, tmp_path, cuda_baseline, name):
    """bitsandbytes' CUDA kernels (8-bit blockwise states; paged states in unified memory): within 10% of AdamW."""
    _, losses = on_cuda(corpus, tmp_path / "run", optim={"name": name})
    drop = torch.tensor(losses[0]) - torch.tensor(losses)
    ref = torch.tensor(cuda_baseline[0]) - torch.tensor(cuda_baseline)
    assert (drop - ref).abs().max() <= 0.1 * ref.max(), (losses, cuda_baseline)


def test_sdpa_runs_a_fused_kernel_on_cuda():
    """GPT-2's attention in 16-bit with dropout (training) on CUDA runs a fused SDPA kernel (flash or
    memory-efficient), never the math kernel that keeps the [heads x seq x seq] matrix the simulator leaves out."""
    from torch.profiler import ProfilerActivity, profile

    from engine.config import validate_dict
    from engine.model import build_model

    cfg = validate_dict({"model": {"init": "random", "n_layer": 2, "n_embd": 128, "n_head": 2, "n_positions": 512,
                                   "dropout": 0.1}, "data": {"block_size": 512}})
    model = build_model(cfg, 50257).cuda().train()
    x = torch.randint(0, 50257, (2, 512), device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.autocast("cuda", dtype=torch.bfloat16):
        model(x).logits.float().sum().backward()
    names = " ".join(e.name for e in prof.key_averages()).lower()
    assert "flash" in names or "efficient_attention" in names or "fmha" in names, names[:2000]


@pytest.mark.parametrize("memory", [
    {"fused_gelu": False},
    {"activation_checkpointing": True},
    {"loss_chunk_size": 16},
])
def test_memory_features_keep_the_losses_on_cuda(corpus, tmp_path, cuda_baseline, memory):
    """Each memory feature on vs off on CUDA (fp32): the same losses within 1e-4."""
    _, losses = on_cuda(corpus, tmp_path / "run", memory=memory)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(cuda_baseline), rtol=0, atol=1e-4)


def test_optimizer_in_backward_on_cuda(corpus, tmp_path):
    """Stepping inside backward equals the plain step without clipping, on CUDA."""
    _, plain = on_cuda(corpus, tmp_path / "plain", optim={"grad_clip": None})
    _, inbwd = on_cuda(corpus, tmp_path / "inbwd", optim={"grad_clip": None},
                       memory={"optimizer_in_backward": True})
    torch.testing.assert_close(torch.tensor(inbwd), torch.tensor(plain), rtol=0, atol=1e-4)


def test_frozen_16bit_weights_on_cuda(corpus, tmp_path):
    """LoRA under bf16 autocast on CUDA: frozen weights stored in bf16 or fp32 give the same losses."""
    lora = {"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}, "precision": "bf16"}
    _, a = on_cuda(corpus, tmp_path / "a", memory={**lora, "frozen_weights_16bit": True})
    _, b = on_cuda(corpus, tmp_path / "b", memory={**lora, "frozen_weights_16bit": False})
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-3)


def test_one_rank_zero2_on_nccl(corpus, tmp_path, cuda_baseline):
    """DeepSpeed ZeRO-2 in one process on CUDA (NCCL process group): the same losses as the torch backend."""
    import torch.distributed as dist

    summary, losses = on_cuda(corpus, tmp_path / "run", memory={"zero_stage": 2})
    assert dist.is_initialized() and dist.get_backend() == "nccl"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(cuda_baseline), rtol=0, atol=1e-4)
