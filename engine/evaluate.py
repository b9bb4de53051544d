"""`engine eval`: score trained models on a test file, side by side.

Language models: token-weighted cross-entropy and perplexity, the data tokenized exactly as training does it
(`data.mode` packed or line_by_line, `data.block_size`, text or JSONL), each model with its own tokenizer.
Classifiers: loss, accuracy, macro F1 and per-class F1 on a labelled CSV/JSONL, labels matched to the model's
own id2label. Given several models (e.g. the base and the fine-tuned one) it prints one comparison table.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import get_args

import torch

from engine.config import DataConfig
from engine.errors import ConfigError, EngineError


def eval_line(ev: dict, prefix: str = "val") -> str:
    """One human line of an eval's results (language model or classifier)."""
    if f"{prefix}_accuracy" in ev:
        return (f"{prefix}_loss {ev[f'{prefix}_loss']:.4f} accuracy {ev[f'{prefix}_accuracy']:.4f} "
                f"macro-F1 {ev[f'{prefix}_macro_f1']:.4f}")
    return f"{prefix}_loss {ev[f'{prefix}_loss']:.4f} perplexity {ev[f'{prefix}_ppl']:.2f}"


class LocalRunner:
    """The part of a backend the eval functions use, for one model on one device (no ranks)."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device

    def autocast(self):
        return contextlib.nullcontext()

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t


# ----------------------------------------------------------------------------- scoring one model


@torch.no_grad()
def lm_scores(trained, file: Path, dcfg: DataConfig, batch_size: int, max_batches: int | None) -> dict:
    from engine.data import build_split, eval_batches
    from engine.loss import lm_loss_sum

    if dcfg.block_size > trained.context:
        raise ConfigError(f"--block-size {dcfg.block_size} exceeds the context of {trained.source} ({trained.context} tokens)")
    split = build_split("test", file, trained.tokenizer, dcfg)
    runner = LocalRunner(trained.model)
    total = torch.zeros((), dtype=torch.float64)
    n = torch.zeros((), dtype=torch.float64)
    for b in eval_batches(split, batch_size, trained.tokenizer.pad_token_id, max_batches):
        s, k = lm_loss_sum(trained.model, runner.to_device(b))
        total += s.double().cpu()
        n += k.double().cpu()
    loss = float(total / n)
    return {"tokens": int(n), "loss": loss, "perplexity": math.exp(min(loss, 50))}


def classifier_scores(trained, file: Path, dcfg: DataConfig, batch_size: int, max_batches: int | None) -> dict:
    from engine.classify import collate_classification, evaluate_classifier, label_ids, read_labelled

    names = [trained.model.config.id2label[i] for i in range(trained.model.config.num_labels)]
    rows = read_labelled(file, dcfg.format, dcfg.text_field, dcfg.label_field)
    y = label_ids(rows, names, str(file), f"{trained.source}'s labels")
    ids = trained.tokenizer([t for t, _ in rows], add_special_tokens=False, truncation=True,
                            max_length=min(dcfg.block_size, trained.context))["input_ids"]
    examples = list(zip(ids, y))
    pad = trained.model.config.pad_token_id
    batches = [collate_classification(examples[i : i + batch_size], pad) for i in range(0, len(examples), batch_size)]
    batches = batches[:max_batches] if max_batches else batches
    m = evaluate_classifier(LocalRunner(trained.model), batches, None, names, "test")
    return {"examples": m["test_examples"], "loss": m["test_loss"], "accuracy": m["test_accuracy"],
            "macro_f1": m["test_macro_f1"], **{k.removeprefix("test_"): v for k, v in m.items() if k.startswith("test_f1_")}}


# ----------------------------------------------------------------------------- engine eval

_DATA_FLAGS = {  # DataConfig field -> flag; the help is the schema's description
    "mode": ("--mode", {"choices": get_args(DataConfig.model_fields["mode"].annotation)}),
    "block_size": ("--block-size", {"type": int, "metavar": "N"}),
    "format": ("--format", {"choices": get_args(DataConfig.model_fields["format"].annotation)}),
    "text_field": ("--text-field", {"metavar": "NAME"}),
    "label_field": ("--label-field", {"metavar": "NAME"}),
}


def add_eval_args(p) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="one or more run folders, exported model folders or LoRA adapter folders; several are compared "
                        "in one table (the first is the reference, e.g. the base model)")
    p.add_argument("--file", "-f", metavar="FILE",
                   help="test data (default: the shipped test split - the sample corpus for language models, the "
                        "sentiment set for classifiers)")
    fields = DataConfig.model_fields
    for name, (flag, kw) in _DATA_FLAGS.items():
        default = "the smallest context of the models, at most 1024" if name == "block_size" else repr(fields[name].default)
        p.add_argument(flag, dest=name, default=None, help=f"{fields[name].description} (default {default})", **kw)
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="sequences per forward pass (default 8)")
    p.add_argument("--max-batches", type=int, default=None, metavar="N", help="score only the first N batches")
    p.add_argument("--output", "-o", choices=("text", "jsonl"), default="text",
                   help="text: a table; jsonl: one object per model")
    p.add_argument("--base", metavar="MODEL", help="base model for LoRA adapters (default: the one recorded with each)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")


def _data_config(args, contexts: list[int]) -> DataConfig:
    from pydantic import ValidationError

    given = {k: getattr(args, k) for k in _DATA_FLAGS if getattr(args, k) is not None}
    given.setdefault("block_size", min([*contexts, 1024]))
    try:
        return DataConfig.model_validate(given)
    except ValidationError as e:
        err = e.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        raise ConfigError(f"{_DATA_FLAGS.get(key, (key,))[0]}: {err['msg']}") from None


def run_eval_cli(args) -> int:
    from engine.artifacts import load_trained
    from engine.classify import SAMPLE_SENTIMENT
    from engine.data import SAMPLE_CORPUS

    if args.batch_size < 1 or (args.max_batches is not None and args.max_batches < 1):
        raise EngineError("--batch-size and --max-batches must be at least 1")
    models = [load_trained(m, None, base=args.base, device=args.device) for m in args.models]
    tasks = {t.task for t in models}
    if len(tasks) > 1:
        raise EngineError("cannot compare a language model with a classifier: evaluate them separately")
    task = tasks.pop()
    dcfg = _data_config(args, [t.context for t in models])
    file = Path(args.file) if args.file else (SAMPLE_SENTIMENT["test"] if task == "classification" else SAMPLE_CORPUS["test"])
    score = classifier_scores if task == "classification" else lm_scores
    rows = []
    for name, t in zip(args.models, models):
        rows.append({"model": name, "source": t.source, **score(t, file, dcfg, args.batch_size, args.max_batches)})
    if args.output == "jsonl":
        for r in rows:
            print(json.dumps({"file": str(file), **r}))
        return 0
    print(format_table(rows, task, file, dcfg))
    return 0


def format_table(rows: list[dict], task: str, file: Path, dcfg: DataConfig) -> str:
    width = max(12, *(len(r["model"]) for r in rows))
    if task == "classification":
        labels = [k.removeprefix("f1_") for k in rows[0] if k.startswith("f1_")]
        head = (f"{'model':{width}s} {'examples':>9s} {'loss':>8s} {'accuracy':>9s} {'macro-F1':>9s}"
                + "".join(f" {'F1 ' + name:>{max(9, len(name) + 3)}s}" for name in labels))
        lines = [f"{r['model']:{width}s} {r['examples']:9,d} {r['loss']:8.4f} {r['accuracy']:9.4f} {r['macro_f1']:9.4f}"
                 + "".join(f" {r.get('f1_' + name, float('nan')):{max(9, len(name) + 3)}.4f}" for name in labels)
                 + (f"   {r['accuracy'] - rows[0]['accuracy']:+.4f} accuracy vs first" if i else "")
                 for i, r in enumerate(rows)]
        title = f"{file} ({task})"
    else:
        head = f"{'model':{width}s} {'tokens':>9s} {'loss':>8s} {'perplexity':>11s}"
        lines = [f"{r['model']:{width}s} {r['tokens']:9,d} {r['loss']:8.4f} {r['perplexity']:11.2f}"
                 + (f"   {r['loss'] - rows[0]['loss']:+.4f} loss, perplexity x{r['perplexity'] / rows[0]['perplexity']:.3f} "
                    "vs first" if i else "")
                 for i, r in enumerate(rows)]
        title = f"{file} ({dcfg.mode}, block_size {dcfg.block_size})"
    return "\n".join([title, head, "-" * len(head), *lines])
