"""Sequence classification (`task: classification`): labelled CSV/JSONL -> examples, metrics, `engine classify`.

The model is transformers' GPT2ForSequenceClassification (built in `engine/model.py`): it scores the hidden
state of each sequence's last non-pad token, found through `config.pad_token_id`, so batches are right-padded
and the pad token never ends a real text (no EOS is appended). Examples are `(token ids, label id)` pairs in a
`TokenizedSplit` of mode "classification", so the step sampler, both backends (and with them ZeRO, offload,
checkpointing, 8-bit optimizers, LoRA) run classification exactly as they run language modelling; only the
loss (`engine.loss.classification_loss_sum`, the model's own cross-entropy) and the eval metrics differ.

Label names are taken from `classification.labels` or, unset, the sorted distinct labels of the train file, and
go into the exported model's config as id2label/label2id, so a `transformers` pipeline shows them.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from engine.data import ASSETS, TokenizedSplit, _file_format, read_text_file
from engine.errors import DataError, EngineError

SAMPLE_SENTIMENT = {"train": ASSETS / "sentiment" / "train.csv", "validation": ASSETS / "sentiment" / "valid.csv",
                    "test": ASSETS / "sentiment" / "test.csv"}


# ----------------------------------------------------------------------------- reading labelled files


def _label_str(value, where: str, label_field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: label {label_field!r} must be a string or an integer, got {value!r}")
    value = str(value).strip()
    if not value:
        raise DataError(f"{where}: empty label in {label_field!r}")
    return value


def read_labelled(path: str | Path, fmt: str = "auto", text_field: str = "text", label_field: str = "label",
                  require_labels: bool = True) -> list[tuple[str, str | None]]:
    """(text, label) rows of a CSV (header row names the columns) or JSONL file; labels as strings.

    With `require_labels=False` (labelling new text) a missing label column is allowed and labels are None."""
    p = Path(path)
    kind = _file_format(p, fmt)
    text = read_text_file(p)
    rows: list[tuple[str, str | None]] = []
    if kind == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        cols = reader.fieldnames or []
        missing = [f for f in (text_field, label_field if require_labels else None) if f and f not in cols]
        if missing:
            raise DataError(f"{p}: no column {missing[0]!r} in the header ({', '.join(cols)}); set data.text_field / "
                            "data.label_field")
        for i, r in enumerate(reader, 2):
            where = f"{p} line {i}"
            if None in r:
                raise DataError(f"{where}: more fields than the header has (quote texts that contain commas)")
            t = r.get(text_field)
            if t is None or not t.strip():
                raise DataError(f"{where}: empty text")
            lab = r.get(label_field)
            rows.append((t, _label_str(lab, where, label_field) if (require_labels or lab) else None))
    elif kind == "jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{p} line {i}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or text_field not in obj:
                raise DataError(f"{where}: no {text_field!r} field (set data.text_field)")
            if require_labels and label_field not in obj:
                raise DataError(f"{where}: no {label_field!r} field (set data.label_field)")
            t = obj[text_field]
            if not isinstance(t, str) or not t.strip():
                raise DataError(f"{where}: field {text_field!r} is empty or not a string")
            lab = obj.get(label_field)
            rows.append((t, _label_str(lab, where, label_field) if (require_labels or lab is not None) else None))
    else:
        if require_labels:
            raise DataError(f"{p}: labelled data must be CSV or JSONL (.csv/.jsonl, or set data.format)")
        rows = [(line, None) for line in text.splitlines() if line.strip()]
    if not rows:
        raise DataError(f"data file has no rows: {p}")
    return rows


# ----------------------------------------------------------------------------- labels


def _is_int(s: str) -> bool:
    return s.lstrip("-").isdigit()


def label_names_from(labels: list[str]) -> list[str]:
    """Distinct labels sorted (numerically when all are integers)."""
    distinct = set(labels)
    if all(_is_int(x) for x in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def label_ids(rows: list[tuple[str, str | None]], names: list[str], where: str, origin: str) -> list[int]:
    """Map labels to ids: a label is one of `names` or, when it is not, an integer id into them (IMDB's 0/1)."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for text, lab in rows:
        if lab in index:
            out.append(index[lab])
        elif _is_int(lab) and 0 <= int(lab) < len(names):
            out.append(int(lab))
        else:
            raise DataError(f"{where}: label {lab!r} is not one of {origin} ({', '.join(names)})")
    return out


# ----------------------------------------------------------------------------- splits


def load_classification_splits(cfg, tok) -> tuple[dict[str, TokenizedSplit], list[str]]:
    """train / validation (/ test) splits of (ids, label id) pairs, and the label names in id order.

    Files: data.train_file / validation_file / test_file, or the shipped sentiment set when train_file is unset.
    Texts longer than data.block_size tokens keep their first block_size tokens."""
    d = cfg.data
    train_path = Path(d.train_file) if d.train_file else SAMPLE_SENTIMENT["train"]
    val_path = Path(d.validation_file) if d.validation_file else (SAMPLE_SENTIMENT["validation"] if not d.train_file else None)
    test_path = Path(d.test_file) if d.test_file else None
    read = lambda p: read_labelled(p, d.format, d.text_field, d.label_field)  # noqa: E731
    files = {"train": (train_path, read(train_path))}
    if val_path is not None:
        files["validation"] = (val_path, read(val_path))
    if test_path is not None:
        files["test"] = (test_path, read(test_path))
    if "validation" not in files and d.validation_split > 0:
        rows = files["train"][1]
        n_val = max(1, int(len(rows) * d.validation_split))
        if n_val >= len(rows):
            raise DataError(f"{train_path} has {len(rows)} rows: too few to hold out data.validation_split")
        files["train"], files["validation"] = (train_path, rows[:-n_val]), (train_path, rows[-n_val:])

    if cfg.classification.labels:
        names, origin = list(cfg.classification.labels), "classification.labels"
    else:
        names, origin = label_names_from([lab for _, lab in files["train"][1]]), f"the labels of the train file {train_path}"
        if len(names) < 2:
            raise DataError(f"{train_path}: every row has the label {names[0]!r}; classification needs at least two labels")
    splits = {}
    for name, (path, rows) in files.items():
        ids = tok([t for t, _ in rows], add_special_tokens=False, truncation=True, max_length=d.block_size)["input_ids"]
        y = label_ids(rows, names, str(path), origin)
        examples = [(x, c) for x, c in zip(ids, y) if x]
        if len(examples) < len(rows):
            raise DataError(f"{path}: {len(rows) - len(examples)} texts give no tokens")
        splits[name] = TokenizedSplit(name, "classification", examples, sum(len(x) for x, _ in examples))
    return splits, names


def collate_classification(examples: list[tuple[list[int], int]], pad_id: int) -> dict:
    """Right-padded ids + attention mask + class labels; `n_tokens` is the number of examples (the loss unit)."""
    width = max(len(x) for x, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, _) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    y = torch.tensor([c for _, c in examples], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "class_labels": y, "n_tokens": len(examples)}


# ----------------------------------------------------------------------------- metrics


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
    """Metrics over `batches` (each rank its share; zero-weight repeats keep ZeRO-3's collective forwards in step).

    `runner` is a backend (model, autocast, to_device, all_reduce_sum): the confusion matrix and loss are summed
    over ranks."""
    model = runner.model
    was_training = model.training
    model.eval()
    c = len(labels)
    conf = torch.zeros((c, c), dtype=torch.float64, device=runner.device)
    loss = torch.zeros(1, dtype=torch.float64, device=runner.device)
    for i, b in enumerate(batches):
        w = 1.0 if weights is None else weights[i]
        b = runner.to_device(b)
        y = b["class_labels"]
        with runner.autocast():
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=y, use_cache=False)
        pred = out.logits.argmax(-1)
        conf.index_put_((y, pred), torch.full_like(y, w, dtype=torch.float64), accumulate=True)
        loss += out.loss.double() * y.shape[0] * w
    runner.all_reduce_sum(conf)
    runner.all_reduce_sum(loss)
    if was_training:
        model.train()
    return metrics_from_confusion(conf.cpu(), labels, float(loss), prefix)


