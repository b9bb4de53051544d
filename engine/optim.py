"""Optimizers (torch AdamW, bitsandbytes 8-bit AdamW, torchao 4-bit AdamW, transformers' Adafactor,
DeepSpeedCPUAdam), the optimizer-in-backward driver and the warmup+decay schedule."""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from engine.config import BNB_OPTIMIZERS, OptimConfig, ScheduleConfig
from engine.portable import NotPortable, unpacked


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; biases, LayerNorm and (for GPT-2's Conv1D too) 1-D params are not decayed."""
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim
        (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str = "cpu") -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adamw":
        # The fused kernel updates each tensor in place: no temporaries. torch's default on CUDA is the foreach
        # kernel, whose sqrt(exp_avg_sq) alone is a second full copy of the state (+4 B/param at the step's peak).
        return torch.optim.AdamW(groups, fused=True, **kw)
    if cfg.name in BNB_OPTIMIZERS:
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if cfg.name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        with warnings.catch_warnings():
            # bitsandbytes warns once per state that paging is CUDA-only and falls back: expected on CPU.
            warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
            return cls(groups, **kw)
    if cfg.name == "adamw_4bit":
        # torchao: both Adam moments in 4 bits (block-wise, Li et al. 2023); its step is torch.compile'd once per
        # parameter shape (seconds each, on the first step).
        from torchao.optim import AdamW4bit

        return AdamW4bit(groups, **kw)
    if cfg.name == "adafactor":
        # Factored second moment (a row and a column vector per matrix), no first moment (beta1=None): ~0 B/param
        # of state. Fixed lr (the engine's schedule drives it), update clipping at RMS 1 (Shazeer & Stern 2018).
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=cfg.lr, beta1=None, clip_threshold=1.0, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    if cfg.name == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    raise ValueError(cfg.name)


def compiles_its_step(optimizer) -> bool:
    return type(optimizer).__module__.startswith("torchao")


def step_context(optimizer):
    """Where `optimizer.step()` may run. torch.compile cannot trace under a Python dispatch mode (the memory tracker
    of `logging.track_memory` / `engine.memory.measure`), so torchao's compiled step runs outside it: the tracker's
    step hook still files the states it creates; the step itself is one in-place kernel per parameter."""
    return _disable_current_modes() if compiles_its_step(optimizer) else contextlib.nullcontext()


def run_step(optimizer) -> None:
    with step_context(optimizer):
        optimizer.step()


def lr_lambda(total_steps: int, sched: ScheduleConfig):
    """Multiplier of the base lr at optimizer step `s` (0-based): linear warmup, then cosine/linear decay."""
    warm = min(sched.warmup_steps, max(total_steps - 1, 0))
    floor = sched.min_lr_ratio

    def f(s: int) -> float:
        if warm and s < warm:
            return (s + 1) / warm
        if sched.decay == "constant" or total_steps <= warm:
            return 1.0
        t = min(1.0, (s - warm + 1) / (total_steps - warm))  # step `warm` is already past the peak
        if sched.decay == "linear":
            return floor + (1 - floor) * (1 - t)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, sched: ScheduleConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, sched))


