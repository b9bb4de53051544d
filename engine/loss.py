"""Causal-LM loss as (sum, token count), so accumulation and eval weight every real token equally.

The LM head is GPT-2's largest activation: one 1024-token sequence has 1024 x 50257 logits
(196 MiB in fp32, plus the fp32 upcast and its gradient when training in 16-bit). With
`loss_chunk_size` the logits are computed and consumed a chunk at a time and recomputed in
backward, so only one chunk's logits ever exist.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from engine.model import unwrap

IGNORE_INDEX = -100  # label of a position that is not a loss token (padding, a masked prompt)


def _ce_sum(lm_head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # fp32 log-softmax: 16-bit logits over 50k classes lose precision in the normaliser.
    return F.cross_entropy(lm_head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def lm_loss_sum(model, batch: dict[str, torch.Tensor], chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    mask = batch.get("attention_mask")  # absent for packed data: SDPA then keeps its causal fast path
    # Shift the labels, not the logits: `logits[:, :-1]` would copy the whole [B, S, vocab] tensor
    # (196 MiB per 1024 tokens in fp32) at the step's peak. The last position predicts nothing.
    labels = batch["labels"]
    y = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1).reshape(-1)
    n_tokens = (y != IGNORE_INDEX).sum()
    if not chunk_size:
        logits = model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).logits
        return _ce_sum(torch.nn.Identity(), logits.view(-1, logits.shape[-1]), y), n_tokens
    lm = unwrap(model, through_peft=True)  # GPT2LMHeadModel (LoRA layers stay inside it)
    hidden = lm.transformer(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).last_hidden_state
    h = hidden.view(-1, hidden.shape[-1])
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk_size):
        if torch.is_grad_enabled():
            total = total + checkpoint(_ce_sum, lm.lm_head, h[i : i + chunk_size], y[i : i + chunk_size], use_reentrant=False)
        else:
            total = total + _ce_sum(lm.lm_head, h[i : i + chunk_size], y[i : i + chunk_size])
    return total, n_tokens


def classification_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT2ForSequenceClassification's own cross-entropy on the logits of each sequence's last non-pad token (found
    through config.pad_token_id), as a sum over examples: the example is the loss unit (`n_tokens` = batch size)."""
    y = batch["class_labels"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=y, use_cache=False)
    n = y.new_tensor(y.shape[0])
    return out.loss.float() * n, n


def batch_loss_sum(model, batch: dict[str, torch.Tensor], chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss of a batch as (sum, count): classification batches carry `class_labels`."""
    if "class_labels" in batch:
        return classification_loss_sum(model, batch)
    return lm_loss_sum(model, batch, chunk_size)
