"""Scoring trained models on a test file, side by side (`engine eval`) on a test file, side by side.

Language models: token-weighted cross-entropy and perplexity, the data tokenized exactly as training does it
(`data.mode` packed or line_by_line, `data.block_size`, text or JSONL), each model with its own tokenizer.
Classifiers: loss, accuracy, macro F1 and per-class F1 on a labelled CSV/JSONL, labels matched to the model's
own id2label. Given several models (e.g. the base and the fine-tuned one) it prints one comparison table.
"""

from __future__ import annotations

from pathlib import Path

from engine.classification import encode
from engine.config import DataConfig
from engine.data import build_split, collate, eval_batches
from engine.errors import ConfigError
from engine.metrics import LocalRunner, evaluate_classifier, lm_metrics, loss_sums
from engine.records import read_records


def lm_scores(trained, file: Path, dcfg: DataConfig, batch_size: int, max_batches: int | None) -> dict:
    if dcfg.block_size > trained.context:
        raise ConfigError(f"--block-size {dcfg.block_size} exceeds the context of {trained.source} ({trained.context} tokens)")
    split = build_split("test", file, trained.tokenizer, dcfg)
    batches = eval_batches(split, batch_size, trained.tokenizer.pad_token_id, max_batches)
    total, n = loss_sums(LocalRunner(trained.model), batches)
    m = lm_metrics(total, n, "test")
    return {"tokens": int(n), "loss": m["test_loss"], "perplexity": m["test_ppl"]}


def classifier_scores(trained, file: Path, dcfg: DataConfig, batch_size: int, max_batches: int | None) -> dict:
    names = [trained.model.config.id2label[i] for i in range(trained.model.config.num_labels)]
    rows = read_records(file, dcfg.format, dcfg.text_field, dcfg.label_field)
    examples = encode(trained.tokenizer, rows, names, min(dcfg.block_size, trained.context), str(file),
                      f"{trained.source}'s labels")
    pad = trained.model.config.pad_token_id
    batches = [collate(examples[i : i + batch_size], pad, "classification") for i in range(0, len(examples), batch_size)]
    batches = batches[:max_batches] if max_batches else batches
    m = evaluate_classifier(LocalRunner(trained.model), batches, None, names, "test")
    return {"examples": m["test_examples"], "loss": m["test_loss"], "accuracy": m["test_accuracy"],
            "macro_f1": m["test_macro_f1"], **{k.removeprefix("test_"): v for k, v in m.items() if k.startswith("test_f1_")}}


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
