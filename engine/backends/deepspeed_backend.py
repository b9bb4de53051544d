"""DeepSpeed engine: ZeRO stages 0-3, optimizer/parameter offload, fp16 loss scaling, bf16.

The DeepSpeed JSON is generated here, once, from the typed config (`make_ds_config`); a user JSON
may be merged over it. On CPU DeepSpeed runs its CPU accelerator over gloo, the same code path.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from engine.backends.base import Backend, CheckpointLayout, StepStats
from engine.config import RunConfig, deep_merge
from engine.distributed import DistEnv
from engine.errors import ConfigError, EngineError
from engine.loss import batch_loss_sum
from engine.optim import build_optimizer, build_scheduler, set_param_state, set_schedule_position
from engine.portable import (
    ELEMENTWISE_STATES,
    NotPortable,
    PortableState,
    check_names,
    merge_zero3,
    merge_zero12,
    states_by_name,
)

ELEMENTWISE_OPTIMIZERS = ("adamw", "cpu_adam")  # their states can be cut into ZeRO's flat partitions and back


def _ds_globals() -> list:
    """The DeepSpeed classes inside its checkpoint files that a weights-only load must be allowed to rebuild."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_deepspeed_file(path: Path) -> dict:
    """One file of a DeepSpeed checkpoint, weights-only (its few DeepSpeed classes allowed by name)."""
    with torch.serialization.safe_globals(_ds_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def zero_shard_name(ckpt: Path, tag: str, rank: int, bf16_mode: bool) -> Path:
    """DeepSpeed's own name for `rank`'s ZeRO optimizer shard: its engine's naming methods, which read nothing of an
    engine but each other (bf16 runs write `bf16_zero_pp_rank_*`, the others `zero_pp_rank_*`)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    class Names:
        _get_zero_ckpt_prefix = DeepSpeedEngine._get_zero_ckpt_prefix
        rank_zero_ckpt_name = DeepSpeedEngine._get_rank_zero_ckpt_name

    return Path(Names().rank_zero_ckpt_name(str(ckpt), tag, 0, rank, bf16_mode))


class DeepSpeedLayout(CheckpointLayout):
    """DeepSpeed's checkpoint, as its engine writes it under the tag TAG: per ZeRO stage and precision, model states
    and (ZeRO 1-3) one optimizer shard per rank, named by DeepSpeed (`zero_shard_name`, zero_to_fp32's
    `get_model_state_file`); without ZeRO, PARAM_NAMES beside them names the optimizer's parameters."""

    TAG = "deepspeed"
    PARAM_NAMES = "param_names.json"

    def __init__(self, stage: int, precision: str, optimizer: str):
        self.stage, self.precision, self.optimizer = stage, precision, optimizer
        self.name = f"DeepSpeed ZeRO-{stage} ({precision})"

    def states_problem(self) -> str | None:
        if self.stage > 0 and self.optimizer not in ELEMENTWISE_OPTIMIZERS:
            return (f"its optimizer state ({self.optimizer}) inside DeepSpeed's flat ZeRO partitions cannot be cut by "
                    "parameter (only AdamW's element-wise moments can)")
        return None

    def save(self, backend: "DeepSpeedBackend", ckpt: Path) -> None:
        # Every rank writes its own optimizer/parameter partitions.
        backend.engine.save_checkpoint(str(ckpt), tag=self.TAG, save_latest=False)
        names = backend.optimizer_param_names()
        if backend.dist.is_main and names is not None:
            # ZeRO-0: the optimizer's state is keyed by position; its parameters' names make it portable.
            (ckpt / self.TAG / self.PARAM_NAMES).write_text(json.dumps(names), encoding="utf-8")

    def load(self, backend: "DeepSpeedBackend", ckpt: Path) -> None:
        path, _ = backend.engine.load_checkpoint(str(ckpt), tag=self.TAG, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
        if path is None:
            raise ValueError(f"no DeepSpeed state in {ckpt}")

    # -- reading, without an engine
    def model_state_file(self, ckpt: Path) -> Path:
        from deepspeed.utils.zero_to_fp32 import get_model_state_file

        try:
            return Path(get_model_state_file(str(ckpt / self.TAG), self.stage))
        except FileNotFoundError:
            raise EngineError(f"{ckpt}: no DeepSpeed ZeRO-{self.stage} model states in {ckpt / self.TAG}") from None

    def optimizer_shards(self, ckpt: Path) -> list[Path]:
        """Every rank's ZeRO optimizer shard, by rank, or a one-line error naming the first one missing."""
        bf16 = self.precision == "bf16"
        first = zero_shard_name(ckpt, self.TAG, 0, bf16)
        if not first.is_file() and zero_shard_name(ckpt, self.TAG, 0, not bf16).is_file():
            bf16 = not bf16  # (as DeepSpeed's own loader, which tries both)
            first = zero_shard_name(ckpt, self.TAG, 0, bf16)
        if not first.is_file():
            raise EngineError(f"{ckpt}: rank 0's ZeRO-{self.stage} optimizer shard ({first}) is missing")
        world = load_deepspeed_file(first)["optimizer_state_dict"]["partition_count"]
        world = max(world) if isinstance(world, list) else int(world)
        shards = [zero_shard_name(ckpt, self.TAG, r, bf16) for r in range(world)]
        missing = next((r for r, f in enumerate(shards) if not f.is_file()), None)
        if missing is not None:
            raise EngineError(f"{ckpt}: the checkpoint was written by {world} ranks but rank {missing}'s shard "
                              f"({shards[missing]}) is missing")
        return shards

    def to_portable(self, ckpt: Path, with_states: bool = True) -> PortableState:
        model_state = load_deepspeed_file(self.model_state_file(ckpt))
        sched = model_state.get("lr_scheduler") or {}
        steps = int(sched.get("last_epoch", model_state.get("global_steps", 0)))
        if self.stage == 0:
            weights, states = self._read_zero0(ckpt, model_state, with_states)
            return PortableState(weights, states, steps, self.name)
        shards = [load_deepspeed_file(p)["optimizer_state_dict"] for p in self.optimizer_shards(ckpt)]
        weights, states = self._read_zero(model_state["param_shapes"], shards, with_states)
        return PortableState(weights, states, steps, f"{self.name} on {len(shards)} rank(s)")

    def _read_zero(self, shapes: list[dict], shards: list[dict], with_states: bool) -> tuple[dict, dict]:
        """ZeRO 1-3: the fp32 flats and each element-wise state merged back into full tensors by parameter name."""
        world = len(shards)
        base = [s["base_optimizer_state"] if self.stage <= 2 else s["optimizer_state_dict"] for s in shards]

        def merge(per_rank_groups: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
            if self.stage <= 2:
                return merge_zero12(per_rank_groups, shapes, shards[0].get("param_alignment_paddings"))
            return merge_zero3(per_rank_groups, shapes, world)

        weights = merge([s["single_partition_of_fp32_groups" if self.stage <= 2 else "fp32_flat_groups"] for s in shards])
        first = base[0]["state"]
        keys = sorted(first[0]) if 0 in first and with_states else []
        if [k for k in keys if k != "step" and k not in ELEMENTWISE_STATES]:
            raise NotPortable(self.states_problem() or f"its optimizer state {keys} cannot be cut by parameter")
        groups = range(len(shapes))
        states: dict[str, dict[str, torch.Tensor]] = {name: {} for name in weights}
        for key in (k for k in keys if k != "step"):
            for name, t in merge([[b["state"][g][key] for g in groups] for b in base]).items():
                states[name][key] = t
        for g in groups if keys else ():
            step = first[g]["step"]
            for name in shapes[g]:
                states[name]["step"] = step.clone() if isinstance(step, torch.Tensor) else torch.tensor(float(step))
        return weights, {name: st for name, st in states.items() if st}

    def _read_zero0(self, ckpt: Path, model_state: dict, with_states: bool) -> tuple[dict, dict]:
        """Without ZeRO: the optimizer's state dict in the model-state file, its parameters' names in PARAM_NAMES.
        fp32: the client optimizer over the module's weights. 16-bit: DeepSpeed's wrapper, whose fp32 copies (one per
        parameter, `fp32_groups`) are the masters and whose inner optimizer steps them."""
        names_file = ckpt / self.TAG / self.PARAM_NAMES
        opt = model_state.get("optimizer")
        if opt is None or not names_file.is_file():
            raise NotPortable("this DeepSpeed ZeRO-0 checkpoint does not name its optimizer's parameters (written "
                              "before they were named)")
        names = json.loads(names_file.read_text(encoding="utf-8"))
        if "fp32_groups" in opt:  # 16-bit
            weights = {n: t for group, ts in zip(names, opt["fp32_groups"]) for n, t in zip(group, ts)}
            opt = opt["optimizer_state_dict"]
        else:
            weights = {n: model_state["module"][n].float() for group in names for n in group}
        return weights, states_by_name(opt, names) if with_states else {}

    # -- writing another layout's state into a live engine
    def from_portable(self, backend: "DeepSpeedBackend", ps: PortableState) -> None:
        """Every rank writes its own partitions of the fp32 masters and Adam moments through DeepSpeed's
        `safe_set_full_*` API, and the module's working weights (whole, or gathered under ZeRO-3) from the same
        masters. Without ZeRO, the optimizer's own parameters (the module's in fp32, DeepSpeed's fp32 copies in 16
        bits) take the masters and their states directly."""
        params = [(n, p) for n, p in backend.engine.module.named_parameters() if p.requires_grad]
        check_names(ps.weights, [n for n, _ in params])
        if self.stage == 0:
            self._zero0_from_portable(backend, params, ps)
        else:
            self._zero_from_portable(backend, params, ps)
        backend._set_schedule(ps)

    def _zero0_from_portable(self, backend, params, ps: PortableState) -> None:
        opt = backend.optimizer
        masters = dict(zip([id(p) for g in getattr(opt, "fp16_groups", []) for p in g],
                           [p for g in getattr(opt, "fp32_groups", []) for p in g]))
        inner = opt.optimizer if masters else opt
        with torch.no_grad():
            for name, p in params:
                w = ps.weights[name]
                p.copy_(w.to(p.device, p.dtype))
                master = masters.get(id(p), p)
                if master is not p:
                    master.copy_(w.to(master.device, master.dtype))
                if name in ps.states:
                    set_param_state(inner, master, ps.states[name])

    def _zero_from_portable(self, backend, params, ps: PortableState) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        keys = {k for st in ps.states.values() for k in st} - {"step", *ELEMENTWISE_STATES}
        if keys:
            raise NotPortable(f"its optimizer state {sorted(keys)[:3]} cannot be cut into ZeRO partitions (only "
                              "AdamW's element-wise moments can)")
        if ps.states:
            backend._materialize_optimizer_state()
        for name, p in params:
            master = ps.weights[name].to(backend.device, torch.float32)
            backend._set_module_weight(p, master)
            safe_set_full_fp32_param(p, master)
            for key, value in ps.states.get(name, {}).items():
                if key != "step":
                    safe_set_full_optimizer_state(p, value.to(backend.device), key)
        steps = {float(st["step"]) for st in ps.states.values() if "step" in st}
        if len(steps) > 1:
            raise ValueError(f"parameters were stepped different numbers of times ({sorted(steps)[:3]}), which one "
                             "DeepSpeed step count cannot hold")
        if steps:
            step = steps.pop()
            # the client optimizer inside ZeRO's wrapper, whose state is per flat partition
            for state in backend.optimizer.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"].fill_(step)
                elif "step" in state:
                    state["step"] = int(step)


def make_ds_config(cfg: RunConfig, world_size: int, device_type: str = "cuda", user_json: dict | None = None) -> dict:
    """The DeepSpeed config for `cfg` (pure function). train_batch_size = micro x accum x world size."""
    m, t = cfg.memory, cfg.train
    accum = t.accum_steps(world_size)
    pin = device_type == "cuda"  # pinned host buffers speed up H2D copies; meaningless without a GPU
    zero: dict = {"stage": m.zero_stage}
    if m.zero_stage > 0:
        zero.update(contiguous_gradients=True, overlap_comm=device_type == "cuda", reduce_bucket_size=5e7)
    if m.zero_stage >= 2:
        zero.update(allgather_bucket_size=5e7)
    if m.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=5e7,
            stage3_param_persistence_threshold=1e5,
            stage3_max_live_parameters=1e8,
            stage3_gather_16bit_weights_on_model_save=False,  # we gather ourselves for the HF export
        )
    if m.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if m.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch_size * accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip or 0.0,
        "zero_optimization": zero,
        "fp16": {
            "enabled": m.precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "bf16": {"enabled": m.precision == "bf16"},
        # bitsandbytes and torch optimizers are passed in as client optimizers.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if user_json:
        ds = deep_merge(ds, user_json)
    return ds


def precision_problem(precision: str, accelerator) -> str | None:
    """Why DeepSpeed cannot train in `precision` on this accelerator (None if it can). Probed, not assumed: DeepSpeed's
    CPU accelerator supports fp16 exactly where oneDNN has fp16 kernels (CPUs with AMX-FP16 or avx512-fp16)."""
    if precision == "fp16" and not accelerator.is_fp16_supported():
        return (f"memory.precision=fp16 is not supported by DeepSpeed on {accelerator.device_name()}: use bf16 or fp32 "
                "here (fp16 needs a GPU, or a CPU with fp16 kernels)")
    return None


def load_user_ds_json(path: str | None) -> dict | None:
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"train.deepspeed_config: file not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"train.deepspeed_config: {p} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"train.deepspeed_config: {p} must hold a JSON object")
    return data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(dist_env: DistEnv) -> None:
    """One process without a launcher still needs a (1-rank) process group for the DeepSpeed engine."""
    import deepspeed

    if dist.is_initialized():
        return
    if not dist_env.launched:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed(verbose=False)


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, cfg: RunConfig, dist_env: DistEnv, model: torch.nn.Module, total_steps: int):
        super().__init__(cfg, dist_env)
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        problem = precision_problem(cfg.memory.precision, acc)
        if problem:
            raise ConfigError(problem)
        init_distributed(dist_env)
        world = torch.distributed.get_world_size()
        self.ds_config = make_ds_config(cfg, world, acc.device_name(), load_user_ds_json(cfg.train.deepspeed_config))
        optimizer = build_optimizer(model, cfg.optim, acc.device_name())
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: build_scheduler(opt, total_steps, cfg.schedule),
            config=self.ds_config,
            dist_init_required=False,
        )
        self.model = self.engine
        self.device = self.engine.device
        self.engine.train()
        self.layout = DeepSpeedLayout(cfg.memory.zero_stage, cfg.memory.precision, cfg.optim.name)

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    @property
    def checks_finite_grads(self) -> bool:
        """ZeRO's optimizers (any stage, fp32 and bf16) and fp16's loss scaler skip a step whose gradient norm is not
        finite, on every rank; fp32 without ZeRO steps the client optimizer directly, so the engine checks."""
        return self.cfg.memory.zero_stage == 0 and self.cfg.memory.precision == "fp32"

    def _drop_nonfinite_grads(self) -> bool:
        """ZeRO-0: gradients are all-reduced by the last backward of the step, so every rank sees the same ones and
        takes the same decision (one host sync). Dropped gradients make the optimizer leave every parameter and its
        state as they were; the schedule still advances, as on the torch backend."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            return False
        for p in self.engine.module.parameters():
            p.grad = None
        return True

    def train_step(self, micro_batches: list[dict]) -> StepStats:
        n_global = self.global_tokens(micro_batches)
        world = torch.distributed.get_world_size()
        accum = len(micro_batches)
        loss_acc = torch.zeros(1, dtype=torch.float64, device=self.device)
        lr = self.lr()
        skipped_before = self.engine.skipped_steps
        skipped = False
        for i, mb in enumerate(micro_batches):
            loss_sum, _ = batch_loss_sum(self.engine, self.to_device(mb), self.cfg.memory.loss_chunk_size,
                                         fused_head=self.cfg.memory.fused_head_loss)
            # DeepSpeed divides by accumulation steps and averages gradients over ranks; undo both so
            # the gradient is exactly d(sum of token losses)/d(global token count).
            self.engine.backward(loss_sum * (world * accum) / n_global.to(loss_sum.dtype))
            if i == accum - 1 and self.checks_finite_grads:
                skipped = self._drop_nonfinite_grads()
            self.engine.step()  # a no-op except at the accumulation boundary
            loss_acc += loss_sum.detach().double()
        self.all_reduce_sum(loss_acc)
        gn = self.engine.get_global_grad_norm()
        scale = None
        if self.cfg.memory.precision == "fp16":
            scale = float(getattr(self.optimizer, "cur_scale", getattr(self.optimizer, "loss_scale", 0.0)) or 0.0)
        return StepStats(
            loss=float(loss_acc / n_global.double()),
            tokens=int(n_global),
            grad_norm=float(gn) if gn is not None else None,
            skipped=skipped or self.engine.skipped_steps > skipped_before,
            lr=lr,
            loss_scale=scale,
        )

    # -- checkpoint content (DeepSpeedLayout writes and reads the files)
    def optimizer_param_names(self) -> list[list[str]] | None:
        """Without ZeRO, the module's parameters by name in the order the optimizer keeps their state (the client
        optimizer's groups in fp32; DeepSpeed's 16-bit wrapper's `fp16_groups`, whose fp32 copies it steps one per
        parameter); None under ZeRO, whose flat partitions `param_shapes` describes."""
        if self.cfg.memory.zero_stage > 0:
            return None
        groups = getattr(self.optimizer, "fp16_groups", None) or [g["params"] for g in self.optimizer.param_groups]
        names = {id(p): n for n, p in self.engine.module.named_parameters()}
        if not all(id(p) in names for g in groups for p in g):
            return None  # (a flat 16-bit wrapper: its groups are not the module's parameters)
        return [[names[id(p)] for p in g] for g in groups]

    def _set_schedule(self, ps: PortableState) -> None:
        set_schedule_position(self.scheduler, ps.scheduler_steps)
        self.engine.global_steps = ps.scheduler_steps
        self.engine.global_samples = ps.scheduler_steps * self.engine.train_batch_size()

    def _materialize_optimizer_state(self) -> None:
        """ZeRO creates Adam's state at the first step; a converted checkpoint fills it before that. A step of the
        client optimizer at lr 0 over zero gradients creates it (the weights it would change are set next anyway)."""
        zero = self.optimizer
        base = zero.optimizer
        if base.state:
            return
        groups = [g["params"] for g in base.param_groups]
        # ZeRO-1/2 hand the client optimizer its flat fp32 partitions for good; ZeRO-3 one sub-group at a time.
        if hasattr(zero, "fp32_partitioned_groups_flat"):
            steps = [(zero.sub_group_to_group_id[i], [flat]) for i, flat in enumerate(zero.fp32_partitioned_groups_flat)]
        else:
            steps = [(None, None)]
        lrs = [g["lr"] for g in base.param_groups]
        for g in base.param_groups:
            g["lr"] = 0.0
        for group_id, params in steps:
            if group_id is not None:
                base.param_groups[group_id]["params"] = params
            flats = [p for g in base.param_groups for p in g["params"]]
            # ZeRO-3 with optimizer offload keeps each sub-group's CPU gradient buffer in .grad for good: put it back
            kept = [f.grad for f in flats]
            for f in flats:
                f.grad = torch.zeros_like(f)
            base.step()
            for f, grad in zip(flats, kept):
                f.grad = grad
        for g, lr, params in zip(base.param_groups, lrs, groups):
            g["lr"], g["params"] = lr, params
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 link each parameter to its fragment
            zero._lazy_init_hp_params_optimizer_state()

    def _set_module_weight(self, p: torch.nn.Parameter, master: torch.Tensor) -> None:
        if self.cfg.memory.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                p.data.copy_(master.view(p.shape).to(p.dtype))
        else:
            with torch.no_grad():
                p.data.copy_(master.to(p.dtype))
