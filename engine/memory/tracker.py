"""Live tensor memory by category, tracked at the dispatcher: works with real and fake tensors,
with activation checkpointing (modules re-entered in backward), on CPU and CUDA.

torch's `MemTracker` attributes memory through module hooks and refuses a module that runs twice
in one iteration, which is what checkpoint recompute does. This tracker needs no module hooks: it
sees every storage an op creates, tags it by the phase that created it, re-tags gradients (post-
accumulate hooks) and optimizer state (optimizer step hooks), and frees it when the storage dies.

Categories at the peak:
  parameters   model parameters and buffers (registered up front)
  gradients    `.grad` storages
  optimizer    tensors held in `optimizer.state` after a step
  activations  created in forward and still alive (saved for backward, outputs, logits)
  temporaries  created in backward (incl. checkpoint recompute) or inside the optimizer step
  other        (reserved: tensors registered from outside the model and optimizer)
"""

from __future__ import annotations

import math
import weakref
from collections import Counter

import torch
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from engine.model import quant_state_tensors, unwrap

CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporaries", "other")
CUDA_BLOCK = 512  # the caching allocator rounds every block up to 512 bytes


def in_backward() -> bool:
    """True while autograd runs a backward pass (checkpoint recompute included)."""
    return torch._C._current_graph_task_id() != -1


