"""Causal-LM loss as (sum, token count), so accumulation and eval weight every real token equally.

The LM head is GPT-2's largest activation: one 1024-token sequence has 1024 x 50257 logits
(196 MiB in fp32, plus the fp32 upcast and its gradient when training in 16-bit). With
`loss_chunk_size` the logits are computed and consumed a chunk at a time and recomputed in
backward, so only one chunk's logits ever exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from engine.model import unwrap

IGNORE_INDEX = -100  # label of a position that is not a loss token (padding, a masked prompt)
# The deferred head gradient is added into the embedding's gradient this many elements of rows at a time (32 MiB of
# fp32): a whole vocab x hidden product at once would be a second embedding-sized tensor at the step's peak
# (Qwen2.5-1.5B: 0.43 GiB in bf16 beside its 0.43 GiB gradient).
HEAD_GRAD_BLOCK = 2**23


def _ce_sum(lm_head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # fp32 log-softmax: 16-bit logits over 50k classes lose precision in the normaliser.
    return F.cross_entropy(lm_head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def _ce_sum_and_grad(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_ce_sum` of fp32 `logits` [tokens, vocab] and its gradient with respect to them (softmax - one-hot; zero rows
    for ignored labels), the gradient made in place in `logits`' own storage. Autograd's log-softmax, nll backward
    and log-softmax backward would allocate three more logits-sized buffers (100 MiB each for 512 tokens in fp32),
    and page-faulting fresh buffers that size costs as much as computing them on a CPU; here no logits-sized
    buffer is allocated, and the chunk's loss and gradient take 0.31 s instead of 0.39 s (gpt2's head, 512 tokens,
    the 2-core Xeon). The same max-shifted normaliser as log_softmax's."""
    valid = labels != IGNORE_INDEX
    target = labels.clamp_min(0).unsqueeze(1)
    x = logits
    x.sub_(x.amax(-1, keepdim=True))
    shifted_target = x.gather(1, target).squeeze(1)
    x.exp_()
    norm = x.sum(-1, keepdim=True)
    loss = ((norm.squeeze(1).log() - shifted_target) * valid).sum()
    x.div_(norm.masked_fill_(~valid.unsqueeze(1), torch.inf))  # ignored rows: 0 (no data-dependent branch)
    x.scatter_add_(1, target, -valid.to(x.dtype).unsqueeze(1))
    return loss, x


class FusedHeadLoss(torch.autograd.Function):
    """`memory.fused_head_loss`: the unchunked LM head's summed cross-entropy, its logits' gradient made in the
    forward, in place in the logits' storage (`_ce_sum_and_grad`), and kept for backward instead of the log-softmax
    output; backward is then the head's two matmuls. Autograd's path allocates the log-softmax output, the nll
    gradient and the log-softmax gradient ([tokens x vocab] each) and reads them in two more passes."""

    @staticmethod
    def applies_to(lm) -> bool:
        """A plain linear head (not LoRA-wrapped or quantized: their forwards are more than `F.linear`), outside
        fp16 autocast (there the unscaled logits' gradient could underflow when cast to fp16 before the loss scale
        reaches it in backward)."""
        head = lm.get_output_embeddings()
        fp16 = torch.is_autocast_enabled(head.weight.device.type) and (
            torch.get_autocast_dtype(head.weight.device.type) == torch.float16)
        return type(head) is torch.nn.Linear and not fp16

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels):
        logits = F.linear(hidden, weight, bias)  # the compute dtype under autocast, as the module's forward
        dtype, logits = logits.dtype, logits.float()  # 16-bit logits freed once cast (a no-op in fp32)
        loss, grad = _ce_sum_and_grad(logits, labels)
        ctx.save_for_backward(hidden, weight)
        # Not a saved tensor: backward drops it before the weight gradient is cast to the weight's dtype (a saved
        # one would live until the whole node is done, casts included: one more [tokens x vocab] at the head).
        ctx.grad_logits = grad.to(dtype)  # in fp32 the logits' own storage
        return loss

    @staticmethod
    def backward(ctx, grad):
        hidden, weight = ctx.saved_tensors
        grad_logits = ctx.grad_logits
        del ctx.grad_logits
        # Scale the [tokens x hidden] results, not the [tokens x vocab] gradient (one fewer pass over it).
        scale = grad.to(grad_logits.dtype)
        grad_hidden = None
        if ctx.needs_input_grad[0] and weight.dtype == grad_logits.dtype:
            grad_hidden = (grad_logits @ weight).mul_(scale)
        elif ctx.needs_input_grad[0]:  # 16-bit compute: cast the weight a block of rows at a time (HEAD_GRAD_BLOCK),
            # not whole (vocab x hidden, beside everything backward holds at the head)
            grad_hidden = hidden.new_zeros(hidden.shape, dtype=grad_logits.dtype)
            rows = max(1, HEAD_GRAD_BLOCK // weight.shape[1])
            for r in range(0, weight.shape[0], rows):
                grad_hidden.addmm_(grad_logits[:, r : r + rows], weight[r : r + rows].to(grad_logits.dtype))
            grad_hidden.mul_(scale)
        grad_weight = grad_logits.t() @ (hidden.to(grad_logits.dtype) * scale) if ctx.needs_input_grad[1] else None
        grad_bias = grad_logits.sum(0) * scale if ctx.needs_input_grad[2] else None
        del grad_logits
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)  # (what autograd would cast it to, after the line above)
        return grad_hidden, grad_weight, grad_bias, None


