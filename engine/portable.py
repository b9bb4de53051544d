"""Training state without a layout: what lets a checkpoint resume on another world size, ZeRO stage or backend.

A checkpoint is written in its backend's own layout (fast, and what an unchanged resume loads): DeepSpeed's ZeRO
shards (one flat fp32 partition per rank and parameter group, Adam's moments in the same layout), or the torch
backend's safetensors weights and optimizer state. When the layout changes, the checkpoint is read into a
`PortableState` — every trainable parameter's fp32 master weight and optimizer tensors at full shape, by name — and
the new backend writes its own partitions from it. Nothing is rounded or recomputed on the way, so masters and
moments arrive bit for bit.

Why not DeepSpeed's universal checkpoint: `ds_to_universal` targets Megatron-style (tp/pp) checkpoints and covers
neither the torch backend nor the in-backward optimizer; the merge below is DeepSpeed's own ZeRO partitioning
rules (those of `zero_to_fp32`, checked against it in tests/test_portable.py) applied to every state tensor, not
only to the weights, and the load side is DeepSpeed's public `safe_set_full_*` API.

Portable optimizer states are the element-wise ones (AdamW's exp_avg / exp_avg_sq, and their step count).
bitsandbytes' 8-bit states move too between the torch backend's two optimizers (one per parameter either way);
quantized states inside DeepSpeed's flat partitions do not (their blocks straddle parameters).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.errors import EngineError

DS_TAG = "deepspeed"
PARAM_NAMES = "param_names.json"  # ZeRO-0: the client optimizer's parameters by name, in its order


class NotPortable(EngineError):
    """The checkpoint's optimizer state cannot be moved to another layout (its weights can)."""


ELEMENTWISE_STATES = ("exp_avg", "exp_avg_sq")


@dataclass
class PortableState:
    """Trainable weights and optimizer state by parameter name (names of the unwrapped transformers/peft model)."""

    weights: dict[str, torch.Tensor]
    states: dict[str, dict[str, torch.Tensor]]  # name -> {"step": scalar, "exp_avg": ..., ...} at the weight's shape
    scheduler_steps: int  # steps the learning-rate schedule has taken
    source: str  # the layout it was read from, for messages


