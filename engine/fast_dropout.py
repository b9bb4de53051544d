"""`train.fast_dropout`: dropout whose masks cost a fraction of torch's on a CPU.

torch's CPU dropout draws each mask element with `bernoulli_` (about 5 ns per element on the 2-core Xeon: 0.48 s of
a 3.9 s gpt2 fp32 step, 12%, almost all of it attention's [batch x heads x seq x seq] masks). Here a mask is made
from the default generator's 64-bit words, `random_` filling int64 at about 0.7 ns per element, read as four
uniform 16-bit integers each: an element is kept when its integer is at least round(p * 65536), so the drop
probability is p rounded to a multiple of 1/65536 and the kept elements are scaled by the exact inverse of the keep
probability (unbiased, as torch's). Same generator as torch's dropout, so seeding, exact resume and checkpointing's
recompute (which restores the generator's state) see the same masks.

GPT-2 applies attention dropout inside SDPA, whose CPU math path draws its own `bernoulli_` masks and (with any
mask) runs a safe softmax (isneginf/all/where over the scores); the engine's attention ("engine_sdpa") is SDPA as
transformers calls it, except on a CPU with dropout, where it runs the math path itself: scores with the causal
mask added by the matmul (`baddbmm`), softmax, these masks, and the value matmul. Its saved tensors are those of the
math path (q, k, the probabilities, the 1-byte mask, the dropped probabilities, v), so the simulator, which runs the
engine's step, prices it as it runs.
"""

from __future__ import annotations

import torch
from torch import nn

ATTENTION = "engine_sdpa"  # the name the engine's attention and its mask function are registered under
_LEVELS = 65536  # a mask element's 16 bits


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool mask of `shape`, each element True with probability 1 - round(p * 65536) / 65536, from the default
    generator (1 byte per element kept; 2 more transient)."""
    n = 1
    for s in shape:
        n *= s
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)  # every bit random
    return words.view(torch.int16)[:n].view(shape) >= round(p * _LEVELS) - _LEVELS // 2


def drawn_here(p: float, device: torch.device) -> bool:
    """Whether dropout with `p` on `device` draws `keep_mask`'s masks: on a CPU, for p that rounds to a drop
    probability strictly between 0 and 1 (torch's dropout otherwise)."""
    return device.type == "cpu" and 0 < round(p * _LEVELS) < _LEVELS


def keep_scale(p: float) -> float:
    """The inverse of `keep_mask`'s keep probability: what kept elements are multiplied by."""
    return _LEVELS / (_LEVELS - round(p * _LEVELS))


def fast_dropout(x: torch.Tensor, p: float, training: bool = True, rescale: bool = True) -> torch.Tensor:
    """Dropout of `x` with `keep_mask`'s masks on a CPU (`F.dropout` elsewhere, and for p outside (0, 1)).
    `rescale=False` leaves the scaling to the caller (attention scales its smaller output instead)."""
    if not training or not drawn_here(p, x.device):
        out = nn.functional.dropout(x, p, training)
        return out if rescale or not training else out * (1.0 - p)  # (the caller scales by keep_scale's inverse)
    # A uint8 view of the bool mask: float x uint8 runs vectorized, float x bool does not (about 2x slower); autograd
    # keeps that 1-byte mask for backward, as torch's dropout keeps its bool one.
    out = x * keep_mask(x.shape, p, x.device).view(torch.uint8)
    return out.mul_(keep_scale(p)) if rescale else out


class FastDropout(nn.Dropout):
    """nn.Dropout drawing `keep_mask`'s masks (the same `p`, still an nn.Dropout for code that looks for one)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


def _causal_bias(t: int, s: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The additive causal mask [t, s]: made per call (a fraction of a millisecond), not cached, so a simulation's
    fake tensor never reaches a real step (the pre-flight simulates in the training process)."""
    return torch.full((t, s), torch.finfo(dtype).min, dtype=dtype, device=device).triu_(s - t + 1)


def engine_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                     **kwargs):
    """transformers' SDPA attention, except with dropout on a CPU: the math path with `keep_mask`'s masks.
    Fully masked rows (left padding) get a uniform row instead of NaN: the additive mask is dtype-min, not -inf."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if not drawn_here(dropout, query.device):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    b, h, t, d = query.shape
    s = key.shape[2]
    scaling = d**-0.5 if scaling is None else scaling
    if is_causal is None:
        is_causal = t > 1 and attention_mask is None and getattr(module, "is_causal", True)
    dtype = query.dtype
    if attention_mask is not None:  # sdpa_mask's bool mask (True: attend), or an additive float one
        bias = (torch.zeros(attention_mask.shape, dtype=dtype, device=query.device)
                .masked_fill_(~attention_mask, torch.finfo(dtype).min) if attention_mask.dtype == torch.bool
                else attention_mask.to(dtype))
        bias = bias.expand(b, h, t, s).reshape(b * h, t, s)
    else:
        bias = _causal_bias(t, s, dtype, query.device) if is_causal else None
    q, k = query.reshape(b * h, t, d), key.reshape(b * h, s, d).transpose(1, 2)
    # The mask is added by the matmul itself (baddbmm writes it into the scores' buffer first): no extra pass.
    scores = torch.baddbmm(bias, q, k, alpha=scaling) if bias is not None else torch.bmm(q, k).mul_(scaling)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    probs = fast_dropout(probs, dropout, rescale=False)
    # The keep scale on the [b*h, t, d] output rather than the [b*h, t, s] probabilities: one small pass.
    out = torch.bmm(probs, value.reshape(b * h, s, d)).mul_(keep_scale(dropout))
    return out.view(b, h, t, d).transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Register `engine_attention` with transformers (and SDPA's mask function under the same name)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION, engine_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every nn.Dropout of `model` for FastDropout and its attention for `engine_attention` (an SDPA model's
    only); returns how many dropout modules were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, FastDropout(child.p, child.inplace))
                swapped += 1
    config = getattr(model, "config", None)
    if config is not None and config._attn_implementation == "sdpa":
        config._attn_implementation = register_attention()
    return swapped