class MemoryTracker(TorchDispatchMode):
    """`with MemoryTracker() as mt: ...` then `mt.peak`, `mt.peak_breakdown` (bytes).

    `round_to` models an allocator's granularity (CUDA_BLOCK when predicting a GPU). `weights`: the share of a
    category's bytes that counts towards the peak (the ZeRO simulation counts none of the full parameters, which
    it replaces by partitions of fixed size, and 1/N of the gradients, which ranks reduce into partitions).
    """

    def __init__(self, round_to: int = 1, weights: dict[str, float] | None = None):
        super().__init__()
        self.round_to = round_to
        self.weights = weights or {}  # category -> share of its bytes that counts towards the peak (default 1)
        self._live: dict[int, list] = {}  # storage key -> [bytes, category, weakref]
        self.current: Counter = Counter()
        self.peak = 0
        self.peak_breakdown: dict[str, int] = {c: 0 for c in CATEGORIES}
        self._in_opt = False
        self._handles: list = []
        self._optimizers: list = []
        # Optional phase label (set from outside, e.g. by the simulator's layer hooks): the peak is also kept per
        # phase, so a peak can be extrapolated phase by phase (memory within a phase is linear in depth).
        self.phase: str | None = None  # outside backward
        self.bwd_phase: str | None = None  # inside backward
        self.phase_peaks: dict[str, tuple[int, dict[str, int]]] = {}

    # -- bookkeeping
    def _bytes(self, st) -> int:
        n = st.nbytes()
        return math.ceil(n / self.round_to) * self.round_to if self.round_to > 1 else n

    def _add(self, st, category: str) -> None:
        key = st._cdata
        entry = self._live.get(key)
        nbytes = self._bytes(st)
        if entry is not None:
            if entry[0] != nbytes:  # resized storage
                self.current[entry[1]] += nbytes - entry[0]
                entry[0] = nbytes
            return
        if nbytes == 0:
            return
        ref = weakref.ref(st, lambda _r, k=key: self._drop(k))
        self._live[key] = [nbytes, category, ref]
        self.current[category] += nbytes
        self._update_peak()

    def _drop(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current[entry[1]] -= entry[0]

    def tag(self, t: torch.Tensor, category: str) -> None:
        """File `t`'s storage under `category` (tracked from now on if it was not)."""
        self._retag(t, category)

    def _retag(self, t: torch.Tensor, category: str) -> None:
        for st in get_untyped_storages(t):
            entry = self._live.get(st._cdata)
            if entry is None:
                self._add(st, category)
            elif entry[1] != category:
                self.current[entry[1]] -= entry[0]
                self.current[category] += entry[0]
                entry[1] = category
        self._update_peak()

    def _update_peak(self) -> None:
        total = int(sum(v * self.weights.get(c, 1) for c, v in self.current.items()))
        if total > self.peak:
            self.peak = total
            self.peak_breakdown = {c: self.current.get(c, 0) for c in CATEGORIES}
        if self.phase is not None:
            key = self.bwd_phase if in_backward() else ("step" if self._in_opt else self.phase)
            if total > self.phase_peaks.get(key, (-1,))[0]:
                self.phase_peaks[key] = (total, {c: self.current.get(c, 0) for c in CATEGORIES})

    @property
    def current_total(self) -> int:
        return sum(self.current.values())

    # -- registration of what exists before tracking starts
    def track_model(self, model: torch.nn.Module) -> None:
        for p in model.parameters():
            self._retag(p, "parameters")
            for t in quant_state_tensors(p):  # a 4-bit weight's block scales
                self._retag(t, "parameters")
            if p.grad is not None:
                self._retag(p.grad, "gradients")
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook))
        for b in model.buffers():
            self._retag(b, "parameters")

    def _grad_hook(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self._retag(p.grad, "gradients")

    def track_optimizer(self, optimizer) -> None:
        self._optimizers.append(optimizer)
        self._tag_states(optimizer)

    def _tag_states(self, optimizer) -> None:
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    self._retag(v, "optimizer")

    def refresh_optimizers(self) -> None:
        """File the states of every tracked optimizer as "optimizer": states created outside a hooked step (the
        in-backward optimizers step from gradient hooks) are otherwise counted where they were allocated."""
        for opt in self._optimizers:
            self._tag_states(opt)

    def track_backend(self, backend) -> None:
        """The model, the optimizers and what they hold in attributes (ZeRO's fp32 partitions live there)."""
        self.track_model(unwrap(backend.model))  # the module under a DeepSpeed engine
        for opt in backend.optimizers():
            self.track_optimizer(opt)
            self.track_attributes(opt, "optimizer")

    def track_attributes(self, obj, category: str, depth: int = 2) -> None:
        """Register tensors held in `obj`'s attributes (lists/dicts too, `depth` levels): e.g. DeepSpeed's ZeRO
        optimizer keeps its fp32 partitions and flat buffers there, created before tracking started."""
        seen: set[int] = set()

        def walk(x, d):
            if id(x) in seen or d < 0:
                return
            seen.add(id(x))
            if isinstance(x, torch.Tensor):
                if x.device.type != "meta" and not self._known(x):
                    self._retag(x, category)
            elif isinstance(x, (list, tuple)):
                for v in x:
                    walk(v, d - 1)
            elif isinstance(x, dict):
                for v in x.values():
                    walk(v, d - 1)
            elif hasattr(x, "__dict__") and d > 0 and not isinstance(x, torch.nn.Module):
                for v in vars(x).values():
                    walk(v, d - 1)

        walk(obj, depth)

    def _known(self, t: torch.Tensor) -> bool:
        return all(st._cdata in self._live for st in get_untyped_storages(t))

    # -- the mode
    def __enter__(self):
        def pre(opt, args, kwargs):
            self._in_opt = True

        def post(opt, args, kwargs):
            self._in_opt = False
            self._tag_states(opt)

        self._handles += [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
        return super().__enter__()

    def __exit__(self, *args):
        for h in self._handles:
            h.remove()
        self._handles = []
        return super().__exit__(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        category = "temporaries" if (self._in_opt or in_backward()) else "activations"
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                for st in get_untyped_storages(t):
                    self._add(st, category)
        return out

    def summary(self, unit: int = 2**20) -> dict[str, float]:
        d = {f"{c}_mib": round(v / unit, 3) for c, v in self.peak_breakdown.items()}
        d["peak_mib"] = round(self.peak / unit, 3)
        return d
