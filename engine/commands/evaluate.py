"""`engine eval`: score trained models on a test file, side by side (engine/evaluate.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

from pydantic import ValidationError

from engine.artifacts import load_trained
from engine.config import DataConfig
from engine.errors import ConfigError, EngineError
from engine.evaluate import classifier_scores, format_table, lm_scores
from engine.records import SAMPLE_CORPUS, SAMPLE_SENTIMENT

NAME = "eval"
HELP = ('loss and perplexity (classifiers: accuracy and F1) of one or more trained models on a test file, as '
        'a comparison table')


_DATA_FLAGS = {  # DataConfig field -> flag; the help is the schema's description
    "mode": ("--mode", {"choices": get_args(DataConfig.model_fields["mode"].annotation)}),
    "block_size": ("--block-size", {"type": int, "metavar": "N"}),
    "format": ("--format", {"choices": get_args(DataConfig.model_fields["format"].annotation)}),
    "text_field": ("--text-field", {"metavar": "NAME"}),
    "label_field": ("--label-field", {"metavar": "NAME"}),
}


def add_arguments(p) -> None:
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
    given = {k: getattr(args, k) for k in _DATA_FLAGS if getattr(args, k) is not None}
    given.setdefault("block_size", min([*contexts, 1024]))
    try:
        return DataConfig.model_validate(given)
    except ValidationError as e:
        err = e.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        raise ConfigError(f"{_DATA_FLAGS.get(key, (key,))[0]}: {err['msg']}") from None


def run(args) -> int:
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


