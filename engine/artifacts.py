"""Load what a run produced, for `engine generate`, `engine eval` and `engine classify`.

MODEL may be
- a run folder (`logging.output_dir`: run.json + config.yaml): its exported `model/`, else its `adapter/`;
- an exported model folder (config.json + model.safetensors from save_pretrained; any engine export, including
  the consolidated export of a ZeRO run);
- a LoRA adapter folder (adapter_config.json from peft), loaded onto its base with `PeftModel.from_pretrained`
  and merged for inference. The base is `--base` if given, else the model the adapter records, else - for a run
  that started from `model.init: random` - the same random base rebuilt from the run's config.yaml (same seed,
  same weights);
- a hub id (needs the hub; offline it fails with a one-line error).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.checkpoint import checkpoint_problem, export_model, newest_complete, tokenizer_dir
from engine.config import load_config
from engine.devices import pick_device
from engine.errors import EngineError, ModelLoadError
from engine.families import context_of
from engine.model import build_model, from_pretrained, is_local_path, load_base_model, resize_vocab
from engine.portable import check_names
from engine.resume import checkpoint_layout
from engine.run_dir import ADAPTER_DIR, CONFIG, MODEL_DIR, is_run_dir
from engine.tokenizer import tokenizer_of

TASK_OF_ARCH = {"ForSequenceClassification": "classification", "LMHeadModel": "causal_lm", "ForCausalLM": "causal_lm"}
WHAT = {"causal_lm": "a language model (use engine generate / engine eval)",
        "classification": "a sequence classifier (use engine classify / engine eval)"}


@dataclass
class Trained:
    model: torch.nn.Module
    tokenizer: object
    task: str  # causal_lm | classification
    source: str  # what was loaded, for messages and tables
    run_config: object | None  # the RunConfig of the run folder it came from, if any

    @property
    def context(self) -> int:
        return context_of(self.model.config)


def locate(path: str) -> tuple[str, str, Path | None]:
    """(folder or hub id, kind 'model' | 'adapter' | 'hub', run folder or None)."""
    p = Path(path)
    if p.is_dir():
        if (p / "adapter_config.json").is_file():
            return str(p), "adapter", p.parent if is_run_dir(p.parent) else None
        if (p / "config.json").is_file():
            return str(p), "model", p.parent if is_run_dir(p.parent) else None
        if is_run_dir(p):
            if (p / MODEL_DIR / "config.json").is_file():
                return str(p / MODEL_DIR), "model", p
            if (p / ADAPTER_DIR / "adapter_config.json").is_file():
                return str(p / ADAPTER_DIR), "adapter", p
            raise EngineError(f"{p} is a run folder without an exported model (model/ or adapter/): did the run finish?")
        raise EngineError(f"{p} is not a trained output: expected a run folder, an exported model folder (config.json) "
                          "or a LoRA adapter folder (adapter_config.json)")
    if p.exists():
        raise EngineError(f"{p} is a file: give a model folder, an adapter folder or a run folder")
    if is_local_path(path):
        raise EngineError(f"model folder not found: {p}")
    return path, "hub", None


def _run_config(run_dir: Path | None):
    if run_dir is None:
        return None
    return load_config([run_dir / CONFIG])


def run_config_of(path: str):
    """The RunConfig of the run a trained output came from (None if it is not inside a run folder)."""
    return _run_config(locate(path)[2])


def _task_of_config(config) -> str:
    for arch in getattr(config, "architectures", None) or []:
        for suffix, task in TASK_OF_ARCH.items():
            if arch.endswith(suffix):
                return task
    return "causal_lm"


def _check_task(task: str, want: str | None, what: str) -> None:
    if want is not None and task != want:
        raise EngineError(f"{what} is {WHAT[task]}")


def _auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


def _load(task: str, name: str, **kw):
    return from_pretrained(_auto_class(task).from_pretrained, name, dtype=torch.float32, **kw)


def load_trained(path: str, want_task: str | None = None, base: str | None = None, device: str = "auto") -> Trained:
    """The model (eval mode, fp32, on `device`) and its tokenizer; `want_task` rejects the wrong kind of model."""
    if device == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda: this torch build sees no CUDA GPU; use --device auto or cpu")
    folder, kind, run_dir = locate(path)
    run_cfg = _run_config(run_dir)
    if kind == "adapter":
        trained = _load_adapter(folder, want_task, base, run_cfg)
    else:
        if base is not None:
            raise EngineError(f"--base only applies to a LoRA adapter, and {path} is a full model")
        from transformers import AutoConfig

        task = _task_of_config(from_pretrained(AutoConfig.from_pretrained, folder))
        _check_task(task, want_task, folder)
        trained = Trained(_load(task, folder), tokenizer_of(folder), task, folder, run_cfg)
    trained.model.to(pick_device(device)).eval()
    if trained.task == "causal_lm":
        trained.model.config.use_cache = True  # turned off for training with checkpointing; generation wants it
        if trained.model.config.pad_token_id is None:
            trained.model.config.pad_token_id = trained.tokenizer.pad_token_id
    return trained


def _load_adapter(folder: str, want_task: str | None, base: str | None, run_cfg) -> Trained:
    from peft import PeftConfig, PeftModel

    peft_cfg = PeftConfig.from_pretrained(folder)
    task = "classification" if str(peft_cfg.task_type) in ("SEQ_CLS", "TaskType.SEQ_CLS") else "causal_lm"
    _check_task(task, want_task, folder)
    tok = tokenizer_of(folder)
    head = {}
    if task == "classification":
        # The exported adapter of a classifier carries its model config (label names, pad id) next to it.
        cfg_file = Path(folder) / "config.json"
        if not cfg_file.is_file():
            raise EngineError(f"{folder} has no config.json with the label names of this classifier (export it with "
                              "this engine, or use the merged model folder)")
        c = json.loads(cfg_file.read_text())
        head = {"num_labels": len(c["id2label"]), "id2label": {int(k): v for k, v in c["id2label"].items()},
                "label2id": c["label2id"], "pad_token_id": c.get("pad_token_id"), "ignore_mismatched_sizes": True}
    base_name = base or peft_cfg.base_model_name_or_path
    if base_name:
        model = _load(task, base_name, **head)
        source = f"{folder} on {base_name}"
    elif run_cfg is not None and run_cfg.model.init == "random":
        model = load_base_model(run_cfg, len(tok))  # seeded: the very base the adapter was trained on
        source = f"{folder} on the random base of its run (seed {run_cfg.train.seed})"
    else:
        raise EngineError(f"the base model of adapter {folder} is not recorded: pass --base MODEL")
    resize_vocab(model, len(tok))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    try:
        model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as e:
        raise ModelLoadError(f"adapter {folder} does not fit its base {base_name or '(random init)'}: "
                             f"{str(e).splitlines()[0][:300]}") from None
    return Trained(model, tok, task, source, run_cfg)


# ----------------------------------------------------------------------------- `engine export`


def checkpoint_of(path: str) -> Path:
    """A complete checkpoint folder: `path` itself, or the newest complete one of the run folder `path`."""
    p = Path(path)
    if not p.is_dir():
        raise EngineError(f"checkpoint not found: {p}")
    if is_run_dir(p):
        ckpt = newest_complete(p, warn=print)
        if ckpt is None:
            raise EngineError(f"{p} holds no complete checkpoint")
        return ckpt
    problem = checkpoint_problem(p)
    if problem:
        raise EngineError(f"{p} is not a complete checkpoint: {problem}")
    return p


def export_checkpoint(path: str | Path, out: str | Path | None = None, merge_lora: bool | None = None,
                      replace: bool = False, config=None) -> tuple[Path, dict[str, Path]]:
    """The HF model (and a LoRA run's adapter) from a checkpoint of any layout (one process, DeepSpeed ZeRO-0/1/2/3
    shards of any number of ranks, any precision), in this one process: the one export path, for `engine export`
    and for the end of every run. The run's config (`config`, else its config.yaml) builds the model as an export
    sees it (`build_model(training=False)`: frozen weights as built), and the checkpoint's layout class reads the
    trained weights (the fp32 masters where the run kept them), copied in one tensor at a time. Written into the run
    folder unless it already holds an export (`replace`: the end of a run overwrites its own), or into `out`."""
    ckpt = checkpoint_of(str(path))
    run_dir = ckpt.parent.parent
    if config is None and not (run_dir / CONFIG).is_file():
        raise EngineError(f"{ckpt}: its run folder {run_dir} has no {CONFIG} to rebuild the model from")
    dest = Path(out) if out else run_dir
    if out is None and not replace and any((dest / d).exists() for d in (MODEL_DIR, ADAPTER_DIR)):
        raise EngineError(f"{dest} already holds an export: pass --out DIR to write this one elsewhere")
    cfg = config if config is not None else load_config([run_dir / CONFIG])
    tok = tokenizer_of(str(tokenizer_dir(ckpt)))
    model = build_model(cfg, vocab_size=len(tok), training=False, special_ids={
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})
    weights = checkpoint_layout(ckpt).to_portable(ckpt, with_states=False).weights
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    try:
        check_names(weights, params)
    except ValueError as e:
        raise EngineError(f"{ckpt} does not fit the model its config builds: {e}") from None
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    merge = cfg.checkpoint.export_merged_lora if merge_lora is None else merge_lora
    return ckpt, export_model(model, tok, dest, merge_lora=merge)
