"""The recipe catalog: every named way of holding model states in memory, as `section.key=value` overrides, once.

A recipe (optimizer-in-backward + 8-bit AdamW + bf16 weights, ZeRO-3 with offload, QLoRA r16, ...) is composed from
the building blocks below and carries only what it changes: the compute precision, the sequence length and the
activation settings (checkpointing, chunked loss) are chosen by whoever uses it. `engine plan` turns recipes into
its candidates (engine/plan.py); benchmarks/ (gpu_check.py, quality.py, single_device.py, run.py's matrices through
`recipe=KEY`) measure them under the same keys, so a recipe's settings are spelled here and nowhere else.

What the planner reads off a recipe (in-backward stepping, ZeRO stage, offload) is read from its overrides
(`Recipe.settings`), so the two cannot disagree. Pure data: this module imports nothing from the engine; every
recipe validates as a config (tests/test_recipes.py).
"""

from __future__ import annotations

from dataclasses import dataclass

Overrides = tuple[str, ...]


# --- building blocks ---------------------------------------------------------------------------------------------


def optimizer(name: str) -> Overrides:
    """`optim.name` (adamw, adamw_8bit, adamw_4bit, adafactor, cpu_adam)."""
    return (f"optim.name={name}",)


def precision(name: str) -> Overrides:
    """`memory.precision`: recipes leave it to the user (the planner takes the GPU's), benchmarks pin it."""
    return (f"memory.precision={name}",)


def zero(stage: int) -> Overrides:
    """`memory.zero_stage` (0 = none, 1-3 = DeepSpeed ZeRO partitions)."""
    return (f"memory.zero_stage={stage}",)


def checkpointing(every: int | None = None, policy: str = "full") -> Overrides:
    """Activation checkpointing: every block, or one block in `every`; `policy` selective keeps the matmul outputs."""
    return (("memory.activation_checkpointing=true",) + ((f"memory.checkpoint_every_n_layers={every}",) if every else ())
            + (("memory.checkpoint_policy=selective",) if policy == "selective" else ()))


def chunked_loss(tokens: int) -> Overrides:
    """The LM head and loss `tokens` positions at a time (the logits never exist whole)."""
    return (f"memory.loss_chunk_size={tokens}",)


# Each parameter steps as soon as its gradient is ready: no full gradient buffer. It still clips (optim.grad_clip,
# 1.0 by default), by the method optim.clip_in_backward names (stale by default: no extra memory or time).
IN_BACKWARD: Overrides = ("memory.optimizer_in_backward=true",)
# The opposite (the ordinary step after backward, clipped at 1.0): undoes IN_BACKWARD on top of a preset that has it.
PLAIN_STEP: Overrides = ("memory.optimizer_in_backward=false", "optim.grad_clip=1.0")
# bf16 weights without fp32 masters (stochastic rounding): needs the in-backward step.
BF16_WEIGHTS: Overrides = (*IN_BACKWARD, "memory.master_weights=bf16")
# LoRA adapters (r=16, alpha 32) over a frozen base; states exist only for the adapters, so plain AdamW.
LORA_R16: Overrides = ("memory.lora.enabled=true", "memory.lora.r=16", "memory.lora.alpha=32")
NF4_BASE: Overrides = ("memory.lora.quantize_base=nf4",)  # QLoRA: the frozen matmul weights in 4-bit NF4
# DeepSpeed optimizer offload: fp32 masters and Adam moments in host RAM, stepped by DeepSpeedCPUAdam.
OFFLOAD_OPTIMIZER: Overrides = (*optimizer("cpu_adam"), "memory.offload_optimizer=true")
OFFLOAD_PARAMS: Overrides = ("memory.offload_params=true",)  # ZeRO-3 only: the 16-bit parameters too


