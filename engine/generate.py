"""Text generation from an exported model (KV cache on)."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config import SampleConfig


def sample_text(model_dir: Path, sample: SampleConfig, seed: int = 0) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = tok(sample.prompt, return_tensors="pt").input_ids
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=sample.max_new_tokens,
            do_sample=True,
            temperature=sample.temperature,
            top_k=sample.top_k or None,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            use_cache=True,
        )
    return tok.decode(out[0], skip_special_tokens=True)