def _ds_globals() -> list:
    """The DeepSpeed classes inside its optimizer shards that a weights-only load must be allowed to rebuild."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_deepspeed_file(path: Path) -> dict:
    """One file of a DeepSpeed checkpoint, weights-only (its few DeepSpeed classes allowed by name)."""
    with torch.serialization.safe_globals(_ds_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def deepspeed_shards(ckpt: Path) -> tuple[list[Path], list[Path]]:
    """(model-state files, optimizer shards) of a DeepSpeed checkpoint, every rank's shard present or a one-line error
    naming the missing one."""
    d = ckpt / DS_TAG
    optim = sorted(d.glob("*_optim_states.pt"), key=lambda p: _rank_of(p.name))
    model = sorted(d.glob("*model_states.pt"), key=lambda p: _rank_of(p.name))
    if not model:
        raise EngineError(f"{ckpt}: no DeepSpeed model states in {d}")
    if not optim:  # ZeRO-0: the whole optimizer state is in the model-state file
        return model, []
    world = load_deepspeed_file(optim[0])["optimizer_state_dict"]["partition_count"]
    world = max(world) if isinstance(world, list) else int(world)
    ranks = {_rank_of(p.name) for p in optim}
    missing = [r for r in range(world) if r not in ranks]
    if missing:
        raise EngineError(f"{ckpt}: the checkpoint was written by {world} ranks but rank {missing[0]}'s shard "
                          f"({d}/zero_pp_rank_{missing[0]}_mp_rank_00_optim_states.pt) is missing")
    return model, optim


def _rank_of(name: str) -> int:
    parts = name.split("_")
    return int(parts[parts.index("rank") + 1]) if "rank" in parts and parts[0] == "zero" else 0


def _merge_zero12(flats: list[list[torch.Tensor]], shapes: list[dict], paddings: list | None) -> dict[str, torch.Tensor]:
    """ZeRO-1/2: each group's parameters are flattened in order (each followed by its alignment padding), and the
    flat vector is cut into equal partitions, one per rank."""
    out = {}
    for g, group_shapes in enumerate(shapes):
        full = torch.cat([rank[g] for rank in flats])
        offset = 0
        for i, (name, shape) in enumerate(group_shapes.items()):
            n = math.prod(shape)
            out[name] = full.narrow(0, offset, n).view(tuple(shape)).clone()
            offset += n + (paddings[g][i] if paddings else 0)
    return out


def _merge_zero3(flats: list[list[torch.Tensor]], shapes: list[dict], world: int) -> dict[str, torch.Tensor]:
    """ZeRO-3: every parameter is cut into `world` equal pieces (the last padded); a rank's flat vector holds its
    piece of each parameter, in order."""
    per_rank = [torch.cat(rank) for rank in flats]
    out, offset = {}, 0
    for group_shapes in shapes:
        for name, shape in group_shapes.items():
            n = math.prod(shape)
            piece = math.ceil(n / world)
            out[name] = torch.cat([r.narrow(0, offset, piece) for r in per_rank])[:n].view(tuple(shape)).clone()
            offset += piece
    return out


def read_deepspeed(ckpt: Path, with_states: bool = True) -> PortableState:
    model_files, optim_files = deepspeed_shards(ckpt)
    model_state = load_deepspeed_file(model_files[0])
    if not optim_files:
        return _read_deepspeed_zero0(ckpt, model_state, with_states)
    shards = [load_deepspeed_file(p)["optimizer_state_dict"] for p in optim_files]
    stage = int(shards[0]["zero_stage"])
    shapes = model_state["param_shapes"]
    world = len(shards)
    base = [s["base_optimizer_state"] if stage <= 2 else s["optimizer_state_dict"] for s in shards]

    def merge(per_rank_groups: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        if stage <= 2:
            return _merge_zero12(per_rank_groups, shapes, shards[0].get("param_alignment_paddings"))
        return _merge_zero3(per_rank_groups, shapes, world)

    flat_key = "single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"
    weights = merge([s[flat_key] for s in shards])
    groups = range(len(shapes))
    first = base[0]["state"]
    keys = sorted(first[0]) if 0 in first and with_states else []
    not_portable = [k for k in keys if k != "step" and k not in ELEMENTWISE_STATES]
    if not_portable:
        raise NotPortable(f"its optimizer state {not_portable} inside DeepSpeed's flat partitions cannot be "
                          "re-partitioned (only AdamW's element-wise moments can)")
    states: dict[str, dict[str, torch.Tensor]] = {name: {} for name in weights}
    for key in (k for k in keys if k != "step"):
        for name, t in merge([[b["state"][g][key] for g in groups] for b in base]).items():
            states[name][key] = t
    for g in groups if keys else ():
        step = first[g]["step"]
        for name in shapes[g]:
            states[name]["step"] = step.clone() if isinstance(step, torch.Tensor) else torch.tensor(float(step))
    states = {name: st for name, st in states.items() if st}
    sched = model_state.get("lr_scheduler") or {}
    return PortableState(weights, states, int(sched.get("last_epoch", model_state.get("global_steps", 0))),
                         f"DeepSpeed ZeRO-{stage} on {world} rank(s)")


def _read_deepspeed_zero0(ckpt: Path, model_state: dict, with_states: bool) -> PortableState:
    """DeepSpeed without ZeRO (data parallel, fp32): whole weights and the client optimizer's own state dict in the
    model-state file; the parameters' names in the optimizer's order are in param_names.json (written with it)."""
    names_file = ckpt / DS_TAG / PARAM_NAMES
    if model_state.get("optimizer") is None or not names_file.is_file():
        raise NotPortable("this DeepSpeed ZeRO-0 checkpoint does not name its optimizer's parameters (16-bit, or "
                          "written before they were named)")
    names = json.loads(names_file.read_text(encoding="utf-8"))
    weights = {n: model_state["module"][n].float() for group in names for n in group}
    states = states_by_name(model_state["optimizer"], names) if with_states else {}
    sched = model_state.get("lr_scheduler") or {}
    return PortableState(weights, states, int(sched.get("last_epoch", model_state.get("global_steps", 0))),
                         "DeepSpeed ZeRO-0")


BNB_PACKED = "__bnb_optimizer_quant_state__"  # bitsandbytes' state_dict nests its quantized tensors under this key


def unpacked(state: dict) -> dict:
    """One parameter's optimizer state as the optimizer holds it (bitsandbytes' state_dict packs the quantized
    tensors into one nested dict; its own load unpacks them, and so does this)."""
    state = dict(state)
    state.update(state.pop(BNB_PACKED, {}))
    return state


def states_by_name(opt_state: dict, names: list[list[str]]) -> dict[str, dict[str, torch.Tensor]]:
    """A torch optimizer's state dict (keyed by position in its groups) keyed by parameter name instead."""
    order = [i for g in opt_state["param_groups"] for i in g["params"]]
    by_index = dict(zip(order, [n for group in names for n in group]))
    return {by_index[i]: unpacked(st) for i, st in opt_state["state"].items()}


def read_torch(ckpt: Path, with_states: bool = True) -> PortableState:
    """The torch backend's checkpoint (plain optimizer or one optimizer per parameter) by parameter name."""
    weights = load_file(str(ckpt / "trainable.safetensors"))
    saved = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    opt = saved["optimizer"]
    in_backward = "optimizers" in opt  # optimizer in backward: {name (or name#piece): one optimizer's state dict}
    steps = int(saved["steps_done"] if in_backward else saved["scheduler"]["last_epoch"])
    source = "the single-device torch backend"
    if not with_states:
        return PortableState(weights, {}, steps, source)
    if in_backward:
        if any("#" in k for k in opt["optimizers"]):
            raise NotPortable("its optimizer was stepped in pieces (bf16 weights, Adafactor or 4-bit AdamW), which only "
                              "the optimizer-in-backward path reads")
        states = {name: unpacked(next(iter(sd["state"].values()), {})) for name, sd in opt["optimizers"].items()}
    else:
        names = saved.get("param_names")
        if names is None:
            raise NotPortable("it was written before checkpoints named their optimizer's parameters")
        states = states_by_name(opt, names)
    return PortableState(weights, states, steps, source)


def read_portable(ckpt: Path, with_states: bool = True) -> PortableState:
    """Any checkpoint of the engine, read into a `PortableState` (`with_states=False`: weights and schedule only)."""
    if (ckpt / DS_TAG).is_dir():
        return read_deepspeed(ckpt, with_states)
    if (ckpt / "trainable.safetensors").is_file():
        return read_torch(ckpt, with_states)
    raise EngineError(f"{ckpt}: neither DeepSpeed shards nor the torch backend's trainable.safetensors are in it")
