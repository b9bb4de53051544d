"""`engine eval` for language models: loss/perplexity equal an independent transformers computation in both data
modes; two models give one comparison table; an adapter scores like its merged export."""

import json
import math

import pytest
import torch

from conftest import run_main


def eval_jsonl(*args) -> list[dict]:
    rc, out, err = run_main(["eval", *args, "--output", "jsonl"])
    assert rc == 0, err
    return [json.loads(l) for l in out.splitlines()]


@pytest.fixture(scope="module")
def full_model(lm_runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = lm_runs["full"] / "model"
    return AutoModelForCausalLM.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)


def test_packed_loss_is_the_mean_token_loss_of_the_blocks(lm_runs, full_model):
    """Packed: the file's lines joined with EOS, cut into 32-token blocks; the loss is transformers' own LM loss
    averaged over every predicted token of every block (all blocks predict 31 tokens)."""
    model, tok = full_model
    (r,) = eval_jsonl(lm_runs["full"], "--file", lm_runs["validation"], "--block-size", "32")
    lines = [l for l in lm_runs["validation"].read_text().splitlines() if l.strip()]
    flat = [t for l in lines for t in tok(l, add_special_tokens=False).input_ids + [tok.eos_token_id]]
    blocks = torch.tensor(flat[: len(flat) // 32 * 32]).view(-1, 32)
    with torch.no_grad():
        ref = model(blocks, labels=blocks).loss.item()
    assert r["tokens"] == blocks.shape[0] * 31
    assert r["loss"] == pytest.approx(ref, rel=1e-5) and r["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)


def test_line_by_line_loss_weights_every_token(lm_runs, full_model):
    """line_by_line: one sequence per line (+EOS), padding masked out: the token-weighted mean of per-line losses."""
    model, tok = full_model
    (r,) = eval_jsonl(lm_runs["full"] / "model", "--file", lm_runs["validation"], "--mode", "line_by_line",
                      "--block-size", "64", "--batch-size", "5")
    total, n = 0.0, 0
    with torch.no_grad():
        for l in lm_runs["validation"].read_text().splitlines():
            ids = torch.tensor([tok(l, add_special_tokens=False).input_ids + [tok.eos_token_id]])
            total += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    assert r["tokens"] == n and r["loss"] == pytest.approx(total / n, rel=1e-5)


def test_base_vs_fine_tuned_table(lm_runs):
    """The LoRA run's base (the full export) vs the LoRA fine-tune: one table, one row each, the difference stated;
    the adapter folder (loaded on its base) scores exactly like the merged export."""
    base, adapter, merged = lm_runs["full"] / "model", lm_runs["lora"] / "adapter", lm_runs["lora"] / "model"
    rows = eval_jsonl(base, adapter, merged, "--file", lm_runs["validation"], "--block-size", "32")
    assert [r["model"] for r in rows] == [str(base), str(adapter), str(merged)]
    assert rows[1]["loss"] == pytest.approx(rows[2]["loss"], abs=1e-5) and rows[1]["loss"] != pytest.approx(rows[0]["loss"], abs=1e-4)
    from engine.config import DataConfig
    from engine.evaluate import format_table

    lines = format_table(rows, "causal_lm", lm_runs["validation"], DataConfig(block_size=32)).splitlines()  # the text output
    assert lines[0].endswith("(packed, block_size 32)") and lines[1].split() == ["model", "tokens", "loss", "perplexity"]
    assert [l.split()[0] for l in lines[3:]] == [str(base), str(adapter), str(merged)]
    assert f"{rows[1]['loss'] - rows[0]['loss']:+.4f} loss" in lines[4] and "vs first" not in lines[3]


@pytest.mark.parametrize("args,needle", [
    (["--block-size", "128"], "error: --block-size 128 exceeds the context of"),
    (["--mode", "padded"], "invalid choice: 'padded'"),
    (["--file", "/nonexistent.txt"], "error: data file not found: /nonexistent.txt"),
    (["--block-size", "1"], "error: --block-size: Input should be greater than 1"),
])
def test_bad_eval_input(lm_runs, args, needle):
    rc, out, err = run_main(["eval", lm_runs["full"], *args])
    assert rc == 2 and out == "" and needle in err.strip().splitlines()[-1], err
    if "usage" not in err:
        assert len(err.strip().splitlines()) == 1
