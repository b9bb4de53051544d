"""Causal-LM loss as (sum, token count), so accumulation and eval weight every real token equally."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.data import IGNORE_INDEX


def lm_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    mask = batch.get("attention_mask")
    # An all-ones mask adds nothing but can push SDPA off its causal fast path: pass None for packed data.
    if mask is not None and bool(mask.all()):
        mask = None
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).logits
    labels = batch["labels"][:, 1:]
    # fp32 log-softmax: 16-bit logits over 50k classes lose precision in the normaliser.
    loss_sum = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return loss_sum, (labels != IGNORE_INDEX).sum()
