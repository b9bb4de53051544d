"""Language-model data: files or `data.dataset` -> validated documents (texts, or prompt/completion pairs whose
prompt labels are masked) -> tokenized (cached, `datasets`) -> packed or line-by-line examples; and the batches of
every task: one padded collate, the deterministic step sampler, eval batches.

Every input problem (missing, empty, binary, non-UTF-8, bad JSONL, too small) is a `DataError`
raised before a model is built, so a bad path never costs a model load.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from engine.config import DataConfig
from engine.dataset_source import describe, open_splits, pick_split, prompt_completions, texts
from engine.errors import DataError
from engine.loss import IGNORE_INDEX
from engine.records import SAMPLE_CORPUS, file_format, fill_prompt, read_prompt_completions, read_records
from engine.tokenizer import tokenizer_fingerprint

Document = str | tuple[str, str]  # a text, or a (prompt, completion) pair (data.prompt_field)


def read_documents(path: str | os.PathLike, fmt: str = "auto", text_field: str = "text") -> list[str]:
    """Validated documents of one language-model file: one per non-empty line (text) or per JSON line (jsonl).
    Language-model data is text or JSONL: a .csv file is read as lines of text."""
    kind = file_format(Path(path), fmt)
    return [text for text, _ in read_records(path, "text" if kind == "csv" else kind, text_field)]


def read_lm_file(path: str | os.PathLike, cfg: DataConfig) -> list[Document]:
    """A language-model file's documents: texts, or (prompt, completion) pairs when data.prompt_field is set."""
    if cfg.prompt_field is not None:
        return read_prompt_completions(path, cfg.format, cfg.prompt_field, cfg.completion_field)
    return read_documents(path, cfg.format, cfg.text_field)


# ----------------------------------------------------------------------------- tokenizing


def cache_root(cfg: DataConfig) -> Path:
    """The engine's data cache: tokenized splits, and what `load_dataset` builds from data files."""
    return Path(cfg.cache_dir or os.environ.get("ENGINE_CACHE", Path.home() / ".cache" / "gpt2-memengine"))


def encoder(tok, cfg: DataConfig):
    """A batch of documents -> token ids with EOS appended; for (prompt, completion) pairs the templated prompt and
    the completion are tokenized apart (as `engine generate` tokenizes a prompt) and `n_prompt` says where the
    completion starts."""
    eos = tok.eos_token_id

    def encode_texts(batch):
        return {"ids": [ids + [eos] for ids in tok(batch["text"], add_special_tokens=False)["input_ids"]]}

    def encode_pairs(batch):
        prompts = tok([fill_prompt(cfg.prompt_template, p) for p in batch["prompt"]], add_special_tokens=False)["input_ids"]
        completions = tok(batch["completion"], add_special_tokens=False)["input_ids"]
        return {"ids": [p + c + [eos] for p, c in zip(prompts, completions)], "n_prompt": [len(p) for p in prompts]}

    return encode_pairs if cfg.prompt_field is not None else encode_texts


def _tokenize_docs(docs: list[Document], tok, cfg: DataConfig, cache_key: str | None):
    """A `datasets` Dataset of token ids per document (EOS appended; `n_prompt` for pairs), so large corpora use
    num_proc and a disk cache."""
    from datasets import Dataset, load_from_disk
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    cache_path = cache_root(cfg) / "tokenized" / cache_key if cache_key else None
    if cache_path is not None and (cache_path / "dataset_info.json").exists():
        try:
            return load_from_disk(str(cache_path))
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    num_proc = cfg.num_proc if cfg.num_proc and len(docs) > 10_000 else None
    columns = ({"prompt": [p for p, _ in docs], "completion": [c for _, c in docs]} if cfg.prompt_field is not None
               else {"text": docs})
    ds = Dataset.from_dict(columns).map(encoder(tok, cfg), batched=True, remove_columns=list(columns), num_proc=num_proc)
    if cache_path is not None:
        tmp = cache_path.with_name(cache_path.name + f".tmp{os.getpid()}")
        try:
            ds.save_to_disk(str(tmp))
            os.replace(tmp, cache_path)
        except OSError:
            pass  # caching is an optimisation; a read-only cache dir must not stop training
    return ds


def pack(token_lists: list[list[int]], block_size: int) -> torch.Tensor:
    """Concatenate documents (already EOS-terminated) and cut into full blocks; the tail is dropped."""
    flat = torch.tensor([t for ids in token_lists for t in ids], dtype=torch.long)
    n = flat.numel() // block_size
    return flat[: n * block_size].view(n, block_size)


