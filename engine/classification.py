"""The classification task's data (`task: classification`): labelled CSV/JSONL -> (token ids, label id) examples.

The model is transformers' GPT2ForSequenceClassification (built in `engine/model.py`): it scores the hidden
state of each sequence's last non-pad token, found through `config.pad_token_id`, so batches are right-padded
and the pad token never ends a real text (no EOS is appended). Examples are `(token ids, label id)` pairs in a
`TokenizedSplit` of mode "classification", so the step sampler, both backends (and with them ZeRO, offload,
checkpointing, 8-bit optimizers, LoRA) run classification exactly as they run language modelling; only the
loss (`engine.loss.classification_loss_sum`, the model's own cross-entropy) and the eval metrics
(`engine/metrics.py`) differ.

Label names are taken from `classification.labels` or, unset, the sorted distinct labels of the train file, and
go into the exported model's config as id2label/label2id, so a `transformers` pipeline shows them.
"""

from __future__ import annotations

from pathlib import Path

from engine.config import RunConfig
from engine.data import TokenizedSplit, cache_root, dataset_split_roles, hold_out
from engine.dataset_source import describe, labelled_records, open_splits, pick_split
from engine.errors import DataError
from engine.records import SAMPLE_SENTIMENT, Record, read_records


def _is_int(s: str) -> bool:
    return s.lstrip("-").isdigit()


def label_names_from(labels: list[str]) -> list[str]:
    """Distinct labels sorted (numerically when all are integers)."""
    distinct = set(labels)
    if all(_is_int(x) for x in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def label_ids(rows: list[Record], names: list[str], where: str, origin: str) -> list[int]:
    """Map labels to ids: a label is one of `names` or, when it is not, an integer id into them (IMDB's 0/1)."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for _, lab in rows:
        if lab in index:
            out.append(index[lab])
        elif _is_int(lab) and 0 <= int(lab) < len(names):
            out.append(int(lab))
        else:
            raise DataError(f"{where}: label {lab!r} is not one of {origin} ({', '.join(names)})")
    return out


def encode(tok, rows: list[Record], names: list[str], max_length: int, where: str, origin: str) -> list[tuple[list[int], int]]:
    """(token ids, label id) examples; texts longer than `max_length` tokens keep their first `max_length`."""
    ids = tok([t for t, _ in rows], add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    examples = [(x, c) for x, c in zip(ids, label_ids(rows, names, where, origin)) if x]
    if len(examples) < len(rows):
        raise DataError(f"{where}: {len(rows) - len(examples)} texts give no tokens")
    return examples


def file_rows(cfg: RunConfig) -> dict[str, tuple[str, list[Record]]]:
    """Labelled rows of data.train_file / validation_file / test_file by role (the shipped sentiment set when
    train_file is unset), each with its file."""
    d = cfg.data
    train_path = Path(d.train_file) if d.train_file else SAMPLE_SENTIMENT["train"]
    val_path = Path(d.validation_file) if d.validation_file else (SAMPLE_SENTIMENT["validation"] if not d.train_file else None)
    test_path = Path(d.test_file) if d.test_file else None
    paths = {"train": train_path, "validation": val_path, "test": test_path}
    return {role: (str(p), read_records(p, d.format, d.text_field, d.label_field)) for role, p in paths.items() if p}


def dataset_rows(cfg: RunConfig) -> tuple[dict[str, tuple[str, list[Record]]], list[str] | None]:
    """Labelled rows of data.dataset's splits by role, and the label names of a ClassLabel column (else None)."""
    d = cfg.data
    splits = open_splits(d.dataset, cache_root(d) / "datasets")
    out, names = {}, None
    for role, (name, key) in dataset_split_roles(d).items():
        where = describe(d.dataset, name)
        rows, class_names = labelled_records(pick_split(splits, name, d.dataset, key), d.text_field, d.label_field, where)
        out[role] = (where, rows)
        names = names or class_names
    return out, names


def load_classification_splits(cfg: RunConfig, tok) -> tuple[dict[str, TokenizedSplit], list[str]]:
    """train / validation (/ test) splits of (ids, label id) pairs, and the label names in id order.

    Files (data.train_file / validation_file / test_file, or the shipped sentiment set when train_file is unset) or
    data.dataset's splits. Label names: classification.labels, else a ClassLabel column's names, else the train
    split's distinct labels sorted."""
    d = cfg.data
    rows, class_names = dataset_rows(cfg) if d.dataset else (file_rows(cfg), None)
    train_where = rows["train"][0]
    if "validation" not in rows and not isinstance(d.validation_split, str) and d.validation_split > 0:
        train, val = hold_out(rows["train"][1], d.validation_split, train_where, "rows")
        rows["train"], rows["validation"] = (train_where, train), (train_where, val)

    if cfg.classification.labels:
        names, origin = list(cfg.classification.labels), "classification.labels"
    elif class_names:
        names, origin = class_names, f"the ClassLabel names of {train_where}"
    else:
        names, origin = label_names_from([lab for _, lab in rows["train"][1]]), f"the labels of the train file {train_where}"
        if len(names) < 2:
            raise DataError(f"{train_where}: every row has the label {names[0]!r}; classification needs at least two labels")
    splits = {}
    for name, (where, r) in rows.items():
        examples = encode(tok, r, names, d.block_size, where, origin)
        splits[name] = TokenizedSplit(name, "classification", examples, sum(len(x) for x, _ in examples))
    return splits, names
