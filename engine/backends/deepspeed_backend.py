"""DeepSpeed engine: ZeRO stages 0-3, optimizer/parameter offload, fp16 loss scaling, bf16.

The DeepSpeed JSON is generated here, once, from the typed config (`make_ds_config`); a user JSON
may be merged over it. On CPU DeepSpeed runs its CPU accelerator over gloo, the same code path.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from engine.backends.base import Backend, StepStats
from engine.config import RunConfig, deep_merge
from engine.distributed import DistEnv
from engine.errors import ConfigError
from engine.loss import batch_loss_sum
from engine.model import build_model, special_ids_of, unwrap
from engine.optim import build_optimizer, build_scheduler, set_param_state, set_schedule_position
from engine.portable import DS_TAG, ELEMENTWISE_STATES, PARAM_NAMES, NotPortable, PortableState


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
            loss_sum, _ = batch_loss_sum(self.engine, self.to_device(mb), self.cfg.memory.loss_chunk_size)
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

    @contextlib.contextmanager
    def full_weights(self, ckpt_dir: Path | None = None):
        module = self.engine.module
        if self.cfg.memory.precision != "fp32" and ckpt_dir is not None:
            # 16-bit training: the module holds rounded working copies; the true weights are the optimizer's fp32
            # masters. Rebuild them from the checkpoint (any ZeRO stage) into a CPU fp32 model on rank 0.
            yield self._fp32_model_from_checkpoint(ckpt_dir) if self.dist.is_main else None
            return
        if self.cfg.memory.zero_stage == 3:
            import deepspeed

            # Gathers every partitioned parameter on every rank for the duration (as DeepSpeed's own
            # 16-bit save does); rank 0 writes.
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                yield module
        else:
            yield module

    def _fp32_model_from_checkpoint(self, ckpt_dir: Path) -> torch.nn.Module:
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag="deepspeed")
        vocab = unwrap(self.engine.module).get_input_embeddings().weight.shape[0]
        if self.cfg.memory.zero_stage == 3:
            vocab = getattr(unwrap(self.engine.module).get_input_embeddings().weight, "ds_shape", [vocab])[0]
        # The training model's special token ids (a classifier finds its last token through pad_token_id).
        model = build_model(self.cfg, vocab_size=vocab, special_ids=special_ids_of(self.engine.module))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight", "base_model.model.lm_head.weight"}
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"fp32 export: missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]}")
        return model

    def save(self, ckpt_dir: Path) -> None:
        # Every rank writes its own optimizer/parameter partitions.
        self.engine.save_checkpoint(str(ckpt_dir), tag="deepspeed", save_latest=False)
        if self.dist.is_main and self._optimizer_holds_module_params():
            # ZeRO-0: the optimizer's state is keyed by position; its parameters' names make it portable.
            names = {id(p): n for n, p in self.engine.module.named_parameters()}
            groups = [[names[id(p)] for p in g["params"]] for g in self.optimizer.param_groups]
            (ckpt_dir / DS_TAG / PARAM_NAMES).write_text(json.dumps(groups), encoding="utf-8")

    def _optimizer_holds_module_params(self) -> bool:
        """True without ZeRO in fp32: DeepSpeed steps the client optimizer over the module's own parameters (ZeRO
        and the 16-bit optimizers hand it flat fp32 partitions instead)."""
        if self.cfg.memory.zero_stage > 0:  # (ZeRO-3 even shows its client optimizer with empty groups)
            return False
        module = {id(p) for p in self.engine.module.parameters()}
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return bool(params) and all(id(p) in module for p in params)

    def load_portable(self, ps: PortableState) -> None:
        """A checkpoint from another layout (engine.portable): every rank writes its own partitions of the fp32
        masters and Adam moments through DeepSpeed's `safe_set_full_*` API, and the module's working weights (whole,
        or gathered under ZeRO-3) from the same masters."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        params = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        names = {n for n, _ in params}
        if names != set(ps.weights):
            missing, extra = sorted(names - set(ps.weights))[:3], sorted(set(ps.weights) - names)[:3]
            raise ValueError(f"checkpoint weights do not match this model (missing {missing}, unexpected {extra})")
        if self._optimizer_holds_module_params():  # ZeRO-0 fp32: the module's weights are the masters
            with torch.no_grad():
                for name, p in params:
                    p.copy_(ps.weights[name].to(p.device, p.dtype))
                    if name in ps.states:
                        set_param_state(self.optimizer, p, ps.states[name])
            self._set_schedule(ps)
            return
        keys = {k for st in ps.states.values() for k in st} - {"step", *ELEMENTWISE_STATES}
        if keys:
            raise NotPortable(f"its optimizer state {sorted(keys)[:3]} cannot be cut into ZeRO partitions (only "
                              "AdamW's element-wise moments can)")
        if ps.states:
            self._materialize_optimizer_state()
        for name, p in params:
            master = ps.weights[name].to(self.device, torch.float32)
            self._set_module_weight(p, master)
            safe_set_full_fp32_param(p, master)
            for key, value in ps.states.get(name, {}).items():
                if key != "step":
                    safe_set_full_optimizer_state(p, value.to(self.device), key)
        steps = {float(st["step"]) for st in ps.states.values() if "step" in st}
        if len(steps) > 1:
            raise ValueError(f"parameters were stepped different numbers of times ({sorted(steps)[:3]}), which one "
                             "DeepSpeed step count cannot hold")
        if steps:
            step = steps.pop()
            # the client optimizer inside ZeRO's wrapper, whose state is per flat partition
            for state in self.optimizer.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"].fill_(step)
                elif "step" in state:
                    state["step"] = int(step)
        self._set_schedule(ps)

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
            for f in flats:
                f.grad = torch.zeros_like(f)
            base.step()
            for f in flats:
                f.grad = None
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

    def load(self, ckpt_dir: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(ckpt_dir), tag="deepspeed", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise ValueError(f"no DeepSpeed state in {ckpt_dir}")