def piece_slices(length: int, block_size: int, how: str) -> list[slice]:
    """line_by_line: where an example of `length` tokens is cut (data.long_lines): whole, its first block, or blocks
    (a last piece of one token predicts nothing and is dropped)."""
    if length <= block_size:
        return [slice(0, length)]
    if how == "truncate":
        return [slice(0, block_size)]
    return [slice(i, i + block_size) for i in range(0, length, block_size) if min(length, i + block_size) - i > 1]


def split_long(token_lists: list[list[int]], block_size: int, how: str) -> list[list[int]]:
    return [ids[s] for ids in token_lists for s in piece_slices(len(ids), block_size, how)]


def prompt_labels(ids: list[int], n_prompt: int) -> list[int]:
    """The labels of a prompt/completion example: the prompt's masked (no loss), the completion's (and EOS) kept."""
    return [IGNORE_INDEX] * n_prompt + ids[n_prompt:]


def masked_split(name: str, where, labelled: list[tuple[list[int], list[int]]], cfg: DataConfig) -> "TokenizedSplit":
    """Prompt/completion examples with their own labels. packed: a [N, 2, block] tensor (ids, labels) of the
    examples joined; line_by_line: (ids, labels) pairs, long ones cut as data.long_lines says, pieces with no
    completion token left dropped."""
    b = cfg.block_size
    if cfg.mode == "packed":
        ids = torch.tensor([t for x, _ in labelled for t in x], dtype=torch.long)
        labels = torch.tensor([t for _, y in labelled for t in y], dtype=torch.long)
        n = ids.numel() // b
        if n == 0:
            raise DataError(f"{name} data {where} has {ids.numel()} tokens, fewer than one block of data.block_size={b}: "
                            "add examples or lower data.block_size")
        blocks = torch.stack([ids[: n * b].view(n, b), labels[: n * b].view(n, b)], dim=1)
        return TokenizedSplit(name, "packed_masked", blocks, n * b)
    pieces = [(x[s], y[s]) for x, y in labelled for s in piece_slices(len(x), b, cfg.long_lines)]
    pieces = [(x, y) for x, y in pieces if any(t != IGNORE_INDEX for t in y[1:])]
    if not pieces:
        raise DataError(f"{name} data {where}: no example keeps a completion token within data.block_size={b}: "
                        "shorten the prompts or raise data.block_size")
    return TokenizedSplit(name, "line_by_line_masked", pieces, sum(len(x) for x, _ in pieces))


@dataclass
class TokenizedSplit:
    """Examples of one split: a [N, block] tensor (packed), a list of id lists (line_by_line) or of (ids, label id)
    pairs (classification); prompt/completion data: a [N, 2, block] tensor of ids and labels (packed_masked) or
    (ids, labels) pairs (line_by_line_masked)."""

    name: str
    mode: str
    examples: torch.Tensor | list[list[int]]
    n_tokens: int

    def __len__(self) -> int:
        return len(self.examples)


def documents_key(docs: list[Document], cfg: DataConfig, tok) -> str:
    """The tokenization cache's key: the documents (and a pair's template) and the tokenizer."""
    h = hashlib.sha256()
    if cfg.prompt_field is not None:
        h.update(("pairs\n" + cfg.prompt_template + "\n").encode("utf-8"))
    for d in docs:
        h.update((d if isinstance(d, str) else json.dumps(d)).encode("utf-8"))
        h.update(b"\n")
    return f"{h.hexdigest()[:20]}-{tokenizer_fingerprint(tok)}"


def build_split(name: str, path: Path | str, tok, cfg: DataConfig, docs: list[Document] | None = None) -> TokenizedSplit:
    if docs is None:
        docs = read_lm_file(path, cfg)
    tokenized = _tokenize_docs(docs, tok, cfg, documents_key(docs, cfg, tok))
    ids = [list(x) for x in tokenized["ids"]]
    if cfg.prompt_field is not None:
        return masked_split(name, path, [(x, prompt_labels(x, n)) for x, n in zip(ids, tokenized["n_prompt"])], cfg)
    if cfg.mode == "packed":
        blocks = pack(ids, cfg.block_size)
        if len(blocks) == 0:
            total = sum(len(x) for x in ids)
            raise DataError(
                f"{name} data {path} has {total} tokens, fewer than one block of data.block_size={cfg.block_size}: "
                "add text or lower data.block_size"
            )
        return TokenizedSplit(name, "packed", blocks, blocks.numel())
    examples = split_long(ids, cfg.block_size, cfg.long_lines)
    return TokenizedSplit(name, "line_by_line", examples, sum(len(x) for x in examples))


