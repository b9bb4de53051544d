"""`engine generate`: text from a trained model; flags and help from `SampleConfig`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import ValidationError

from engine.artifacts import load_trained, run_config_of
from engine.config import SampleConfig
from engine.errors import ConfigError, EngineError
from engine.generate import SAMPLING_ONLY, check_template, generate
from engine.records import PROMPT_SLOT
from engine.run_dir import RUN_MARKER

NAME = "generate"
HELP = ('write text with a trained model (full model, ZeRO export or LoRA adapter): greedy or sampling, stop '
        'strings, several sequences; text or JSONL')


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


def add_arguments(p) -> None:
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
    p.add_argument("--prompt-template", metavar="TEMPLATE", default=None,
                   help="write each prompt into this template first ({prompt} is replaced), as prompt/completion "
                        "training did (default: the run's data.prompt_template when it trained on prompt/completion "
                        "pairs, else the prompt as given)")
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


def prompt_template(args) -> str:
    """--prompt-template, else the template the model was trained with (a run folder, its model/ or adapter/)."""
    if args.prompt_template is not None:
        return check_template(args.prompt_template)
    trained_in = run_config_of(args.model)
    if trained_in is not None and trained_in.data.prompt_field is not None:
        return trained_in.data.prompt_template
    return PROMPT_SLOT


def run(args) -> int:
    # Settings and prompts first: a typo costs no model load.
    run_cfg = run_config_of(args.model) if Path(args.model).joinpath(RUN_MARKER).is_file() else None
    s = sample_settings(args, run_cfg.sample if run_cfg is not None else None)
    if s.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be at least 1")
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += _read_prompts(args.prompts_file)
    if not prompts:
        prompts = [s.prompt]
    template = prompt_template(args)
    trained = load_trained(args.model, "causal_lm", base=args.base, device=args.device)
    records = generate(trained.model, trained.tokenizer, prompts, s, trained.context,
                       warn=lambda m: print(m, file=sys.stderr), template=template)
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
