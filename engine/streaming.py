"""`data.streaming`: corpora larger than RAM, read as a `datasets` IterableDataset in order, tokenized and packed (or
cut line by line) on the fly.

`ExampleStream` turns rows into examples; its position - the IterableDataset's own `state_dict()` after the last
row read, plus the tokens and examples read but not yet used - is exact and JSON-sized, so a checkpoint holds it and
a resume continues with the very next example (`StreamSampler.state_dict` / `load_state_dict`). When the stream ends a
new epoch starts it again from the top; the partial tail is dropped, as packing drops it. There is no shuffling: the
stream's order is the training order (shuffle the data before, e.g. `ds.shuffle(seed).flatten_indices()`).
"""

from __future__ import annotations

import itertools

import torch

from engine.config import DataConfig
from engine.data import (
    IGNORE_INDEX,
    TokenizedSplit,
    cache_root,
    collate,
    encoder,
    piece_slices,
    prompt_labels,
)
from engine.dataset_source import check_columns, describe, open_splits, pick_split
from engine.errors import DataError

ROWS_PER_READ = 16  # rows tokenized together (what a checkpoint may hold beyond the position: their unused tokens)


def stream_mode(cfg: DataConfig) -> str:
    return cfg.mode + ("_masked" if cfg.prompt_field is not None else "")


class ExampleStream:
    """Rows of one split -> examples of `stream_mode(cfg)` (as lists, JSON-able), in order, epoch after epoch."""

    def __init__(self, open_stream, tok, cfg: DataConfig, where: str):
        self.open_stream, self.cfg, self.where = open_stream, cfg, where
        self.encode = encoder(tok, cfg)
        self.epoch, self.carry, self.pending, self.made_this_epoch = 0, [[], []], [], 0
        self._start(None)

    def _start(self, state: dict | None) -> None:
        self.stream = self.open_stream()
        if state is not None:
            self.stream.load_state_dict(state)
        self.rows = iter(self.stream)

    def _documents(self, rows: list[dict]) -> dict:
        c = self.cfg
        if c.prompt_field is not None:
            pairs = [(r.get(c.prompt_field) or "", r.get(c.completion_field)) for r in rows]
            pairs = [(p, x) for p, x in pairs if isinstance(x, str) and x.strip()]
            return {"prompt": [p for p, _ in pairs], "completion": [x for _, x in pairs]}
        return {"text": [t for t in (r.get(c.text_field) for r in rows) if isinstance(t, str) and t.strip()]}

    def _add(self, ids: list[int], labels: list[int] | None) -> None:
        b, masked = self.cfg.block_size, labels is not None
        if self.cfg.mode == "packed":
            self.carry[0] += ids
            self.carry[1] += labels if masked else []
            while len(self.carry[0]) >= b:
                block = self.carry[0][:b]
                self.pending.append([block, self.carry[1][:b]] if masked else block)
                self.carry = [self.carry[0][b:], self.carry[1][b:]]
            return
        for s in piece_slices(len(ids), b, self.cfg.long_lines):
            if not masked:
                self.pending.append(ids[s])
            elif any(t != IGNORE_INDEX for t in labels[s][1:]):
                self.pending.append([ids[s], labels[s]])

    def _read(self) -> bool:
        """Read and tokenize the next rows; False when the stream has ended."""
        rows = list(itertools.islice(self.rows, ROWS_PER_READ))
        if not rows:
            return False
        tokenized = self.encode(self._documents(rows))
        for i, ids in enumerate(tokenized["ids"]):
            before = len(self.pending)
            self._add(ids, prompt_labels(ids, tokenized["n_prompt"][i]) if "n_prompt" in tokenized else None)
            self.made_this_epoch += len(self.pending) - before
        return True

    def take(self, n: int, one_epoch: bool = False) -> list:
        """The next `n` examples (fewer when `one_epoch` and the stream ends first)."""
        while len(self.pending) < n:
            if self._read():
                continue
            if one_epoch:
                break
            if self.made_this_epoch == 0:
                raise DataError(f"{self.where} yields no example of data.block_size={self.cfg.block_size} tokens: add "
                                "text or lower data.block_size")
            self.epoch, self.carry, self.made_this_epoch = self.epoch + 1, [[], []], 0
            self._start(None)
        out, self.pending = self.pending[:n], self.pending[n:]
        return out

    def position(self) -> dict:
        return {"epoch": self.epoch, "stream": self.stream.state_dict(), "carry": self.carry,
                "pending": self.pending, "made_this_epoch": self.made_this_epoch}

    def load_position(self, pos: dict) -> None:
        self.epoch, self.carry, self.pending = pos["epoch"], pos["carry"], pos["pending"]
        self.made_this_epoch = pos["made_this_epoch"]
        self._start(pos["stream"])


