"""`engine generate` on tiny trained models (session fixture `lm_runs`): decoding options checked against
transformers itself, the KV cache, stop strings/tokens, LoRA adapters on their base, one-line errors."""

import json

import pytest
import torch

from conftest import run_main


def jsonl(out: str) -> list[dict]:
    return [json.loads(l) for l in out.splitlines() if l.strip()]


def gen(model, *args) -> list[dict]:
    rc, out, err = run_main(["generate", model, "--output", "jsonl", *args])
    assert rc == 0, err
    return jsonl(out)


@pytest.fixture(scope="module")
def loaded(lm_runs):
    from engine.artifacts import load_trained

    return load_trained(str(lm_runs["full"]), "causal_lm", device="cpu")


def test_greedy_equals_transformers_without_cache_and_uses_the_cache(lm_runs, loaded):
    """Greedy text through the CLI equals transformers' greedy decoding with the KV cache OFF; and the engine's
    decoding does use the cache: after the prompt, every forward gets one new token."""
    from engine.config import SampleConfig
    from engine.generate import generate

    (r,) = gen(lm_runs["full"], "--greedy", "-p", "<BOS> the cat", "--max-new-tokens", "12")
    model, tok = loaded.model, loaded.tokenizer
    ids = tok("<BOS> the cat", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             use_cache=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    ref_new = ref[0, ids.shape[1]:].tolist()
    assert r["new_tokens"] == len(ref_new) and r["completion"] == tok.decode(ref_new)
    assert r["text"] == "<BOS> the cat" + r["completion"]

    lengths = []
    hook = model.transformer.register_forward_pre_hook(
        lambda m, a, kw: lengths.append((kw.get("input_ids") if kw.get("input_ids") is not None else a[0]).shape[1]),
        with_kwargs=True)
    try:
        generate(model, tok, ["<BOS> the cat"], SampleConfig(greedy=True, max_new_tokens=8, stop=["never-there"]))
    finally:
        hook.remove()
    assert lengths[0] == ids.shape[1] and len(lengths) >= 2 and set(lengths[1:]) == {1}, lengths


def test_sampling_options_reach_the_sampler(lm_runs, loaded):
    """Every decoding flag reaches `generate` (the CLI equals the same SampleConfig in-process). Seeded sampling is
    reproducible and the seed matters; several sequences per prompt; top-k 1 and a tiny top-p both reduce sampling
    to greedy; a large repetition penalty forbids any token already seen (prompt included)."""
    from engine.config import SampleConfig
    from engine.generate import generate

    full, model, tok = lm_runs["full"], loaded.model, loaded.tokenizer
    prompt = "<BOS> a red"
    run = lambda **kw: [r["completion"] for r in generate(model, tok, [prompt], SampleConfig(max_new_tokens=10, **kw))]  # noqa: E731
    a = gen(full, "-p", prompt, "--seed", "3", "--temperature", "1.5", "--num-sequences", "3", "--max-new-tokens", "10")
    assert [x["sequence"] for x in a] == [1, 2, 3] and len({x["completion"] for x in a}) > 1
    assert [x["completion"] for x in a] == run(seed=3, temperature=1.5, num_sequences=3)
    assert [x["completion"] for x in a] != run(seed=4, temperature=1.5, num_sequences=3)
    b = gen(full, "-p", prompt, "--seed", "9", "--top-k", "5", "--top-p", "0.9", "--repetition-penalty", "1.3",
            "--max-new-tokens", "10", "--num-sequences", "2")
    assert [x["completion"] for x in b] == run(seed=9, top_k=5, top_p=0.9, repetition_penalty=1.3, num_sequences=2)
    assert [x["completion"] for x in b] != run(seed=9, top_k=5, top_p=0.9, num_sequences=2)

    greedy = run(greedy=True)[0]
    assert run(top_k=1, temperature=2.0, seed=1) == [greedy] and run(top_p=1e-6, top_k=0, seed=1) == [greedy]
    r = generate(model, tok, [prompt], SampleConfig(greedy=True, repetition_penalty=1000, max_new_tokens=10))[0]
    new = tok(r["completion"], add_special_tokens=False).input_ids
    seen = tok(prompt, add_special_tokens=False).input_ids
    assert len(new) == len(set(new)) and not set(new) & set(seen) and r["completion"] != greedy, r


def test_stop_token_and_stop_string_cut_the_text(lm_runs, loaded):
    """Seeds' format: sampling from `<BOS>` writes `<EOS>` (an added token). With --stop <EOS> the same seeded
    sample ends there and the text is cut before it; a stop string of several characters cuts inside a token."""
    from engine.config import SampleConfig
    from engine.generate import generate

    full = lm_runs["full"]
    args = ["-p", "<BOS>", "--seed", "1", "--temperature", "1.0", "--max-new-tokens", "40"]
    ref = generate(loaded.model, loaded.tokenizer, ["<BOS>"], SampleConfig(seed=1, temperature=1.0, max_new_tokens=40))
    ref = ref[0]["completion"]
    assert "<EOS>" in ref, ref  # the fine-tuned model ends its lines
    r = gen(full, *args, "--stop", "<EOS>")[0]
    assert r["completion"] == ref[: ref.index("<EOS>")] and r["stop_reason"] == "stop"
    word = next(w for w in r["completion"].split() if w.isalpha() and len(w) >= 3)[1:]  # part of a word
    rc, out, _ = run_main(["generate", full, *args, "--stop", word, "-p", "<BOS> the dog"])
    blocks = out.split("### prompt ")[1:]  # text output: a header line per prompt, then its text
    assert rc == 0 and len(blocks) == 2 and blocks[0].startswith("1/2, sequence 1/1")
    assert blocks[0].splitlines()[1] == "<BOS>" + ref[: ref.index(word)] and word not in blocks[1].split("\n", 1)[1]


def test_run_folder_defaults_and_prompts_file(lm_runs, tmp_path):
    """A run folder's `sample:` section gives the defaults (here its prompt); prompts come from a file too."""
    import yaml

    cfg = yaml.safe_load((lm_runs["full"] / "config.yaml").read_text())
    (r,) = gen(lm_runs["full"], "--max-new-tokens", "3")
    assert r["prompt"] == cfg["sample"]["prompt"]
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "<BOS> the"}\n\n{"prompt": "<BOS> a"}\n')
    rs = gen(lm_runs["full"] / "model", "--prompts-file", f, "--max-new-tokens", "3", "--greedy")
    assert [x["prompt"] for x in rs] == ["<BOS> the", "<BOS> a"]