@dataclass
class _AutocastState:
    device: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def now(cls, device: str) -> _AutocastState:
        return cls(device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

    def enter(self):
        return torch.autocast(self.device, dtype=self.dtype, enabled=self.enabled, cache_enabled=False)


class DeferredHeadWeightGrad:
    """The tied LM head's weight gradient, made at the end of backward instead of at its start.

    GPT-2's head shares its weight with the token embedding, whose own gradient comes last in backward. Left to
    autograd, the head's contribution (vocab x hidden: 153 MiB in bf16 for gpt2-xl, 307 MiB in fp32) waits in the
    weight's input buffer from the head's backward to the embedding's, on top of every block's backward peak.
    Deferred, only each chunk's hidden states (tokens x hidden) and loss gradient wait; a hook on the weight, which
    runs just before the summed gradient is accumulated (and an in-backward optimizer steps), recomputes each
    chunk's logits (one more head forward) and adds the chunk's weight gradient. Same sum, other order: equal up to
    rounding (tests/test_training.py).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias
        self.autocast = _AutocastState.now(weight.device.type)  # the forward's, for the recomputations
        self.chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.handle = None

    @staticmethod
    def applies_to(lm) -> bool:
        """Only a trained head tied to the embedding (then the embedding's backward always runs after the head's),
        without a bias (whose gradient this path does not make)."""
        head = lm.get_output_embeddings()
        return head.weight.requires_grad and head.weight is lm.get_input_embeddings().weight and head.bias is None

    def loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _HeadLossWithDeferredWeightGrad.apply(hidden, labels, self)

    def head(self, weight: torch.Tensor):
        return lambda x: F.linear(x, weight, self.bias)

    def logits_grad(self, weight: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor,
                    scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk's summed loss and its logits' gradient (times `scale`, the loss's incoming gradient), the
        gradient cast to the dtype the head computed in - what autograd's backward through `.float()` passes on."""
        logits = F.linear(hidden, weight, self.bias)
        loss, grad = _ce_sum_and_grad(logits.float(), labels)
        if scale is not None:
            grad.mul_(scale)
        return loss, grad.to(logits.dtype)

    def wait(self, hidden, labels, grad) -> None:
        # Registered from backward, so a forward that never backpropagates leaves no hook behind.
        self.chunks.append((hidden, labels, grad))
        if self.handle is None:
            self.handle = self.weight.register_hook(self._add_head_grad)

    def _add_head_grad(self, grad: torch.Tensor) -> torch.Tensor:
        self.handle.remove()
        grad = grad.clone() if grad._base is not None else grad  # our own buffer from here on
        autocast = self.autocast
        # One cast of the weight to the compute dtype for all chunks (autocast would cast it per chunk); each chunk's
        # 16-bit weight gradient is added into the full-precision sum as autograd's cast-backward would pass it.
        w = self.weight.detach()
        w = w.to(autocast.dtype) if autocast.enabled and w.dtype != autocast.dtype else w
        rows = max(1, HEAD_GRAD_BLOCK // grad.shape[1])
        with autocast.enter():
            for hidden, labels, g in self.chunks:
                grad_logits = self.logits_grad(w, hidden, labels, g)[1]
                h = hidden.to(grad_logits.dtype)
                # The head's weight gradient, grad_logits^T @ hidden, in the compute dtype as autograd's would be;
                # added into the embedding's gradient buffer, which nothing else reads before accumulation, a block
                # of rows at a time (HEAD_GRAD_BLOCK).
                for r in range(0, grad.shape[0], rows):
                    grad[r : r + rows].add_(torch.mm(grad_logits[:, r : r + rows].t(), h))
                del grad_logits, h
        self.chunks.clear()
        return grad


class _HeadLossWithDeferredWeightGrad(torch.autograd.Function):
    """One chunk's summed cross-entropy; backward gives the hidden states' gradient and hands the head weight's to
    `DeferredHeadWeightGrad` (the weight is not an input, so autograd routes nothing to it from here).

    The hidden states' gradient of the chunk's loss is made in the forward, while its logits exist anyway (tokens x
    hidden kept, not tokens x vocab), and scaled by the incoming gradient in backward: the chunk's head then runs
    twice per step (here and for the weight gradient at the end of backward) instead of three times (one head
    matmul of four saved, and one log-softmax). Under fp16 autocast the unscaled gradient could underflow in the
    fp16 matmul, so there the loss scale is applied first, in backward, as autograd would."""

    @staticmethod
    def forward(ctx, hidden, labels, deferred: DeferredHeadWeightGrad):
        ctx.deferred = deferred
        w = deferred.weight.detach()  # (autocast is the caller's: the head and the matmul below run in its dtype)
        ctx.in_forward = not (deferred.autocast.enabled and deferred.autocast.dtype == torch.float16)
        if not ctx.in_forward:
            ctx.save_for_backward(hidden, labels)
            return _ce_sum(deferred.head(w), hidden, labels)
        loss, grad_logits = deferred.logits_grad(w, hidden, labels)
        ctx.save_for_backward(hidden, labels, grad_logits @ w)
        return loss

    @staticmethod
    def backward(ctx, grad):
        hidden, labels, *made = ctx.saved_tensors
        if ctx.in_forward:
            grad_hidden = made[0] * grad
        else:
            w = ctx.deferred.weight.detach()
            with ctx.deferred.autocast.enter():
                grad_hidden = ctx.deferred.logits_grad(w, hidden, labels, grad)[1] @ w
        ctx.deferred.wait(hidden.detach(), labels, grad.detach())
        return grad_hidden, None, None


def lm_loss_sum(model, batch: dict[str, torch.Tensor], chunk_size: int | None = None,
                defer_head_grad: bool = False, fused_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss and its token count. With `chunk_size`, the head runs `chunk_size` tokens at a time;
    with `defer_head_grad` too (the in-backward step, which frees gradients as they come; a single process: it hooks
    the weight itself), the tied head's weight gradient is made at the end of backward (`DeferredHeadWeightGrad`).
    With `fused_head` (unchunked, training), the head's loss and logits' gradient in one pass (`FusedHeadLoss`)."""
    mask = batch.get("attention_mask")  # absent for packed data: SDPA then keeps its causal fast path
    # Shift the labels, not the logits: `logits[:, :-1]` would copy the whole [B, S, vocab] tensor
    # (196 MiB per 1024 tokens in fp32) at the step's peak. The last position predicts nothing.
    labels = batch["labels"]
    y = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1).reshape(-1)
    n_tokens = (y != IGNORE_INDEX).sum()
    lm = unwrap(model, through_peft=True)  # the transformers causal LM (LoRA layers stay inside it)
    if not chunk_size and fused_head and torch.is_grad_enabled() and FusedHeadLoss.applies_to(lm):
        hidden = lm.base_model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).last_hidden_state
        head = lm.get_output_embeddings()
        return FusedHeadLoss.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, y), n_tokens
    if not chunk_size:
        logits = model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).logits
        return _ce_sum(torch.nn.Identity(), logits.view(-1, logits.shape[-1]), y), n_tokens
    # Its body (GPT-2's transformer, Llama's model, GPT-NeoX's gpt_neox) ends with the final norm; the head is apart.
    hidden = lm.base_model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).last_hidden_state
    h = hidden.view(-1, hidden.shape[-1])
    total = hidden.new_zeros((), dtype=torch.float32)
    head = lm.get_output_embeddings()
    deferred = (DeferredHeadWeightGrad(head.weight, head.bias)
                if defer_head_grad and torch.is_grad_enabled() and DeferredHeadWeightGrad.applies_to(lm) else None)
    for i in range(0, h.shape[0], chunk_size):
        if deferred is not None:
            total = total + deferred.loss_sum(h[i : i + chunk_size], y[i : i + chunk_size])
        elif torch.is_grad_enabled():
            total = total + checkpoint(_ce_sum, head, h[i : i + chunk_size], y[i : i + chunk_size], use_reentrant=False)
        else:
            total = total + _ce_sum(head, h[i : i + chunk_size], y[i : i + chunk_size])
    return total, n_tokens


def classification_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequence classifier's own cross-entropy on the logits of each sequence's last non-pad token (found
    through config.pad_token_id), as a sum over examples: the example is the loss unit (`n_tokens` = batch size)."""
    y = batch["class_labels"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=y, use_cache=False)
    n = y.new_tensor(y.shape[0])
    return out.loss.float() * n, n


def batch_loss_sum(model, batch: dict[str, torch.Tensor], chunk_size: int | None = None,
                   defer_head_grad: bool = False, fused_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss of a batch as (sum, count): classification batches carry `class_labels`."""
    if "class_labels" in batch:
        return classification_loss_sum(model, batch)
    return lm_loss_sum(model, batch, chunk_size, defer_head_grad, fused_head)