# --- the catalog -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """One named recipe. `key` names it everywhere (benchmark CLI flags, matrices' `recipe=KEY`, quality notes);
    `title` is the planner's name for it (recorded plan figures are keyed by it)."""

    key: str
    title: str
    overrides: Overrides
    # Among equally fast plans, the one closest to fp32 AdamW wins: 0 AdamW (fp32 weights), 1 8-bit AdamW, 2 bf16
    # weights with 8-bit AdamW, 3 with 4-bit AdamW, 4 Adafactor (benchmarks/quality.py measures the gaps).
    quality_rank: int = 0
    quality_key: str = ""  # the key of its measured quality gap (engine.plan.QUALITY_GRIDS); "" if not measured

    @property
    def settings(self) -> dict[str, str]:
        """Its overrides as key -> value text (a later entry for the same key wins, as on the command line)."""
        return dict(item.split("=", 1) for item in self.overrides)

    @property
    def in_backward(self) -> bool:
        return self.settings.get("memory.optimizer_in_backward") == "true"

    @property
    def zero_stage(self) -> int:
        return int(self.settings.get("memory.zero_stage", 0))

    @property
    def offload_optimizer(self) -> bool:
        return self.settings.get("memory.offload_optimizer") == "true"

    @property
    def offload_params(self) -> bool:
        return self.settings.get("memory.offload_params") == "true"

    @property
    def lora(self) -> bool:
        return self.settings.get("memory.lora.enabled") == "true"


ADAMW, ADAMW_8BIT = optimizer("adamw"), optimizer("adamw_8bit")
LORA: Overrides = (*ADAMW, *LORA_R16)

_RECIPES = (
    # one device, full fine-tune
    Recipe("adamw", "AdamW", ADAMW),
    Recipe("adamw_8bit", "AdamW8bit", ADAMW_8BIT, quality_rank=1),
    Recipe("adamw_inb", "AdamW, in-backward", (*ADAMW, *IN_BACKWARD)),
    Recipe("adamw_8bit_inb", "AdamW8bit, in-backward", (*ADAMW_8BIT, *IN_BACKWARD), 1, "adamw_8bit_inb"),
    Recipe("bf16_8bit", "AdamW8bit, in-backward, bf16 weights", (*ADAMW_8BIT, *BF16_WEIGHTS), 2, "bf16_8bit"),
    Recipe("bf16_4bit", "AdamW4bit, in-backward, bf16 weights", (*optimizer("adamw_4bit"), *BF16_WEIGHTS), 3,
           "bf16_4bit"),
    Recipe("bf16_adafactor", "Adafactor, in-backward, bf16 weights", (*optimizer("adafactor"), *BF16_WEIGHTS), 4,
           "bf16_adafactor"),
    # DeepSpeed ZeRO (one rank or several)
    Recipe("zero1_adamw", "ZeRO-1, AdamW", (*ADAMW, *zero(1))),
    Recipe("zero2_adamw", "ZeRO-2, AdamW", (*ADAMW, *zero(2))),
    Recipe("zero2_adamw_8bit", "ZeRO-2, AdamW8bit", (*ADAMW_8BIT, *zero(2))),
    Recipe("zero3_adamw", "ZeRO-3, AdamW", (*ADAMW, *zero(3))),
    Recipe("zero2_offload", "ZeRO-2 + optimizer offload", (*OFFLOAD_OPTIMIZER, *zero(2))),
    Recipe("zero3_offload", "ZeRO-3 + optimizer offload", (*OFFLOAD_OPTIMIZER, *zero(3))),
    Recipe("zero3_offload_all", "ZeRO-3 + optimizer/param offload", (*OFFLOAD_OPTIMIZER, *zero(3), *OFFLOAD_PARAMS)),
    # adapters
    Recipe("lora", "LoRA r16, AdamW", LORA, quality_key="lora"),
    Recipe("qlora", "QLoRA r16 (NF4 base), AdamW", (*LORA, *NF4_BASE), 1, "qlora"),
    Recipe("lora_zero2", "LoRA r16, AdamW, ZeRO-2", (*LORA, *zero(2))),
    # The seeds' recipe (HF Trainer: fp32, fused torch AdamW clipped at 1.0, HF's GELU, none of the engine's memory
    # features), every feature switched off explicitly so it also holds on top of a low-memory preset: the baseline
    # of the memory benchmarks (benchmarks/run.py, validate_simulation.py, single_device.py).
    Recipe("hf_trainer", "HF Trainer (the seeds' recipe)",
           (*precision("fp32"), *ADAMW, *PLAIN_STEP, "memory.fused_gelu=false", "memory.activation_checkpointing=false",
            "memory.loss_chunk_size=null", "memory.lora.enabled=false", *zero(0), "memory.offload_optimizer=false")),
)
CATALOG: dict[str, Recipe] = {r.key: r for r in _RECIPES}


def recipe(key: str) -> Recipe:
    """The catalog's recipe `key`; an unknown key names the known ones."""
    try:
        return CATALOG[key]
    except KeyError:
        raise KeyError(f"no recipe {key!r} in engine/recipes.py (known: {', '.join(CATALOG)})") from None
