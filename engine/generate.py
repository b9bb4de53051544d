"""Text generation from a trained output: `engine generate` and the end-of-run sample.

Decoding is transformers' `generate` with the KV cache on (each new token attends to cached keys/values
instead of re-running the whole prefix): greedy or sampling (temperature, top-k, top-p), repetition penalty,
stop strings (transformers' StopStringCriteria; a stop string that is one token, such as an added `<EOS>`,
also ends generation as an EOS token does) and several sequences per prompt. The generated text is cut
before the first stop string. Settings come from one schema, `SampleConfig` (`sample:` in a run config), which
also gives the CLI its flags and help.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.artifacts import load_trained
from engine.config import SampleConfig
from engine.errors import ConfigError, EngineError
from engine.families import context_of
from engine.records import PROMPT_SLOT, fill_prompt

SAMPLING_ONLY = ("temperature", "top_k", "top_p")


def _eos_ids(model, tok, stop: list[str]) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    added = tok.get_added_vocab()
    ids += [added[s] for s in stop if s in added]  # an added token as stop string (<EOS>, JOKE:) stops like EOS
    return sorted(set(ids))


def check_prompts(prompts: list[str], tok, context: int) -> list[list[int]]:
    """Token ids of each prompt; an empty prompt or one that leaves no room in the context is an error."""
    out = []
    for i, p in enumerate(prompts, 1):
        ids = tok(p, add_special_tokens=False)["input_ids"]
        if not ids:
            raise EngineError(f"prompt {i} is empty: give some text to continue (e.g. the start token the model was "
                              "trained with)")
        if len(ids) >= context:
            raise EngineError(f"prompt {i} is {len(ids)} tokens long but the model's context is {context} tokens: "
                              "shorten it to leave room for new tokens")
        out.append(ids)
    return out


def check_template(template: str, what: str = "--prompt-template") -> str:
    if PROMPT_SLOT not in template:
        raise ConfigError(f"{what} must contain {PROMPT_SLOT} where the prompt goes, e.g. 'Q: {PROMPT_SLOT} A:'")
    return template


@torch.no_grad()
def generate(model, tok, prompts: list[str], s: SampleConfig, context: int | None = None, warn=None,
             template: str = PROMPT_SLOT) -> list[dict]:
    """Continue each prompt `s.num_sequences` times, each written into `template` first (the prompt template of
    prompt/completion training). One record per sequence: prompt (as given), completion (cut before a stop string),
    text (= the templated prompt + completion), new_tokens, stop_reason."""
    if s.max_new_tokens < 1:
        raise ConfigError("max_new_tokens must be at least 1 to generate anything")
    context = context or context_of(model.config)
    written = [fill_prompt(check_template(template), p) for p in prompts]
    all_ids = check_prompts(written, tok, context)
    eos = _eos_ids(model, tok, s.stop)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    device = next(model.parameters()).device
    kw = dict(do_sample=not s.greedy, num_return_sequences=s.num_sequences, use_cache=True, eos_token_id=eos,
              pad_token_id=pad, repetition_penalty=s.repetition_penalty)
    if not s.greedy:
        kw.update(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)  # top_k=0: no top-k filter
    else:
        kw.update(temperature=None, top_k=None, top_p=None)
    if s.stop:
        kw.update(stop_strings=list(s.stop), tokenizer=tok)
    torch.manual_seed(s.seed)
    records = []
    for i, (prompt, shown, ids) in enumerate(zip(prompts, written, all_ids), 1):
        room = context - len(ids)
        n_new = min(s.max_new_tokens, room)
        if n_new < s.max_new_tokens and warn:
            warn(f"note: prompt {i} has {len(ids)} tokens, so only {n_new} new tokens fit the context of {context}")
        x = torch.tensor([ids], device=device)
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, **kw)
        for j, seq in enumerate(out.tolist(), 1):
            new = seq[len(ids):]
            reason = "length" if n_new == s.max_new_tokens else "context"
            cut = next((k for k, t in enumerate(new) if t in eos), None)
            if cut is not None:
                reason = "stop" if tok.convert_ids_to_tokens(new[cut]) in s.stop else "eos"
                new = new[:cut]
            completion = tok.decode(new, skip_special_tokens=False)
            hits = [(completion.find(x), x) for x in s.stop if x in completion]
            if hits:
                completion, reason = completion[: min(hits)[0]], "stop"
            records.append({"prompt_index": i, "sequence": j, "prompt": prompt, "completion": completion,
                            "text": shown + completion, "new_tokens": len(new), "stop_reason": reason})
    return records


def sample_text(model_dir: Path, sample: SampleConfig, seed: int | None = None, template: str = PROMPT_SLOT) -> str:
    """The end-of-run sample: `sample.prompt` (written into the run's prompt template) continued once from an
    exported model folder."""
    trained = load_trained(str(model_dir), "causal_lm", device="cpu")
    s = sample.model_copy(update={"num_sequences": 1, **({"seed": seed} if seed is not None else {})})
    return generate(trained.model, trained.tokenizer, [s.prompt], s, trained.context, template=template)[0]["text"]
