"""Evaluation metrics of both tasks, computed the same way by a training run (every rank its share of the
batches, summed over ranks) and by `engine eval` (one model, one device).

`runner` is anything with `model`, `device`, `autocast()` and `all_reduce_sum(t)`: a backend, or `LocalRunner`.
"""

from __future__ import annotations

import contextlib
import math

import torch

from engine.loss import batch_loss_sum


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class LocalRunner:
    """The part of a backend the metrics use, for one model on one device (no ranks, no autocast)."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device

    def autocast(self):
        return contextlib.nullcontext()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t


def rank_share(batches: list, rank: int, world: int) -> tuple[list, list[float]]:
    """This rank's batches and their weights. Every rank must run the same number of forwards (ZeRO-3 gathers
    weights collectively), so short ranks repeat the first batch with weight 0."""
    mine = batches[rank::world]
    n_max = math.ceil(len(batches) / world)
    weights = [1.0] * len(mine) + [0.0] * (n_max - len(mine))
    return mine + [batches[0]] * (n_max - len(mine)), weights


@contextlib.contextmanager
def eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


@torch.no_grad()
def loss_sums(runner, batches: list[dict], weights: list[float] | None = None,
              chunk_size: int | None = None) -> tuple[float, float]:
    """Summed loss and loss-unit count over `batches` (tokens; examples for a classifier), reduced over ranks."""
    acc = torch.zeros(2, dtype=torch.float64, device=runner.device)
    with eval_mode(runner.model):
        for i, b in enumerate(batches):
            w = 1.0 if weights is None else weights[i]
            with runner.autocast():
                s, n = batch_loss_sum(runner.model, to_device(b, runner.device), chunk_size)
            acc += torch.stack([s.double() * w, n.double() * w])
    runner.all_reduce_sum(acc)
    return float(acc[0]), float(acc[1])


def lm_metrics(loss_sum: float, count: float, prefix: str = "val") -> dict:
    loss = loss_sum / max(count, 1)
    return {f"{prefix}_loss": loss, f"{prefix}_ppl": math.exp(min(loss, 50))}


def eval_line(ev: dict, prefix: str = "val") -> str:
    """One human line of an eval's results (language model or classifier)."""
    if f"{prefix}_accuracy" in ev:
        return (f"{prefix}_loss {ev[f'{prefix}_loss']:.4f} accuracy {ev[f'{prefix}_accuracy']:.4f} "
                f"macro-F1 {ev[f'{prefix}_macro_f1']:.4f}")
    return f"{prefix}_loss {ev[f'{prefix}_loss']:.4f} perplexity {ev[f'{prefix}_ppl']:.2f}"


def metrics_from_confusion(conf: torch.Tensor, labels: list[str], loss_sum: float, prefix: str) -> dict:
    """Loss, accuracy, macro F1 and per-class F1 from a [gold, predicted] count matrix.

    A class's F1 is 0 when it has neither gold nor predicted examples' overlap; the macro average is over the
    classes that occur (gold or predicted)."""
    conf = conf.double()
    n = float(conf.sum())
    tp = conf.diag()
    gold, pred = conf.sum(1), conf.sum(0)
    precision = torch.where(pred > 0, tp / pred.clamp(min=1e-12), torch.zeros_like(tp))
    recall = torch.where(gold > 0, tp / gold.clamp(min=1e-12), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), torch.zeros_like(tp))
    present = (gold + pred) > 0
    out = {
        f"{prefix}_loss": loss_sum / max(n, 1.0),
        f"{prefix}_accuracy": float(tp.sum()) / max(n, 1.0),
        f"{prefix}_macro_f1": float(f1[present].mean()) if bool(present.any()) else 0.0,
        f"{prefix}_examples": int(round(n)),
    }
    for name, v in zip(labels, f1.tolist()):
        out[f"{prefix}_f1_{name}"] = v
    return out


@torch.no_grad()
def evaluate_classifier(runner, batches: list[dict], weights: list[float] | None, labels: list[str],
                        prefix: str = "val") -> dict:
    """Classifier metrics over `batches` (each rank its share): confusion matrix and loss summed over ranks."""
    model = runner.model
    c = len(labels)
    conf = torch.zeros((c, c), dtype=torch.float64, device=runner.device)
    loss = torch.zeros(1, dtype=torch.float64, device=runner.device)
    with eval_mode(model):
        for i, b in enumerate(batches):
            w = 1.0 if weights is None else weights[i]
            b = to_device(b, runner.device)
            y = b["class_labels"]
            with runner.autocast():
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=y, use_cache=False)
            pred = out.logits.argmax(-1)
            conf.index_put_((y, pred), torch.full_like(y, w, dtype=torch.float64), accumulate=True)
            loss += out.loss.double() * y.shape[0] * w
    runner.all_reduce_sum(conf)
    runner.all_reduce_sum(loss)
    return metrics_from_confusion(conf.cpu(), labels, float(loss), prefix)
