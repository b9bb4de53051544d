"""Prompt/completion fine-tuning (data.prompt_field): the prompt's tokens are masked out of the labels, so they add
nothing to the loss or the gradient, packed or line_by_line; a run trains on JSONL pairs written here, and
`engine generate` writes prompts into the run's template as training did."""

import json

import pytest
import torch

from conftest import run_inprocess, run_main

PAIRS = [{"prompt": f"what comes after {a}", "answer": f" {b} and then {c}"}
         for a, b, c in [("one", "two", "three"), ("red", "green", "blue"), ("cat", "dog", "bird"),
                         ("day", "night", "day"), ("warm", "cold", "warm"), ("tree", "house", "park")] * 12]
TEMPLATE = "<BOS> Q: {prompt} A:"


def write_pairs(path, pairs=PAIRS):
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


@pytest.fixture(scope="module")
def tok():
    from engine.config import ModelConfig
    from engine.tokenizer import load_tokenizer

    return load_tokenizer(ModelConfig(special_tokens={"additional": ["<BOS>"]}))


def data_config(tmp_path, **kw):
    from engine.config import DataConfig

    return DataConfig(prompt_field="prompt", completion_field="answer", prompt_template=TEMPLATE,
                      cache_dir=str(tmp_path / "cache"), **kw)


@pytest.mark.parametrize("mode", ["packed", "line_by_line"])
def test_masked_prompt_tokens_contribute_nothing_to_the_loss_or_the_gradient(tmp_path, tok, mode):
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine.data import IGNORE_INDEX, build_split, collate
    from engine.loss import lm_loss_sum

    split = build_split("train", write_pairs(tmp_path / "p.jsonl"), tok, data_config(tmp_path, mode=mode, block_size=32))
    assert split.mode == f"{mode}_masked"
    batch = collate(split.examples[:4], tok.pad_token_id, split.mode)
    ids, labels = batch["input_ids"], batch["labels"]
    # the labels are the ids except on the prompts (and pads): exactly the completion tokens and their EOS are kept
    prompt_len = len(tok(TEMPLATE.replace("{prompt}", PAIRS[0]["prompt"]), add_special_tokens=False)["input_ids"])
    if mode == "line_by_line":
        assert (labels[0, :prompt_len] == IGNORE_INDEX).all()
        assert labels[0, prompt_len:].tolist()[: len(split.examples[0][0]) - prompt_len] == split.examples[0][0][prompt_len:]
    kept = labels != IGNORE_INDEX
    assert kept.any() and (~kept).any() and torch.equal(ids[kept], labels[kept])
    assert batch["n_tokens"] == int(kept[:, 1:].sum())

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=2, n_positions=64))
    seen = {}

    def keep_logits(module, inputs, logits):
        logits.retain_grad()
        seen["logits"] = logits

    model.lm_head.register_forward_hook(keep_logits)
    total, n = lm_loss_sum(model, batch)
    total.backward()
    logits = seen["logits"]
    targets = labels[:, 1:]
    # the loss is the cross-entropy of the completion targets alone
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(total, -(picked * (targets != IGNORE_INDEX)).sum(), rtol=1e-6) and n == batch["n_tokens"]
    # and no gradient reaches the logits of a position whose target is a prompt token (or a pad)
    grad = logits.grad[:, :-1]
    masked = targets == IGNORE_INDEX
    assert (grad[masked] == 0).all() and (grad[~masked].abs().sum(-1) > 0).all()


def test_a_prompt_completion_run_and_generate_with_its_template(tmp_path):
    """Line-by-line pairs under a template with an added <BOS>; `engine generate` on the run writes the prompt into the
    same template (the same tokens as giving the templated prompt by hand with --prompt-template '{prompt}')."""
    train, valid = write_pairs(tmp_path / "train.jsonl"), write_pairs(tmp_path / "valid.jsonl", PAIRS[:12])
    out = tmp_path / "run"
    summary, losses = run_inprocess(
        {"train": train, "validation": valid}, out, model={"special_tokens": {"additional": ["<BOS>"]}},
        data={"prompt_field": "prompt", "completion_field": "answer", "prompt_template": TEMPLATE,
              "mode": "line_by_line"}, optim={"lr": 1e-2}, train={"max_steps": 12})
    assert losses[-1] < losses[0] - 2, losses
    args = ["generate", out, "--greedy", "--max-new-tokens", "6", "--output", "jsonl"]
    rc, o, err = run_main([*args, "-p", "what comes after red"])
    assert rc == 0, err
    rec = json.loads(o)
    assert rec["prompt"] == "what comes after red" and rec["text"].startswith("<BOS> Q: what comes after red A:")
    rc, o2, err = run_main([*args, "-p", "<BOS> Q: what comes after red A:", "--prompt-template", "{prompt}"])
    assert rc == 0 and json.loads(o2)["completion"] == rec["completion"]
    rc, _, err = run_main([*args, "-p", "x", "--prompt-template", "Q: A:"])
    assert rc == 2 and "--prompt-template must contain {prompt}" in err


@pytest.mark.parametrize("args,needle", [
    (["data.prompt_field=prompt", "data.prompt_template=Question"], "data.prompt_template must contain {prompt}"),
    (["data.prompt_field=prompt", "task=classification"], "data.prompt_field (prompt/completion fine-tuning) is for"),
    (["data.prompt_field=prompt", "data.format=text"], "data.prompt_field reads fields, which plain text has not"),
])
def test_prompt_completion_settings_are_checked(args, needle):
    rc, _, err = run_main(["train", "--dry-run", *args])
    assert rc == 2 and needle in err and err.count("\n") == 1, err


def test_prompt_completion_file_problems_are_one_line(tmp_path):
    f = write_pairs(tmp_path / "p.jsonl", [{"prompt": "a", "reply": "b"}])
    rc, _, err = run_main(["train", "--dry-run", f"data.train_file={f}", "data.prompt_field=prompt"])
    assert rc == 2 and "line 1: no 'completion' field (fields: prompt, reply); set data.completion_field" in err, err
    t = tmp_path / "p.txt"
    t.write_text("just text\n")
    rc, _, err = run_main(["train", "--dry-run", f"data.train_file={t}", "data.prompt_field=prompt"])
    assert rc == 2 and "prompt/completion pairs must be JSONL or CSV" in err, err


def test_prompt_completion_rows_of_a_dataset(tmp_path, tok):
    """data.dataset rows with prompt and completion columns: the same masked examples as the JSONL file gives; a row
    with no completion is dropped; a missing column lists the ones there are."""
    import datasets

    from engine.data import load_splits

    rows = {"prompt": [p["prompt"] for p in PAIRS] + ["orphan"], "answer": [p["answer"] for p in PAIRS] + [None]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "saved"))
    from_rows = load_splits(data_config(tmp_path, dataset=str(tmp_path / "saved"), mode="line_by_line"), tok)["train"]
    from_file = load_splits(data_config(tmp_path, train_file=str(write_pairs(tmp_path / "p.jsonl")),
                                        mode="line_by_line"), tok)["train"]
    assert from_rows.mode == "line_by_line_masked" and from_rows.examples == from_file.examples
    from engine.errors import DataError

    with pytest.raises(DataError, match=r"has no column 'completion' \(columns: prompt, answer\): set data.completion_field"):
        load_splits(data_config(tmp_path, dataset=str(tmp_path / "saved")).model_copy(update={"completion_field": "completion"}), tok)
