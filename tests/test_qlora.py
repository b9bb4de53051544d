"""memory.lora.quantize_base=nf4 (QLoRA): the frozen base's matmul weights in 4-bit NF4 with double quantization
(bitsandbytes Linear4bit), adapters trained over it. Parity with LoRA, the export (a plain GPT-2 with the adapter
merged into the dequantized base), exact resume, start-up checks."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_resumes_exactly, precisions, run_inprocess, tiny_overrides
from engine.config import validate_dict
from engine.errors import ConfigError
from engine.model import build_model, merged_copy

# 64 wide: every weight is a whole number of NF4 blocks (64 values). fp32 compute: the same on every CPU.
WIDE = {"n_embd": 64}
QLORA = {"lora": {"enabled": True, "quantize_base": "nf4"}}


@pytest.mark.parametrize("precision", precisions("fp32", "bf16"))
def test_qlora_trains_like_lora(corpus, tmp_path, precision):
    """30 steps at lr 1e-3: final loss within 1% of LoRA over the unquantized base in the same precision (NF4
    rounding of the frozen weights is the only difference; measured on this CPU, fp32: LoRA 10.6050, QLoRA
    10.6051). bf16: the base built in bf16 and quantized from it, the adapters in fp32, the compute in bf16."""
    _, lora = run_inprocess(corpus, tmp_path / "lora", model=WIDE,
                            memory={"lora": {"enabled": True}, "precision": precision}, train={"max_steps": 30})
    _, qlora = run_inprocess(corpus, tmp_path / "qlora", model=WIDE, memory={**QLORA, "precision": precision},
                             train={"max_steps": 30})
    assert qlora[-1] == pytest.approx(lora[-1], rel=0.01), (qlora[-5:], lora[-5:])
    assert lora[0] - qlora[-1] >= 0.9 * (lora[0] - lora[-1])
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "qlora" / "model")  # a plain GPT-2
    assert exported.transformer.h[0].attn.c_attn.weight.shape == (64, 192)
    assert (tmp_path / "qlora" / "adapter" / "adapter_model.safetensors").is_file()


def test_base_weights_are_nf4_with_double_quantization(corpus, tmp_path):
    import bitsandbytes as bnb

    model = build_model(validate_dict(tiny_overrides(corpus, tmp_path, model=WIDE, memory=QLORA)), 50257)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 4  # c_attn, attn c_proj, c_fc, mlp c_proj in each of 2 blocks
    for q in layers:
        st = q.weight.quant_state
        assert q.weight.dtype == torch.uint8 and st.quant_type == "nf4" and st.nested  # double quantization
        assert not q.weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_merged_export_equals_the_quantized_model_with_its_adapter(corpus, tmp_path):
    """The export dequantizes each NF4 weight and adds the adapter's delta: a plain GPT-2 (Conv1D) whose logits equal
    the training model's (4-bit base + adapter), fp32, to 1e-4."""
    from transformers.pytorch_utils import Conv1D

    model = build_model(validate_dict(tiny_overrides(corpus, tmp_path, model=WIDE, memory=QLORA)), 50257)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # a non-zero adapter (B starts at zero)
    x = torch.randint(0, 50257, (2, 16))
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=x).logits
        merged = merged_copy(model).eval()
        assert isinstance(merged.transformer.h[1].mlp.c_fc, Conv1D)
        assert torch.allclose(merged(input_ids=x).logits, trained, atol=1e-4)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.zero_()
        assert not torch.allclose(model(input_ids=x).logits, trained, atol=1e-3)  # the adapter mattered


@pytest.mark.parametrize("precision", precisions("fp32", "bf16"))
def test_qlora_resumes_exactly(corpus, tmp_path, precision):
    assert_resumes_exactly(corpus, tmp_path, model=WIDE, memory={**QLORA, "precision": precision})


@pytest.mark.parametrize("memory,message", [
    ({"lora": {"quantize_base": "nf4"}}, "set memory.lora.enabled=true"),
    ({**QLORA, "zero_stage": 2}, "runs on the single-device torch backend"),
])
def test_incompatible_settings_are_rejected(corpus, tmp_path, memory, message):
    with pytest.raises(ConfigError, match=message):
        validate_dict(tiny_overrides(corpus, tmp_path, memory=memory))