def as_batch_examples(examples: list, mode: str):
    """Examples as `collate` takes them: packed ones as one tensor."""
    return torch.tensor(examples, dtype=torch.long) if mode.startswith("packed") else examples


class StreamSampler:
    """Global batches read in order from an `ExampleStream`, laid out [accum][world][micro] as `StepSampler`'s are;
    every rank reads the stream and keeps its share. Steps come one after another; the position after the last one
    is what a checkpoint saves."""

    steps_per_epoch = None  # a stream's length is known only once it has ended

    def __init__(self, examples: ExampleStream, micro: int, accum: int, world: int, rank: int, pad_id: int):
        self.examples, self.micro, self.accum, self.world, self.rank = examples, micro, accum, world, rank
        self.pad_id, self.mode = pad_id, stream_mode(examples.cfg)
        self.global_batch = micro * accum * world
        self.next_step = 0

    def step_batches(self, step: int) -> tuple[int, list[dict]]:
        if step != self.next_step:
            raise RuntimeError(f"a stream is read in order: step {step} asked for, step {self.next_step} is next")
        epoch = self.examples.epoch
        batch = self.examples.take(self.global_batch)
        self.next_step += 1
        out = []
        for a in range(self.accum):
            start = (a * self.world + self.rank) * self.micro
            out.append(collate(as_batch_examples(batch[start : start + self.micro], self.mode), self.pad_id, self.mode))
        return epoch, out

    def state_dict(self) -> dict:
        return {**self.examples.position(), "next_step": self.next_step}

    def load_state_dict(self, state: dict) -> None:
        self.examples.load_position(state)
        self.next_step = state["next_step"]


def required_columns(cfg: DataConfig) -> list[tuple[str, str]]:
    if cfg.prompt_field is not None:
        return [(cfg.prompt_field, "data.prompt_field"), (cfg.completion_field, "data.completion_field")]
    return [(cfg.text_field, "data.text_field")]


def open_stream_split(cfg: DataConfig, name: str, key: str):
    """A function that opens split `name` of data.dataset as a fresh IterableDataset (columns checked once)."""
    cache = cache_root(cfg) / "datasets"
    first = pick_split(open_splits(cfg.dataset, cache, streaming=True), name, cfg.dataset, key)
    check_columns(first, required_columns(cfg), describe(cfg.dataset, name))
    opened = [first]

    def open_stream():
        return opened.pop() if opened else open_splits(cfg.dataset, cache, streaming=True)[name]

    return open_stream


def streamed_splits(cfg: DataConfig, tok, max_eval_examples: int | None) -> tuple[ExampleStream, dict[str, TokenizedSplit]]:
    """The train split as an ExampleStream; the validation / test splits read once (up to `max_eval_examples`)."""
    train = ExampleStream(open_stream_split(cfg, cfg.split, "data.split"), tok, cfg, describe(cfg.dataset, cfg.split))
    splits = {}
    roles = {"validation": (cfg.validation_split, "data.validation_split"), "test": (cfg.test_split, "data.test_split")}
    for role, (name, key) in roles.items():
        if not isinstance(name, str):
            continue
        where = describe(cfg.dataset, name)
        examples = ExampleStream(open_stream_split(cfg, name, key), tok, cfg, where).take(max_eval_examples or 2**62, True)
        if not examples:
            raise DataError(f"{where} yields no example of data.block_size={cfg.block_size} tokens")
        mode = stream_mode(cfg)
        n_tokens = sum(len(x) if mode == "line_by_line" else len(x[0]) if mode.endswith("masked") else len(x)
                       for x in examples)
        splits[role] = TokenizedSplit(role, mode, as_batch_examples(examples, mode), n_tokens)
    return train, splits