def hold_out(items: list, fraction: float, path: Path, what: str) -> tuple[list, list]:
    """`data.validation_split`: the last `fraction` of a train file's items become the validation split."""
    n_val = max(1, int(len(items) * fraction))
    if n_val >= len(items):
        raise DataError(f"{path} has {len(items)} {what}: too few to hold out data.validation_split")
    return items[:-n_val], items[-n_val:]


def dataset_split_roles(cfg: DataConfig) -> dict[str, tuple[str, str]]:
    """data.dataset's splits by role: train / validation / test -> (split name, the key that names it)."""
    roles = {"train": (cfg.split, "data.split")}
    if isinstance(cfg.validation_split, str):
        roles["validation"] = (cfg.validation_split, "data.validation_split")
    if cfg.test_split is not None:
        roles["test"] = (cfg.test_split, "data.test_split")
    return roles


def dataset_documents(cfg: DataConfig) -> dict[str, tuple[str, list[str]]]:
    """data.dataset's documents by role, each with where it came from (for messages)."""
    splits = open_splits(cfg.dataset, cache_root(cfg) / "datasets")
    out = {}
    for role, (name, key) in dataset_split_roles(cfg).items():
        where = describe(cfg.dataset, name)
        ds = pick_split(splits, name, cfg.dataset, key)
        out[role] = (where, prompt_completions(ds, cfg.prompt_field, cfg.completion_field, where)
                     if cfg.prompt_field is not None else texts(ds, cfg.text_field, where))
    return out


def file_documents(cfg: DataConfig, with_test: bool) -> dict[str, tuple[Path, list[str]]]:
    """The documents of data.train_file / validation_file / test_file (the sample corpus when unset) by role."""
    train_path = Path(cfg.train_file) if cfg.train_file else SAMPLE_CORPUS["train"]
    if cfg.validation_file:
        val_path = Path(cfg.validation_file)
    elif cfg.train_file is None:
        val_path = SAMPLE_CORPUS["validation"]
    else:
        val_path = None
    # Validate every file before tokenizing any, so the first error is reported cheaply.
    train_docs = read_lm_file(train_path, cfg)
    val_docs = read_lm_file(val_path, cfg) if val_path else None
    test_path = Path(cfg.test_file) if cfg.test_file else (SAMPLE_CORPUS["test"] if with_test and cfg.train_file is None else None)
    test_docs = read_lm_file(test_path, cfg) if test_path and with_test else None
    found = {"train": (train_path, train_docs), "validation": (val_path, val_docs), "test": (test_path, test_docs)}
    return {role: pair for role, pair in found.items() if pair[1] is not None}


def load_splits(cfg: DataConfig, tok, with_test: bool = False) -> dict[str, TokenizedSplit]:
    """train and validation (and test), validated and tokenized: from files or data.dataset."""
    docs = dataset_documents(cfg) if cfg.dataset else file_documents(cfg, with_test)
    if "validation" not in docs and not isinstance(cfg.validation_split, str) and cfg.validation_split > 0:
        where, train_docs = docs["train"]
        train_docs, val_docs = hold_out(train_docs, cfg.validation_split, where, "documents")
        docs["train"], docs["validation"] = (where, train_docs), (where, val_docs)
    return {role: build_split(role, where, tok, cfg, d) for role, (where, d) in docs.items()}


