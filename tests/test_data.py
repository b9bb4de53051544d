import json

import pytest
import torch

from engine.config import DataConfig, ModelConfig
from engine.data import (IGNORE_INDEX, SAMPLE_CORPUS, StepSampler, TokenizedSplit, build_split, collate, load_splits,
                         read_documents)
from engine.tokenizer import load_tokenizer
from engine.errors import DataError


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig())


def test_vendored_tokenizer_is_real_gpt2(tok):
    assert tok("Hello, I'm a language model,").input_ids == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert tok.eos_token_id == 50256 and len(tok) == 50257


def test_special_tokens_are_added(tok):
    t = load_tokenizer(ModelConfig(special_tokens={"bos": "<BOS>", "eos": "<EOS>", "pad": "<PAD>", "additional": ["JOKE:"]}))
    assert len(t) == 50257 + 4
    assert t.convert_tokens_to_ids("<BOS>") == 50257 and t.pad_token == "<PAD>" and t.eos_token == "<EOS>"
    assert t("JOKE: hi").input_ids[0] == t.convert_tokens_to_ids("JOKE:")


def test_packed_blocks_have_no_padding_and_join_with_eos(tmp_path, tok):
    f = tmp_path / "t.txt"
    f.write_text("one two three\nfour five\n" * 20)
    split = build_split("train", f, tok, DataConfig(block_size=8, cache_dir=str(tmp_path / "c")))
    assert split.mode == "packed" and split.examples.shape[1] == 8
    flat = split.examples.flatten().tolist()
    assert tok.eos_token_id in flat and flat.count(tok.eos_token_id) >= 2 * (len(flat) // 12) - 1
    b = collate(split.examples[:2], tok.pad_token_id, "packed")
    assert (b["labels"] != IGNORE_INDEX).all() and "attention_mask" not in b and b["n_tokens"] == 2 * 7


def test_line_by_line_pads_per_batch_and_masks_loss(tmp_path, tok):
    f = tmp_path / "t.txt"
    f.write_text("short\n" + "a much longer line with many words in it\n")
    split = build_split("train", f, tok, DataConfig(mode="line_by_line", block_size=64, cache_dir=str(tmp_path / "c")))
    b = collate(split.examples, tok.pad_token_id, "line_by_line")
    width = max(len(x) for x in split.examples)
    assert b["input_ids"].shape == (2, width)  # dynamic: the longest in the batch, not block_size
    assert (b["labels"][0, len(split.examples[0]):] == IGNORE_INDEX).all()
    assert (b["attention_mask"][0, len(split.examples[0]):] == 0).all()
    assert (b["labels"][1] != IGNORE_INDEX).all()


@pytest.mark.parametrize("how", ["split", "truncate"])
def test_long_lines_never_exceed_block(tmp_path, tok, how):
    f = tmp_path / "t.txt"
    f.write_text(" ".join(["word"] * 100) + "\n")
    split = build_split("train", f, tok, DataConfig(mode="line_by_line", block_size=16, long_lines=how, cache_dir=str(tmp_path / "c")))
    assert all(len(x) <= 16 for x in split.examples)
    assert (len(split.examples) > 1) == (how == "split")


def test_jsonl_text_field(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"body": "hello world"}) + "\n" + json.dumps({"body": "again"}) + "\n")
    assert read_documents(f, "auto", "body") == ["hello world", "again"]
    with pytest.raises(DataError, match="line 1: no 'text' field"):
        read_documents(f, "auto", "text")


@pytest.mark.parametrize("make,needle", [
    (lambda p: p, "not found"),
    (lambda p: (p.mkdir(), p)[1], "is a directory"),
    (lambda p: (p.write_text("  \n\n"), p)[1], "is empty"),
    (lambda p: (p.write_bytes(b"ok text\n\xff\xfe bad"), p)[1], r"not valid UTF-8: .* \(byte offset 8"),
    (lambda p: (p.write_bytes(b"\x7fELF\x00\x00\x01"), p)[1], "looks binary"),
])
def test_bad_files_are_clear_errors(tmp_path, make, needle):
    path = make(tmp_path / "x.txt")
    with pytest.raises(DataError, match=needle):
        read_documents(path)


def test_bad_jsonl_line_reports_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "fine"}\n{not json}\n')
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        read_documents(f)


def test_corpus_smaller_than_one_block(tmp_path, tok):
    f = tmp_path / "t.txt"
    f.write_text("tiny\n")
    with pytest.raises(DataError, match="fewer than one block of data.block_size=64"):
        load_splits(DataConfig(train_file=str(f), block_size=64, cache_dir=str(tmp_path / "c")), tok)


def test_too_few_examples_for_one_step(tok):
    split = TokenizedSplit("train", "packed", torch.zeros(3, 4, dtype=torch.long), 12)
    with pytest.raises(DataError, match="one optimizer step needs 8"):
        StepSampler(split, micro=2, accum=2, world=2, rank=0, seed=0, pad_id=0)


def test_sampler_layout_is_independent_of_rank_accum_split():
    """The same global batch is used whether examples come from accumulation or from more ranks."""
    split = TokenizedSplit("train", "packed", torch.arange(64).view(32, 2), 64)
    one = StepSampler(split, micro=8, accum=1, world=1, rank=0, seed=3, pad_id=0)
    two = [StepSampler(split, micro=4, accum=1, world=2, rank=r, seed=3, pad_id=0) for r in range(2)]
    acc = StepSampler(split, micro=2, accum=4, world=1, rank=0, seed=3, pad_id=0)
    for step in range(one.steps_per_epoch):
        ref = sorted(one.micro_batches(0, step)[0]["input_ids"][:, 0].tolist())
        ranks = sorted(sum((s.micro_batches(0, step)[0]["input_ids"][:, 0].tolist() for s in two), []))
        accs = sorted(sum((b["input_ids"][:, 0].tolist() for b in acc.micro_batches(0, step)), []))
        assert ref == ranks == accs
    assert one.permutation(0).tolist() != one.permutation(1).tolist()


def test_sample_corpus_ships_and_tokenization_is_cached(tmp_path, tok):
    cfg = DataConfig(block_size=128, cache_dir=str(tmp_path / "cache"))
    splits = load_splits(cfg, tok, with_test=True)
    assert set(splits) == {"train", "validation", "test"}
    assert splits["train"].n_tokens > 150_000
    assert any((tmp_path / "cache" / "tokenized").iterdir())
    again = load_splits(cfg, tok)
    assert torch.equal(again["train"].examples, splits["train"].examples)
    assert SAMPLE_CORPUS["train"].exists()
