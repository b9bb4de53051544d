"""Text generation from a trained output: `engine generate` and the end-of-run sample.

Decoding is transformers' `generate` with the KV cache on (each new token attends to cached keys/values
instead of re-running the whole prefix): greedy or sampling (temperature, top-k, top-p), repetition penalty,
stop strings (transformers' StopStringCriteria; a stop string that is one token, such as an added `<EOS>`,
also ends generation as an EOS token does) and several sequences per prompt. The generated text is cut
before the first stop string. Settings come from one schema, `SampleConfig` (`sample:` in a run config), which
also gives the CLI its flags and help.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from engine.config import SampleConfig
from engine.errors import ConfigError, EngineError

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


@torch.no_grad()
def generate(model, tok, prompts: list[str], s: SampleConfig, context: int | None = None, warn=None) -> list[dict]:
    """Continue each prompt `s.num_sequences` times. One record per sequence:
    prompt, completion (cut before a stop string), text (= prompt + completion), new_tokens, stop_reason."""
    if s.max_new_tokens < 1:
        raise ConfigError("max_new_tokens must be at least 1 to generate anything")
    context = context or int(getattr(model.config, "n_positions", 1024))
    all_ids = check_prompts(prompts, tok, context)
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
    for i, (prompt, ids) in enumerate(zip(prompts, all_ids), 1):
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
                            "text": prompt + completion, "new_tokens": len(new), "stop_reason": reason})
    return records


def sample_text(model_dir: Path, sample: SampleConfig, seed: int | None = None) -> str:
    """The end-of-run sample: `sample.prompt` continued once from an exported model folder."""
    from engine.artifacts import load_trained

    trained = load_trained(str(model_dir), "causal_lm", device="cpu")
    s = sample.model_copy(update={"num_sequences": 1, **({"seed": seed} if seed is not None else {})})
    return generate(trained.model, trained.tokenizer, [s.prompt], s, trained.context)[0]["text"]


# ----------------------------------------------------------------------------- engine generate

# SampleConfig field -> (flag, argparse kwargs); help text is the field's description.
_FLAGS = {
    "max_new_tokens": ("--max-new-tokens", {"type": int, "metavar": "N"}),
    "greedy": ("--greedy", {"action": "store_true", "default": None}),
    "temperature": ("--temperature", {"type": float, "metavar": "T"}),
    "top_k": ("--top-k", {"type": int, "metavar": "K"}),
    "top_p": ("--top-p", {"type": float, "metavar": "P"}),
    "repetition_penalty": ("--repetition-penalty", {"type": float, "metavar": "R"}),
    "stop": ("--stop", {"action": "append", "metavar": "TEXT"}),
    "num_sequences": ("--num-sequences", {"type": int, "metavar": "N"}),
    "seed": ("--seed", {"type": int}),
}


def add_generate_args(p) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="a run folder (logging.output_dir; its sample: settings are the defaults), an exported model "
                        "folder (also a ZeRO run's export), or a LoRA adapter folder (loaded on its base)")
    p.add_argument("--prompt", "-p", action="append", default=None, metavar="TEXT",
                   help="a prompt; repeat for several (default: the run's sample.prompt, else 'Once upon a time')")
    p.add_argument("--prompts-file", metavar="FILE", help="more prompts: one per line (.txt) or a 'prompt' field per "
                   "line (.jsonl); blank lines are skipped")
    fields = SampleConfig.model_fields
    for name, (flag, kw) in _FLAGS.items():
        default = fields[name].get_default(call_default_factory=True)
        shown = "" if kw.get("action") == "store_true" else f" (default {default!r})"
        p.add_argument(flag, dest=name, help=(fields[name].description or "") + shown, **{"default": None, **kw})
    p.add_argument("--output", "-o", choices=("text", "jsonl"), default="text",
                   help="text: the prompt and its continuation; jsonl: one object per sequence (prompt, completion, "
                        "text, new_tokens, stop_reason)")
    p.add_argument("--base", metavar="MODEL", help="base model of a LoRA adapter (default: the one recorded with it)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")


def _read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise EngineError(f"--prompts-file: file not found: {p}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise EngineError(f"--prompts-file: {p} is not UTF-8 text") from None
    if p.suffix.lower() == ".jsonl":
        out = []
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EngineError(f"--prompts-file: {p} line {n}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                    raise EngineError(f"--prompts-file: {p} line {n}: no string 'prompt' field")
                out.append(obj["prompt"])
    else:
        out = [line for line in lines if line.strip()]
    if not out:
        raise EngineError(f"--prompts-file: {p} has no prompts")
    return out


def sample_settings(args, run_sample: SampleConfig | None) -> SampleConfig:
    """The run's `sample:` section (if MODEL is a run folder) overridden by the flags given, validated."""
    from pydantic import ValidationError

    given = {k: getattr(args, k) for k in _FLAGS if getattr(args, k) is not None}
    base = run_sample.model_dump() if run_sample is not None else {}
    if base.get("max_new_tokens") == 0:  # the run only switched its end-of-run sample off
        base.pop("max_new_tokens")
    if given.get("greedy"):  # the run's sampling settings do not apply to greedy decoding
        for k in (*SAMPLING_ONLY, "num_sequences"):
            base.pop(k, None)
    try:
        return SampleConfig.model_validate({**base, **given})
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        flag = _FLAGS[key][0] if key in _FLAGS else key
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{flag}: {msg}" if key else msg) from None


def run_generate_cli(args) -> int:
    from engine.artifacts import load_trained, run_config_of

    # Settings and prompts first: a typo costs no model load.
    run_cfg = run_config_of(args.model) if Path(args.model).joinpath("run.json").is_file() else None
    s = sample_settings(args, run_cfg.sample if run_cfg is not None else None)
    if s.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be at least 1")
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += _read_prompts(args.prompts_file)
    if not prompts:
        prompts = [s.prompt]
    trained = load_trained(args.model, "causal_lm", base=args.base, device=args.device)
    records = generate(trained.model, trained.tokenizer, prompts, s, trained.context,
                       warn=lambda m: print(m, file=sys.stderr))
    for r in records:
        if args.output == "jsonl":
            print(json.dumps(r, ensure_ascii=False), flush=True)
        else:
            if len(records) > 1:
                print(f"### prompt {r['prompt_index']}/{len(prompts)}, sequence {r['sequence']}/{s.num_sequences} "
                      f"({r['new_tokens']} new tokens, {r['stop_reason']})")
            print(r["text"], flush=True)
            if len(records) > 1:
                print()
    return 0