def test_lora_adapter_on_its_base_equals_the_merged_export(lm_runs, loaded):
    """The adapter folder names its base (the full run's export); loaded on it with peft, seeded sampling gives the
    merged export's text, and the adapter changed the model (logits differ from the base's)."""
    from engine.artifacts import load_trained
    from engine.config import SampleConfig
    from engine.generate import generate

    adapter_cfg = json.loads((lm_runs["lora"] / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(lm_runs["full"] / "model")
    via_adapter = gen(lm_runs["lora"] / "adapter", "-p", "<BOS> the cat", "--seed", "5", "--temperature", "1.0",
                      "--max-new-tokens", "16")[0]["completion"]
    merged = load_trained(str(lm_runs["lora"] / "model"), device="cpu")
    s = SampleConfig(seed=5, temperature=1.0, max_new_tokens=16)
    assert via_adapter == generate(merged.model, merged.tokenizer, ["<BOS> the cat"], s)[0]["completion"]
    x = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        assert (merged.model(x).logits - loaded.model(x).logits).abs().max() > 1e-3  # the adapter trained


def test_context_limits(lm_runs):
    """n_positions=64: a prompt of 64+ tokens is refused; a 60-token prompt gets only the 4 tokens that fit."""
    long = "<BOS>" + " the" * 70
    rc, out, err = run_main(["generate", lm_runs["full"], "-p", long])
    assert rc == 2 and out == "" and err.strip().splitlines() == [
        "error: prompt 1 is 71 tokens long but the model's context is 64 tokens: shorten it to leave room for new tokens"]
    (r,) = gen(lm_runs["full"], "-p", "<BOS>" + " the" * 59, "--max-new-tokens", "10", "--stop", "never")
    assert r["new_tokens"] <= 4 and (r["new_tokens"] < 4 or r["stop_reason"] == "context")


@pytest.mark.parametrize("args,needle", [
    (["-p", ""], "error: prompt 1 is empty"),
    (["--greedy", "--temperature", "0.5"], "error: greedy decoding takes the most likely token, so temperature"),
    (["--greedy", "--num-sequences", "2"], "greedy decoding gives one sequence per prompt"),
    (["--top-p", "1.5"], "error: --top-p: Input should be less than or equal to 1"),
    (["--max-new-tokens", "0"], "error: --max-new-tokens must be at least 1"),
    (["--prompts-file", "/nonexistent.txt"], "error: --prompts-file: file not found"),
])
def test_bad_generate_input_is_one_line(lm_runs, args, needle):
    rc, out, err = run_main(["generate", lm_runs["full"], *args])
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and needle in err, err


def test_wrong_kind_of_model_folder(lm_runs, tmp_path):
    rc, _, err = run_main(["generate", lm_runs["lora"] / "adapter", "--base", lm_runs["dir"] / "nope"])
    assert rc == 2 and err.startswith("error: could not load model from")
    rc, _, err = run_main(["generate", lm_runs["full"], "--base", lm_runs["full"] / "model"])
    assert rc == 2 and "--base only applies to a LoRA adapter" in err
    rc, _, err = run_main(["generate", tmp_path / "missing"])
    assert rc == 2 and "error: model folder not found" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = run_main(["generate", tmp_path / "empty"])
    assert rc == 2 and "is not a trained output" in err