# ----------------------------------------------------------------------------- batching


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> right-padded ids and the attention mask (1 on real tokens)."""
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return ids, mask


def collate(examples: list, pad_id: int, mode: str) -> dict[str, torch.Tensor]:
    """One batch of `mode`'s examples, with `n_tokens`, the host-side count of loss units.

    packed: full blocks, no mask. line_by_line: padded to the batch's longest example, pads masked out of attention
    and loss. classification: (ids, label id) pairs, right-padded (the model scores the last non-pad token), with
    `class_labels`; the example is the loss unit. packed_masked / line_by_line_masked (prompt/completion): as packed /
    line_by_line, with the examples' own labels (masked prompts)."""
    if mode == "packed_masked":
        x = torch.stack(list(examples)) if not isinstance(examples, torch.Tensor) else examples
        ids, labels = x[:, 0].contiguous(), x[:, 1].contiguous()
        return {"input_ids": ids, "labels": labels, "n_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum())}
    if mode == "line_by_line_masked":
        ids, mask = pad_right([x for x, _ in examples], pad_id)
        labels, _ = pad_right([y for _, y in examples], IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "n_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum())}
    if mode == "packed":
        # No attention_mask: every position is real, and SDPA keeps its causal fast path without one.
        ids = torch.stack(list(examples)) if not isinstance(examples, torch.Tensor) else examples
        return {"input_ids": ids, "labels": ids.clone(), "n_tokens": ids.shape[0] * (ids.shape[1] - 1)}
    if mode == "classification":
        ids, mask = pad_right([x for x, _ in examples], pad_id)
        y = torch.tensor([c for _, c in examples], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "class_labels": y, "n_tokens": len(examples)}
    ids, mask = pad_right(examples, pad_id)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "n_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum())}


class Sampler(Protocol):
    """What the step loop asks of its training data, for in-memory splits (`StepSampler`) and streams
    (`engine.streaming.StreamSampler`) alike."""

    global_batch: int  # examples per optimizer step over all ranks
    accum: int
    steps_per_epoch: int | None  # None for a stream (known once it has ended)

    def step_batches(self, step: int) -> tuple[int, list[dict]]:
        """The epoch and this rank's micro-batches of optimizer step `step`."""

    def state_dict(self) -> dict:
        """The data position after the last step taken (what a checkpoint saves; it has an "epoch")."""

    def load_state_dict(self, state: dict) -> None: ...


class StepSampler:
    """Deterministic global batches: epoch e uses permutation(seed + e); step s takes its slice.

    A global batch of micro x accum x world examples is laid out as [accum][world][micro], so rank r's
    a-th micro-batch is the same examples whatever the split between accumulation and ranks, and the
    position (epoch, step-in-epoch) is all a resume needs.
    """

    def __init__(self, split: TokenizedSplit, micro: int, accum: int, world: int, rank: int, seed: int, pad_id: int):
        self.split, self.micro, self.accum, self.world, self.rank = split, micro, accum, world, rank
        self.seed, self.pad_id = seed, pad_id
        self.global_batch = micro * accum * world
        self._perm: tuple[int, torch.Tensor] | None = None
        self.next_step = 0
        self.steps_per_epoch = len(split) // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"train data yields {len(split)} examples but one optimizer step needs {self.global_batch} "
                f"(micro_batch_size {micro} x grad_accum_steps {accum} x world size {world}): add text or lower "
                "data.block_size / train.micro_batch_size"
            )

    def step_batches(self, step: int) -> tuple[int, list[dict]]:
        """The epoch and this rank's micro-batches of optimizer step `step` (each epoch's permutation made once)."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, self.permutation(epoch))
        self.next_step = step + 1
        return epoch, self.micro_batches(epoch, in_epoch, self._perm[1])

    def state_dict(self) -> dict:
        """Where the data is: epoch e's order is randperm(seed + e), and the next step is step_in_epoch of it."""
        epoch, in_epoch = divmod(self.next_step, self.steps_per_epoch)
        return {"epoch": epoch, "step_in_epoch": in_epoch, "shuffle_seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.next_step = state["epoch"] * self.steps_per_epoch + state["step_in_epoch"]

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.split), generator=g)

    def micro_batches(self, epoch: int, step_in_epoch: int, perm: torch.Tensor | None = None) -> list[dict]:
        perm = self.permutation(epoch) if perm is None else perm
        idx = perm[step_in_epoch * self.global_batch : (step_in_epoch + 1) * self.global_batch]
        out = []
        for a in range(self.accum):
            start = (a * self.world + self.rank) * self.micro
            mine = idx[start : start + self.micro].tolist()
            out.append(collate([self.split.examples[i] for i in mine], self.pad_id, self.split.mode))
        return out


def eval_batches(split: TokenizedSplit, batch_size: int, pad_id: int, max_batches: int | None = None) -> list[dict]:
    n = len(split)
    batches = []
    for start in range(0, n, batch_size):
        batches.append(collate([split.examples[i] for i in range(start, min(n, start + batch_size))], pad_id, split.mode))
        if max_batches and len(batches) >= max_batches:
            break
    return batches
