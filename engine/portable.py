"""Training state without a layout: what lets a checkpoint resume on another world size, ZeRO stage or backend.

A checkpoint is written in its backend's own layout (fast, and what an unchanged resume loads). Each layout is a
class beside its backend (`engine.backends`: `TorchLayout`, `InBackwardLayout`, `DeepSpeedLayout`) that writes its
files and reads them back, also into a `PortableState` here: every trainable parameter's fp32 master weight and
optimizer tensors at full shape, by name. The new backend's layout writes its own partitions from it. Nothing is
rounded or recomputed on the way, so masters and moments arrive bit for bit.

This module holds only what is common to the layouts, with no file names: the state, the merge rules of DeepSpeed's
ZeRO partitions (those of `zero_to_fp32`, checked against it in the tests) applied to every state tensor, not only
to the weights, and the reading of a torch optimizer's state by parameter name.

Why not DeepSpeed's universal checkpoint: `ds_to_universal` targets Megatron-style (tp/pp) checkpoints and covers
neither the torch backend nor the in-backward optimizer.

Portable optimizer states are the element-wise ones (AdamW's exp_avg / exp_avg_sq, and their step count).
bitsandbytes' 8-bit states move too between the torch backend's two optimizers (one per parameter either way);
quantized states inside DeepSpeed's flat partitions do not (their blocks straddle parameters).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from engine.errors import EngineError


class NotPortable(EngineError):
    """The checkpoint's optimizer state cannot be moved to another layout (its weights can)."""


ELEMENTWISE_STATES = ("exp_avg", "exp_avg_sq")


@dataclass
class PortableState:
    """Trainable weights and optimizer state by parameter name (names of the unwrapped transformers/peft model).
    `weights` may read each tensor only when it is asked for (`LazyTensors`): a whole model is never held twice."""

    weights: Mapping[str, torch.Tensor]
    states: dict[str, dict[str, torch.Tensor]]  # name -> {"step": scalar, "exp_avg": ..., ...} at the weight's shape
    scheduler_steps: int  # steps the learning-rate schedule has taken
    source: str  # the layout it was read from, for messages


def merge_zero12(flats: list[list[torch.Tensor]], shapes: list[dict], paddings: list | None) -> dict[str, torch.Tensor]:
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


def merge_zero3(flats: list[list[torch.Tensor]], shapes: list[dict], world: int) -> dict[str, torch.Tensor]:
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


class LazyTensors(Mapping):
    """Tensors by name, each read when it is asked for (`read(name)`), e.g. from a safetensors file: loading a
    checkpoint into a model then holds one extra tensor at a time, not a second copy of the model."""

    def __init__(self, names: list[str], read: Callable[[str], torch.Tensor]):
        self._names, self._known, self._read = list(names), set(names), read

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        return self._read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def check_names(have, want, what: str = "checkpoint weights") -> None:
    """The same parameter names on both sides, or a ValueError naming a few of each difference."""
    have, want = set(have), set(want)
    if have != want:
        missing, extra = sorted(want - have)[:3], sorted(have - want)[:3]
        raise ValueError(f"{what} do not match this model (missing {missing}, unexpected {extra})")
