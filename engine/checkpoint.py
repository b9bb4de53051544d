"""Resumable checkpoints (atomic directory rename, manifest written last) and the HF-format export."""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from engine.errors import EngineError
from engine.model import merged_copy, unwrap
from engine.run_dir import ADAPTER_DIR, CHECKPOINTS_DIR, MODEL_DIR

MANIFEST = "manifest.json"
PREFIX = "step-"
TRAINER_STATE = "trainer_state.json"  # the recipe's position, guards, layout (`read_trainer_state`)
TOKENIZER_DIR = "tokenizer"
RNG_FILE = "rng-rank{rank}.pt"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def py_rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": repr(random.getstate()), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def set_py_rng_state(st: dict) -> None:
    random.setstate(ast.literal_eval(st["python"]))
    n = st["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(backend, step: int, trainer_state: dict, output_dir: str | Path, keep_last: int,
                    keep: set[str] | None = None, tokenizer=None) -> Path:
    """All ranks write into step-N.tmp; after a barrier rank 0 fsyncs, renames it and writes the manifest last.
    The tokenizer is saved with it (its fingerprint is in the trainer state's layout and checked on resume)."""
    root = checkpoints_dir(output_dir)
    final = root / checkpoint_name(step)
    tmp = root / f"{checkpoint_name(step)}.tmp"
    rank = backend.dist.rank
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    backend.barrier()
    backend.save(tmp)
    torch.save(rng_state(), tmp / RNG_FILE.format(rank=rank))
    backend.barrier()
    if rank == 0:
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        write_json_atomic(tmp / TRAINER_STATE, {**trainer_state, "py_rng": py_rng_state()})
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        for f in files:
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        # Written last: a checkpoint without a manifest that lists every file at its size is not complete.
        write_json_atomic(final / MANIFEST, {"step": step, "files": files, "time": time.time()})
        prune(root, keep_last, keep or set())
    backend.barrier()
    return final


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` is not a complete checkpoint (None if it is): the manifest is written last and lists every file
    with its size; entries must stay inside the checkpoint folder."""
    m = ckpt / MANIFEST
    if not m.is_file():
        return f"no {MANIFEST} (the save did not finish)"
    try:
        files = json.loads(m.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{MANIFEST} is not valid"
    if isinstance(files, list):  # manifests written before sizes were recorded
        files = {f: None for f in files}
    if not isinstance(files, dict):
        return f"{MANIFEST} is not valid"
    root = ckpt.resolve()
    for name, size in files.items():
        path = (ckpt / str(name)).resolve()
        if not path.is_relative_to(root):
            return f"{MANIFEST} lists {name!r}, a path outside the checkpoint folder"
        if not path.is_file():
            return f"{name} is missing"
        if size is not None and path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, the manifest says {size} (truncated or changed)"
    return None


def is_complete(ckpt: Path) -> bool:
    return checkpoint_problem(ckpt) is None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(".tmp"))


def newest_complete(output_dir: str | Path, warn=print) -> Path | None:
    for ckpt in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        warn(f"warning: skipping checkpoint {ckpt}: {problem}")
    return None


def prune(root: Path, keep_last: int, keep: set[str]) -> None:
    complete = [p for p in sorted(root.iterdir()) if p.is_dir() and p.name.startswith(PREFIX) and is_complete(p)]
    for p in complete[:-keep_last]:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


def resolve_resume(resume: bool | str, output_dir: str | Path, warn=print) -> Path | None:
    if resume is False or resume is None:
        return None
    if resume is True or resume == "latest":
        return newest_complete(output_dir, warn)
    p = Path(resume)
    if not p.is_dir():
        raise EngineError(f"checkpoint.resume: {p} is not a checkpoint folder")
    problem = checkpoint_problem(p)
    if problem:
        raise EngineError(f"checkpoint.resume: {p} is incomplete or corrupt: {problem}")
    return p


def read_trainer_state(ckpt: Path) -> dict:
    """A checkpoint's trainer state (step, data position, guards, the run layout it was saved with); a one-line error
    when it cannot be read."""
    try:
        return json.loads((ckpt / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EngineError(f"{ckpt}: its {TRAINER_STATE} is unreadable ({e})") from None


def load_trainer_state(ckpt: Path, rank: int) -> dict:
    """`read_trainer_state`, and this rank's RNG streams (torch, CUDA, Python, numpy) set as they were saved."""
    state = read_trainer_state(ckpt)
    rng_file = ckpt / RNG_FILE.format(rank=rank)
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    set_py_rng_state(state.pop("py_rng"))
    return state


def tokenizer_dir(ckpt: Path) -> Path:
    """Where a checkpoint keeps the run's tokenizer."""
    return ckpt / TOKENIZER_DIR


# ----------------------------------------------------------------------------- HF export


def export_model(model, tokenizer, out_dir: Path, merge_lora: bool = True) -> dict[str, Path]:
    """Save the (unwrapped, full-weight) model in HF format with safetensors; LoRA as a peft adapter (+ merged).

    Returns the folders written: "model" (loadable by AutoModelForCausalLM) and, for LoRA, "adapter".
    """
    model = unwrap(model)
    written: dict[str, Path] = {}
    is_peft = hasattr(model, "peft_config")
    if is_peft:
        adapter_dir = out_dir / ADAPTER_DIR
        model.save_pretrained(str(adapter_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(adapter_dir))
        if getattr(model.peft_config["default"], "task_type", None) == "SEQ_CLS":
            unwrap(model, through_peft=True).config.save_pretrained(str(adapter_dir))  # label names and pad id of the head
        written["adapter"] = adapter_dir
        if not merge_lora:
            return written
        # Merge into a CPU copy so the training model (and its adapters) is left as it was.
        model = merged_copy(model)
    model_dir = out_dir / MODEL_DIR
    base = unwrap(model, through_peft=True)
    use_cache = base.config.use_cache
    base.config.use_cache = True  # turned off for training only
    try:
        state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu() for k, v in base.state_dict().items()}
        base.save_pretrained(str(model_dir), state_dict=state, safe_serialization=True)
    finally:
        base.config.use_cache = use_cache
    tokenizer.save_pretrained(str(model_dir))
    written["model"] = model_dir
    return written