def set_schedule_position(scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> None:
    """Put a schedule `steps` steps in, as if it had stepped that often (a state dict from another backend's
    scheduler is not needed: the position is all a LambdaLR holds)."""
    scheduler.last_epoch = steps
    scheduler._step_count = steps + 1  # past the first step: no "scheduler before optimizer" warning
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(steps)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


def set_param_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
    """One parameter's optimizer state, from a layout-free checkpoint (engine.portable), on the parameter's device;
    the step count stays a CPU scalar as torch's AdamW keeps it."""
    def copy(key: str, value):
        if not isinstance(value, torch.Tensor):  # bitsandbytes keeps its step count as an int
            return value
        return value.clone() if key == "step" else value.to(param.device, copy=True)

    optimizer.state[param] = {k: copy(k, v) for k, v in state.items()}


def stochastic_round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, rounding up or down at random with probability proportional to the distance: unbiased, so an
    update below bf16's resolution moves the weight in expectation instead of vanishing. Random 16 bits are added to
    the fp32 bit pattern below bf16's mantissa, then cut off (sign-magnitude: the same for negative values)."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


FP32_PIECE = 2**22  # elements of a weight updated at once (16 MiB in fp32), bounding the update's transient


def piece_bounds(shape: torch.Size, limit: int | None = None) -> list[tuple[int, int, tuple[int, ...]]]:
    """A parameter cut into pieces of at most `limit` elements (at least one row): (start, end, shape) in its
    flattened form. A matrix is cut into whole rows, so each piece is itself a matrix (what a factored optimizer
    needs); anything else into flat runs. Pieces hold a multiple of 128 elements where they can: torchao quantizes
    states only in whole blocks of 128 (a piece that is not is kept in fp32)."""
    limit = limit or FP32_PIECE
    numel = math.prod(shape)
    if len(shape) == 2:
        rows = max(1, limit // shape[1])
        step = 128 // math.gcd(shape[1], 128)
        rows = rows - rows % step if rows >= step else rows
        if rows >= shape[0] > step and shape[0] % step:
            rows = shape[0] - shape[0] % step  # one whole-block piece and a short remainder, not one odd piece
        return [(a * shape[1], min(a + rows, shape[0]) * shape[1], (min(a + rows, shape[0]) - a, shape[1]))
                for a in range(0, shape[0], rows)]
    return [(a, min(a + limit, numel), (min(a + limit, numel) - a,)) for a in range(0, numel, limit)]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr)  # torchao keeps lr as a tensor (its compiled step reads it without recompiling)
        else:
            g["lr"] = lr


PIECED_OPTIMIZERS = ("adafactor", "adamw_4bit")  # stepped in pieces even with fp32 weights (InBackwardOptimizer)


def piece_key(name: str, i: int) -> str:
    """The key of piece `i` of parameter `name` among the in-backward optimizers (`InBackwardOptimizer.optimizers`)."""
    return f"{name}#{i}"


class InBackwardOptimizer(torch.optim.Optimizer):
    """One optimizer per parameter, stepped from `register_post_accumulate_grad_hook`.

    Each gradient is consumed and freed the moment autograd finishes it, so at most a few parameters' gradients
    exist at once instead of a full model-sized gradient buffer. To the rest of the engine it is an ordinary
    optimizer with one parameter group: an LR scheduler sets that group's lr (the hooks read it), `step()` marks the
    end of the iteration (the updates already happened in backward), and its state dict is the per-parameter
    optimizers' (keys: parameter names, or `piece_key(name, i)` for a parameter stepped in pieces). The hooks also
    read `inv_scale` (1/loss scale, for fp16) and report `overflow`.
    """

    def __init__(self, model: nn.Module, cfg: OptimConfig, device_type: str = "cpu", step=None,
                 master_bf16: bool = False):
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        super().__init__([p for _, p in self.named], {"lr": cfg.lr})
        self.step_one = step or run_step  # the simulator allocates states instead of stepping
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        # A parameter is stepped in pieces of at most FP32_PIECE elements (`piece_bounds`), each through its own
        # optimizer on a stand-in parameter, when
        # - its weights are bf16 (memory.master_weights=bf16): the stand-in holds the piece (and its gradient) in fp32
        #   only while it steps, then the piece is rounded back stochastically; the states are as with fp32 weights;
        # - the optimizer is Adafactor, whose update makes several full-size fp32 temporaries (4 x 80M x 4 B for
        #   gpt2-xl's embedding at once), or torchao's 4-bit AdamW, which quantizes only tensors of whole 128-element
        #   blocks (gpt2-xl's embedding, 50257 x 1600, is not): the stand-in is a view of the fp32 weight, stepped in
        #   place. Whole rows per piece keep each piece a matrix, factored on its own by Adafactor (row statistics
        #   exact, column statistics per piece).
        self.master_bf16 = master_bf16
        self.pieces: dict[str, list[tuple[str, int, int, tuple, nn.Parameter]]] = {}
        pieced = is_pieced(cfg.name, master_bf16)
        embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
        for name, p in self.named:
            # 4-bit moments on the token embedding (rare rows, tiny second moments) cost far more loss than anywhere
            # else (measured on a tiny GPT-2: 30 steps, loss 9.08 vs 8.91 with the embedding's moments kept wider);
            # bitsandbytes' 8-bit AdamW keeps them, as its StableEmbedding advice has it.
            p_cfg = cfg.model_copy(update={"name": "adamw_8bit"}) if cfg.name == "adamw_4bit" and p is embedding else cfg
            for i, (a, b, shape) in enumerate(piece_bounds(p.shape) if pieced else [(0, p.numel(), ())]):
                holder = nn.Module()
                holder.register_parameter("p", p)
                opt = build_optimizer(holder, p_cfg, device_type)  # grouped by the real parameter's shape (decay)
                key = piece_key(name, i) if pieced else name
                if pieced:
                    stand_in = nn.Parameter(p.new_empty(0, dtype=torch.float32))  # fake when p is (the simulator)
                    for group in opt.param_groups:
                        group["params"] = [stand_in if q is p else q for q in group["params"]]
                    self.pieces.setdefault(name, []).append((key, a, b, shape, stand_in))
                self.optimizers[key] = opt
        self.inv_scale = 1.0
        self.overflow = False
        self.skipped = 0  # parameters whose gradient overflowed in the last backward (fp16)
        # Clipping (optim.grad_clip): each gradient's squared norm joins `sq_sum` as it arrives, before the gradient is
        # used; it is scaled by grad_clip / `clip_norm` (the measured norm of this step, or a bound of it), so no
        # model-sized buffer exists. `measuring`: a backward that only sums the norms (each gradient freed at once).
        self.clip = cfg.grad_clip
        self.measuring = False
        self.sq_sum: torch.Tensor | None = None
        self.clip_norm: torch.Tensor | None = None  # the global norm of the last step (stale) or of this one (exact)
        self.bound_by_partial = False  # stale: also divide by this step's norm so far, a lower bound of its own
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(name)) for name, p in self.named]

    def begin_backward(self, inv_scale: float, measuring: bool = False, bound_by_partial: bool = False) -> None:
        """Before each backward: the loss scale to undo, whether this backward only measures (the global norm, and
        under fp16 whether the scale overflows) and steps nothing."""
        self.inv_scale, self.overflow, self.measuring = inv_scale, False, measuring
        self.bound_by_partial, self.sq_sum, self.skipped = bound_by_partial, None, 0

    def global_norm(self) -> torch.Tensor | None:
        """The global gradient norm of the backward that just ran (None without clipping)."""
        return None if self.sq_sum is None else self.sq_sum.sqrt()

    def _clip_(self, grad: torch.Tensor) -> None:
        """Add this gradient to the norm's sum, then (unless measuring) scale it: factor = clip / norm, at most 1,
        computed on the device (no host sync)."""
        sq = torch.linalg.vector_norm(grad).float().square()  # (in the gradient's dtype: no fp32 copy of it)
        self.sq_sum = sq if self.sq_sum is None else self.sq_sum + sq
        if self.measuring:
            return
        norm = self.clip_norm
        if self.bound_by_partial:
            norm = self.sq_sum.sqrt() if norm is None else torch.maximum(norm, self.sq_sum.sqrt())
        grad.mul_((self.clip / (norm + 1e-6)).clamp(max=1.0))

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """The iteration's end: every parameter was already updated by its hook during backward."""
        return None

    def _step(self, key: str) -> None:
        opt = self.optimizers[key]
        set_lr(opt, self.lr)
        self.step_one(opt)

    def _step_pieces(self, name: str, p: torch.Tensor) -> None:
        weight, grad = p.detach().view(-1), p.grad.view(-1)
        for key, a, b, shape, stand_in in self.pieces[name]:
            if self.master_bf16:
                # This piece in fp32 for its update, then stochastically rounded back into the bf16 weight.
                stand_in.data, stand_in.grad = weight[a:b].float().view(shape), grad[a:b].float().view(shape)
                self._step(key)
                weight[a:b].copy_(stochastic_round_to_bf16(stand_in.data).view(-1))
            else:
                stand_in.data, stand_in.grad = weight[a:b].view(shape), grad[a:b].view(shape)  # in place
                self._step(key)
            stand_in.grad = None
            stand_in.data = p.new_empty(0, dtype=torch.float32)

    def _hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            if self.inv_scale != 1.0:
                p.grad.mul_(self.inv_scale)
                if not torch.isfinite(p.grad).all():
                    # fp16 overflow: this parameter skips the step; the loop lowers the scale.
                    self.overflow = True
                    self.skipped += 1
                    p.grad = None
                    return
            if self.clip is not None:
                self._clip_(p.grad)
            if not self.measuring:
                if name in self.pieces:
                    self._step_pieces(name, p)
                else:
                    self._step(name)
            p.grad = None  # the point of the exercise: free this gradient now

        return hook

    def state_dict(self) -> dict:
        # clip_norm: what stale clipping divides the next step's gradients by (part of an exact resume)
        return {"lr": self.lr, "clip_norm": self.clip_norm,
                "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.param_groups[0]["lr"] = state["lr"]  # (as a torch optimizer restores its groups' lr)
        self.clip_norm = state.get("clip_norm")
        for n, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][n])

    @staticmethod
    def states_by_name(state: dict) -> dict[str, dict[str, torch.Tensor]]:
        """Each parameter's optimizer state by name, from a `state_dict()` of an optimizer stepped whole (NotPortable
        for one stepped in pieces: a piece's state is not the parameter's)."""
        if any(key != piece_name(key) for key in state["optimizers"]):
            raise NotPortable("its optimizer was stepped in pieces (bf16 weights, Adafactor or 4-bit AdamW), which only "
                              "the optimizer-in-backward path of the same setup reads")
        return {name: unpacked(next(iter(sd["state"].values()), {})) for name, sd in state["optimizers"].items()}

    def set_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Per-parameter states by name (`states_by_name` of another layout) into the per-parameter optimizers."""
        if self.pieces and states:
            raise NotPortable("this run steps its optimizer in pieces (bf16 weights, Adafactor or 4-bit AdamW), whose "
                              "states only a checkpoint of the same layout fills")
        for name, p in self.named:
            if name in states:
                set_param_state(self.optimizers[name], p, states[name])

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()


def piece_name(key: str) -> str:
    """The parameter a `piece_key` (or a whole parameter's key) belongs to."""
    return key.rpartition("#")[0] or key


def is_pieced(optimizer: str, master_bf16: bool) -> bool:
    """Whether the in-backward optimizer steps each parameter in pieces (its states are then per piece, and only a
    checkpoint of the same setup can fill them)."""
    return master_bf16 or optimizer in PIECED_OPTIMIZERS


class DynamicLossScale:
    """fp16 loss scaling for the in-backward optimizer (torch's GradScaler needs a separate step call). `untried`: the
    scale has not yet carried a step without overflow (the first step, and after every change), so the in-backward
    step measures it first (a backward that steps nothing) instead of letting some parameters skip their update."""

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 2000, min_scale: float = 1.0):
        self.scale, self.growth_interval, self.min_scale, self.good_steps = init_scale, growth_interval, min_scale, 0
        self.untried = True

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale, self.good_steps, self.untried = max(self.scale / 2, self.min_scale), 0, True
        else:
            self.good_steps += 1
            self.untried = self.good_steps % self.growth_interval == 0
            if self.untried:
                self.scale *= 2

    @property
    def at_minimum(self) -> bool:
        return self.scale <= self.min_scale

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "untried": self.untried}

    def load_state_dict(self, st: dict) -> None:
        self.scale, self.good_steps, self.untried = st["scale"], st["good_steps"], st.get("untried", False)