# ----------------------------------------------------------------------------- engine classify


def add_classify_args(p) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="a run folder (logging.output_dir), an exported model folder, or a LoRA adapter folder")
    p.add_argument("--text", "-t", action="append", default=[], metavar="TEXT", help="a text to label; repeat for more")
    p.add_argument("--file", "-f", metavar="FILE",
                   help="texts to label: one per line (.txt), or a CSV/JSONL with a --text-field column")
    p.add_argument("--text-field", default="text", metavar="NAME", help="CSV column / JSONL field with the text (default: text)")
    p.add_argument("--output", "-o", choices=("text", "jsonl"), default="text",
                   help="text: label<TAB>probability<TAB>text per line; jsonl: one object per text with every label's "
                        "probability")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="texts per forward pass (default 16)")
    p.add_argument("--base", metavar="MODEL", help="base model of a LoRA adapter (default: the one recorded with it)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")


def run_classify_cli(args) -> int:
    from engine.artifacts import load_trained

    texts = list(args.text)
    if args.file:
        texts += [t for t, _ in read_labelled(args.file, "auto", args.text_field, "label", require_labels=False)]
    if not texts:
        raise EngineError("nothing to classify: give --text TEXT (repeatable) or --file FILE")
    if any(not t.strip() for t in texts):
        raise EngineError(f"text {next(i for i, t in enumerate(texts, 1) if not t.strip())} is empty")
    if args.batch_size < 1:
        raise EngineError("--batch-size must be at least 1")
    trained = load_trained(args.model, "classification", base=args.base, device=args.device)
    results = classify_texts(trained, texts, args.batch_size)
    for r in results:
        if args.output == "jsonl":
            print(json.dumps(r, ensure_ascii=False))
        else:
            print(f"{r['label']}\t{r['score']:.4f}\t{r['text']}")
    return 0


def classify_texts(trained, texts: list[str], batch_size: int = 16) -> list[dict]:
    """Label texts with transformers' text-classification pipeline (softmax over the labels)."""
    from transformers import pipeline

    model, tok = trained.model, trained.tokenizer
    pipe = pipeline("text-classification", model=model, tokenizer=tok, device=model.device)
    context = trained.context
    scored = pipe(texts, batch_size=batch_size, truncation=True, max_length=context, top_k=None)
    out = []
    for text, scores in zip(texts, scored):
        best = max(scores, key=lambda s: s["score"])
        out.append({"text": text, "label": best["label"], "score": best["score"],
                    "scores": {s["label"]: s["score"] for s in scores}})
    return out
