"""One typed schema for a run: YAML presets + dotted overrides -> validated `RunConfig`.

Everything that shapes a run lives here, so the CLI help, validation and the DeepSpeed config
all derive from one place. Validation happens before any model or data loads: unknown keys,
wrong types and bad values are reported with the dotted key and the file (or the command line)
they came from; incompatible feature combinations are rejected with what to change.
"""

from __future__ import annotations

import copy
import os
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.errors import ConfigError
from engine.families import OVERRIDE_KEYS, Family, Shape, family, folder_config, named_size, random_architecture


BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")
# Optimizer state bytes per trainable parameter (the ZeRO rules' K; the planner's arithmetic). Adafactor keeps a row
# and a column vector per matrix (~0); torchao's 4-bit AdamW two 4-bit moments plus a scale per 128 values.
STATE_BYTES = {"adamw": 8, "cpu_adam": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "adamw_4bit": 1, "adafactor": 0}
# Optimizers that only run on the single-device torch backend (ZeRO flattens parameters into 1-D partitions, which
# a factored optimizer cannot factor; torchao's compiled 4-bit step is not wired into DeepSpeed).
SINGLE_DEVICE_OPTIMIZERS = ("adamw_4bit", "adafactor")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SpecialTokens(Section):
    bos: str | None = Field(None, description="Beginning-of-text token; GPT-2's is <|endoftext|>.")
    eos: str | None = Field(None, description="End-of-text token; GPT-2's is <|endoftext|>.")
    pad: str | None = Field(None, description="Padding token; when unset, eos is used for padding (masked out of the loss).")
    additional: list[str] = Field(default_factory=list, description="Extra tokens such as <BOS>, <EOS>, JOKE:.")


class ModelConfig(Section):
    name: str = Field("gpt2", description="A named size (engine plan --help lists them: gpt2 ... gpt2-xl, "
                      "Qwen2.5-0.5B/1.5B, Llama-3.2-1B, TinyLlama-1.1B, SmolLM2-135M/360M/1.7B, pythia-160m ... "
                      "pythia-1.4b), a hub id, or a local folder. GPT-2, Llama, Qwen2 and GPT-NeoX models run.")
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="pretrained: from_pretrained(name). random: the exact architecture of a named size "
        "(its published configuration, held in the engine) or of a model folder's config.json, random weights."
    )
    family: Literal["gpt2", "llama", "qwen2", "gpt_neox"] | None = Field(
        None, description="random init without a named size: the architecture family of model.n_layer/n_embd/n_head "
        "(default gpt2); set by the named size or folder otherwise.")
    n_layer: int | None = Field(None, gt=0, description="random init only: override the number of blocks (tiny test models).")
    n_embd: int | None = Field(None, gt=0, description="random init only: override the hidden size (the MLP keeps its ratio).")
    n_head: int | None = Field(None, gt=0, description="random init only: override the number of heads.")
    n_kv_head: int | None = Field(None, gt=0, description="random init only: key/value heads (Llama, Qwen2; default: "
                                  "the named size's grouping where it divides model.n_head).")
    n_inner: int | None = Field(None, gt=0, description="random init only: the MLP's inner size.")
    n_positions: int | None = Field(None, gt=0, description="random init only: override the context length.")
    vocab_size: int | None = Field(None, gt=0, description="random init only: embedding rows (default: the named "
                                   "size's, at least the GPT-2 tokenizer's 50,257).")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="Override the model's dropout (GPT-2 uses 0.1 on "
                                  "residuals, embeddings and attention; the others 0, on attention and residuals).")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="sdpa uses flash/mem-efficient kernels on GPU.")
    tokenizer: str | None = Field(None, description="Tokenizer folder; default: a model folder's own, a pretrained "
                                  "non-GPT-2 hub model's own, else the vendored GPT-2 BPE files.")
    special_tokens: SpecialTokens = Field(default_factory=SpecialTokens)
    trust_remote_code: bool = Field(False, description="Passed to from_pretrained; only set for code you trust.")

    @property
    def size(self) -> str | None:
        """The engine name of a named size (by name or hub id), or None."""
        found = named_size(self.name)
        return found[1].name if found else None

    def hub_id(self) -> str:
        """What from_pretrained loads: a named size's hub id, else model.name as given."""
        found = named_size(self.name)
        return found[1].hub_id if found else self.name

    def overrides(self) -> dict:
        return {k: getattr(self, k) for k in OVERRIDE_KEYS}

    def architecture(self) -> tuple[Family, dict]:
        """model.init=random: the family and the configuration built (engine.families.random_architecture)."""
        return random_architecture(self.name, self.family, self.overrides())

    def family_known(self) -> Family | None:
        """The family, where it is known before loading: random init, a named size, or a local folder's config.json
        (None for a hub id the engine does not name)."""
        known = self._known()
        return known[0] if known else None

    def shape_known(self) -> Shape | None:
        """The architecture's shape where it is known before loading (as `family_known`)."""
        known = self._known()
        return known[0].shape(known[1]) if known else None

    def _known(self) -> tuple[Family, dict] | None:
        if self.init == "random":
            return self.architecture()
        found = named_size(self.name)
        if found:
            return found[0], found[1].config
        saved = folder_config(self.name) if Path(self.name).is_dir() else None
        return (family(saved.get("model_type", "?")), saved) if saved else None


class DataConfig(Section):
    train_file: str | None = Field(None, description="Text (one document per line) or JSONL; unset: the shipped sample corpus.")
    validation_file: str | None = Field(None, description="Unset: the sample corpus' validation split, or validation_split of train.")
    test_file: str | None = None
    format: Literal["auto", "text", "jsonl", "csv"] = Field(
        "auto", description="auto: by extension (.jsonl/.json -> jsonl, .csv -> csv). csv: task=classification only."
    )
    text_field: str = Field("text", description="JSONL field (or CSV column) holding the text.")
    label_field: str = Field("label", description="task=classification: JSONL field (or CSV column) holding the label.")
    mode: Literal["packed", "line_by_line"] = Field(
        "packed", description="packed: documents joined with EOS into full blocks (no padding). line_by_line: one example per line, dynamic padding."
    )
    block_size: int = Field(1024, gt=1, description="Tokens per example (sequence length).")
    long_lines: Literal["split", "truncate"] = Field("split", description="line_by_line: lines longer than block_size are split or cut.")
    validation_split: float | str = Field(
        0.0, description="A fraction (0 to 0.5) of train held out when no validation file is given; with data.dataset, "
        "also the name of the dataset's validation split (e.g. validation, test)."
    )
    num_proc: int | None = Field(None, gt=0, description="Tokenizer worker processes (default: 1 for small corpora).")
    dataset: str | None = Field(
        None, description="A `datasets` dataset instead of data.train_file: a save_to_disk folder (DatasetDict or "
        "Dataset), a folder or glob of parquet / JSON / CSV / text files (load_dataset's builders), or a hub id."
    )
    split: str = Field("train", description="data.dataset: the split to train on.")
    test_split: str | None = Field(None, description="data.dataset: a split scored at the end of the run (test_*).")
    streaming: bool = Field(
        False, description="data.dataset read as a stream (datasets IterableDataset) and packed on the fly: corpora "
        "larger than RAM. In the stream's order (no shuffling); needs train.max_steps; a checkpoint saves the exact "
        "stream position. Validation/test splits are read once, up to eval.max_batches."
    )
    prompt_field: str | None = Field(
        None, description="Prompt/completion fine-tuning: the JSONL/CSV field (or dataset column) holding the prompt. The "
        "loss counts the completion's tokens only (the prompt's labels are masked); works packed or line_by_line."
    )
    completion_field: str = Field("completion", description="With data.prompt_field: the field holding the completion.")
    prompt_template: str = Field(
        "{prompt}", description="With data.prompt_field: how a prompt is written before its completion ({prompt} is "
        "replaced), e.g. 'Q: {prompt} A:'. `engine generate` writes prompts the same way."
    )
    cache_dir: str | None = Field(None, description="Tokenized-data cache; default ~/.cache/gpt2-memengine.")


class LoraConfig(Section):
    enabled: bool = Field(False, description="Train low-rank adapters only: no grads/optimizer state for the base weights.")
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        None, description="null: every matmul of a block, by family (GPT-2 c_attn, c_proj, c_fc; Llama and Qwen2 "
        "q/k/v/o_proj, gate/up/down_proj; GPT-NeoX query_key_value, dense, dense_h_to_4h, dense_4h_to_h).")
    quantize_base: Literal["none", "nf4"] = Field(
        "none",
        description="nf4: QLoRA (Dettmers et al. 2023). Every matmul weight of the frozen base's blocks is stored in 4-bit NormalFloat with double quantization (bitsandbytes Linear4bit: ~0.52 B/param "
        "instead of 2) and dequantized per use into the compute precision; the adapters train in full precision. "
        "Embeddings and LayerNorms stay unquantized; with 16-bit compute the frozen embeddings are stored in it "
        "(memory.frozen_weights_16bit), so the residual stream runs in 16 bits. The export merges the adapter into "
        "the dequantized base.",
    )


class FreezeConfig(Section):
    embeddings: bool = Field(False, description="Freeze token+position embeddings (and the tied LM head).")
    first_n_blocks: int = Field(0, ge=0, description="Freeze the first k transformer blocks (ULMFiT-style).")


class MemoryConfig(Section):
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="fp16/bf16 halve activation memory; fp16 uses dynamic loss scaling (T4: fp16 only). auto: "
        "bf16 on GPUs with bf16 (Ampere and newer) and on CPUs with native bf16 matmul (AMX or avx512-bf16, probed at "
        "run time), fp16 on GPUs without bf16 (T4, V100), fp32 on other CPUs; the run logs its choice."
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(
        0, description="ZeRO: 1 shards optimizer state, 2 also gradients, 3 also parameters, across ranks."
    )
    offload_optimizer: bool = Field(False, description="Keep optimizer state (and its step) in CPU RAM: frees 12 B/param of GPU memory.")
    offload_params: bool = Field(False, description="ZeRO-3 only: keep parameters in CPU RAM between uses.")
    activation_checkpointing: bool = Field(
        False, description="Keep only block inputs; recompute the rest in backward (about one extra forward)."
    )
    checkpoint_every_n_layers: int = Field(1, gt=0, description="Checkpoint every k-th block (1 = all): trades memory back for speed.")
    checkpoint_policy: Literal["full", "selective"] = Field(
        "full", description="What a checkpointed block keeps for backward. full: only its input, the whole block "
        "recomputed (about one extra forward). selective: also what its projections, MLP "
        "and fused attention kernels made, so backward recomputes only the cheap ops (LayerNorm, GELU, bias and "
        "residual adds, dropout; and the math attention path's score matmuls, whose seq x seq outputs cost more memory "
        "than they save time): part of the memory saving at a small part of the recompute (engine.model.SELECTIVE_SAVE)."
    )
    fused_gelu: bool | None = Field(
        None, description="Replace GPT-2's 5-op GELU by one gelu(approximate='tanh'): same function, 3 fewer saved "
        "[tokens x 4h] tensors per block (about 40% of activations with flash attention, less with the CPU math kernel). "
        "null: on for GPT-2, the only family with that GELU (true on another is rejected)."
    )
    release_host_memory: bool = Field(
        False, description="Linux/glibc host RAM: return freed blocks of 1 MiB and more to the OS at once (a fixed "
        "mmap threshold), so peak RSS follows the live tensors instead of every temporary a step ever freed (a "
        "gpt2-medium CPU step: 3.85 -> 1.57 GiB peak RSS for 1.12 GiB of tensors). Costs page faults on every large "
        "host allocation: a gpt2 fp32 CPU step 3.87 -> 4.86 s (2-core Xeon). For CPU training under a host RAM "
        "budget; the GPU presets set it for their 12 GB hosts (its cost on a GPU step is not measured).",
    )
    keep_host_memory: bool = Field(
        False, description="Linux/glibc host RAM, the opposite trade of release_host_memory: every host block from "
        "the heap, freed ones kept for reuse (no mmap, no trimming), so a CPU step's large tensors (logits, weight "
        "gradients) do not page-fault afresh every step: 1.12x the tokens/s of a gpt2 fp32 CPU step at +346 MiB of "
        "peak RSS (2-core Xeon, benchmarks/results/cpu_speed_options). The process keeps its host RAM high-water mark "
        "until it exits. For CPU training with RAM to spare.",
    )
    optimizer_in_backward: bool = Field(
        False,
        description="Step each parameter inside backward and free its gradient at once: no full-size gradient buffer "
        "(saves 4 B/param in fp32). One device; no accumulation; clipping as optim.clip_in_backward says. With fp16, an overflow skips the "
        "parameters whose gradients overflowed (ones already stepped keep their finite update) and halves the scale.",
    )
    master_weights: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: keep the weights in bf16 (2 B/param instead of 4), no fp32 master copy. Each parameter's "
        "update is computed in fp32 inside backward (optimizer_in_backward), one parameter at a time, and rounded "
        "back to bf16 stochastically, so updates smaller than bf16's resolution survive on average (Zamirai et al. "
        "2020). Needs memory.optimizer_in_backward=true and 16-bit compute: with memory.precision=fp16 (GPUs without "
        "bf16 math, e.g. the T4) matmuls run in fp16 from the bf16 weights, under fp16 loss scaling.",
    )
    loss_chunk_size: int | None = Field(
        None, gt=0,
        description="Compute logits + cross-entropy this many tokens at a time, recomputed in backward: the full "
        "[tokens x 50257] logits (and their fp32 copies) never exist. With optimizer_in_backward the tied head's "
        "weight gradient is also made at the end of backward, from the chunks' hidden states, instead of being held "
        "from the head's backward to the embedding's (vocab x hidden: 0.15 GiB bf16 / 0.30 GiB fp32 for gpt2-xl) at "
        "the cost of one more head forward. null: one pass.",
    )
    fused_head_loss: bool = Field(
        False,
        description="Compute the LM head's cross-entropy and its logits' gradient in one pass, the gradient made in "
        "place in the logits' own storage (unchunked loss only; loss_chunk_size does this per chunk). Autograd's "
        "log-softmax and its backward would allocate three more [tokens x vocab] buffers (196 MiB each per 1024 "
        "tokens in fp32) and read them twice more: on a gpt2 fp32 CPU step, 1.07x the tokens/s and 239 MiB less tracked "
        "peak (2-core Xeon). Same loss and gradients up to rounding. Under fp16 loss scaling (where the unscaled gradient could underflow in fp16) the "
        "head keeps autograd's path.",
    )
    frozen_weights_16bit: bool = Field(
        True,
        description="fp16/bf16 on the torch backend: store frozen matmul weights (LoRA base, frozen blocks) in the "
        "compute dtype. Autocast casts them anyway, so results are identical; saves 2 B/frozen param.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)


class OptimConfig(Section):
    name: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "adamw_4bit", "adafactor", "cpu_adam"] = Field(
        "adamw",
        description="adamw (fp32 states, 8 B/param); adamw_8bit / paged_adamw_8bit (bitsandbytes, 2 B/param); "
        "adamw_4bit (torchao, both moments in 4 bits, ~1 B/param; its step compiles once per parameter shape); "
        "adafactor (transformers' Adafactor with a factored second moment and no first moment, ~0 B/param; uses lr, "
        "weight_decay and update clipping at RMS 1, ignores betas/eps); cpu_adam (DeepSpeedCPUAdam, needs offload). "
        "adamw_4bit and adafactor run on the single-device torch backend.",
    )
    lr: float = Field(5e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float | None = Field(1.0, gt=0.0, description="Max global grad norm; null disables clipping.")
    clip_in_backward: Literal["stale", "exact"] = Field(
        "stale",
        description="How memory.optimizer_in_backward clips to grad_clip (each parameter steps before the global norm "
        "exists; neither way holds a model-sized buffer). stale: each gradient is scaled by grad_clip / max(the "
        "last step's global norm, this step's norm so far), the first step measured exactly; no extra time. exact: "
        "a first forward+backward measures the global norm (each gradient freed at once, nothing stepped), the "
        "stepping one uses it: the plain step's clipping, at about twice the step time.",
    )


class ScheduleConfig(Section):
    warmup_steps: int = Field(0, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Final lr as a fraction of optim.lr.")


class TrainConfig(Section):
    micro_batch_size: int = Field(8, gt=0, description="Sequences per rank per forward pass.")
    grad_accum_steps: int = Field(1, gt=0)
    global_batch_size: int | None = Field(
        None, gt=0, description="If set, grad_accum_steps is derived: global = micro x accum x world size."
    )
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; unset: run `epochs` epochs.")
    epochs: int = Field(1, gt=0)
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: Literal["auto", "torch", "deepspeed"] = Field(
        "auto", description="auto: deepspeed under a distributed launcher or with ZeRO > 0, else plain torch."
    )
    deepspeed_config: str | None = Field(None, description="A DeepSpeed JSON merged over the generated one.")
    compile_blocks: bool = Field(
        False, description="torch.compile each transformer block in place (regional compilation: one block's code "
        "compiled once and reused by every block; checkpointing, full or selective, compiled with it). The first "
        "step pays the compile (logged, and compile_s in metrics.jsonl); torch's inductor cache "
        "(TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_<user>) makes later runs of the same shapes load it."
    )
    fast_dropout: bool = Field(
        False, description="CPU: draw dropout masks from the generator's 64-bit words, 16 bits per element (p "
        "rounded to a multiple of 1/65536), instead of torch's bernoulli_ (about 5 ns per element here: 12% of a "
        "gpt2 fp32 CPU step; with fast dropout 1.13x the tokens/s), and run attention with dropout on the engine's math path that uses them (SDPA's own "
        "math path draws with bernoulli_; without dropout, and on GPUs, SDPA runs as before). Same keep probability "
        "and scaling, another random stream. GPT-2's dropout modules and attention; families without dropout are "
        "unchanged.",
    )
    preflight: bool = Field(
        True, description="Before loading the model, simulate this run's peak memory and stop if it cannot fit the "
        "free GPU memory (CPU: available RAM)."
    )
    max_bad_steps: int = Field(
        5, ge=0, description="Stop (saving the state) after this many consecutive steps with a non-finite loss or an "
        "fp16 overflow skip; 0 never stops. An fp16 loss scale at its minimum (1) stops the run too."
    )

    def accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank: grad_accum_steps, or derived from global_batch_size
        (global = micro x accum x world size)."""
        if self.global_batch_size is None:
            return self.grad_accum_steps
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by micro_batch_size "
                f"{self.micro_batch_size} x world size {world_size} = {per_step}: change one of them"
            )
        return self.global_batch_size // per_step


class EarlyStoppingConfig(Section):
    patience: int = Field(
        0, ge=0, description="Stop after this many periodic evals in a row without val_loss improving by min_delta; 0: off."
    )
    min_delta: float = Field(0.0, ge=0.0, description="An eval counts as an improvement only if val_loss falls by more than this.")


class EvalConfig(Section):
    every_n_steps: int = Field(50, ge=0, description="0 disables periodic eval.")
    max_batches: int | None = Field(None, gt=0, description="Cap validation batches per eval.")
    at_end: bool = True
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)


class CheckpointConfig(Section):
    every_n_steps: int = Field(0, ge=0, description="0: only at the end.")
    keep_last: int = Field(2, gt=0)
    resume: bool | str = Field(False, description="true: newest checkpoint in output_dir; or a checkpoint path.")
    allow_layout_change: bool = Field(
        False, description="Resume even if the global batch, seed or optimizer differ from the checkpoint's (the run is "
        "then no longer an exact continuation; another optimizer starts from a fresh state). Off: such a resume is an "
        "error naming the difference. World size, ZeRO stage and optimizer_in_backward may always change: the "
        "checkpoint is converted (engine/portable.py)."
    )
    export_merged_lora: bool = Field(True, description="Also save the LoRA adapter merged into the base weights.")
    keep_best: bool = Field(
        False, description="Checkpoint at every new lowest val_loss and keep that checkpoint past keep_last (the newest "
        "is always kept too); the final export is made from the best weights."
    )


class LoggingConfig(Section):
    output_dir: str = "runs/default"
    log_every: int = Field(10, gt=0)
    progress: bool = True
    overwrite: bool = Field(False, description="Allow reusing an output_dir that holds another run.")
    track_memory: bool = Field(
        False, description="Track tensor memory by category (parameters, gradients, optimizer, activations, "
        "temporaries) per rank and log the peak each step; costs some speed."
    )
    tensorboard: bool = Field(
        True, description="Rank 0 also writes TensorBoard events (loss, lr, tokens/s, peak memory, eval loss) to "
        "output_dir/tensorboard. On by default: it costs ~0.3 s (the import) per process, and `tensorboard --logdir runs` "
        "then follows every run. metrics.jsonl is written either way."
    )
    plots: bool = Field(
        True, description="After the run, rank 0 draws metrics.jsonl as PNGs in output_dir/plots (loss, lr, tokens/s, "
        "peak memory, overview); `engine report` redraws them or compares runs."
    )


class SampleConfig(Section):
    """Text generation settings: the end-of-run sample and the defaults of `engine generate` on a run folder."""

    prompt: str = "Once upon a time"
    max_new_tokens: int = Field(40, ge=0, description="New tokens per sequence (at most; fewer if a stop or EOS comes "
                                "first). In a run config, 0 disables the end-of-run sample.")
    greedy: bool = Field(False, description="Always take the most likely token (no sampling).")
    temperature: float = Field(0.8, gt=0.0, description="Sampling: <1 sharpens, >1 flattens the distribution.")
    top_k: int = Field(50, ge=0, description="Sampling: keep the k most likely tokens; 0: all.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Sampling: keep the smallest set of tokens with this probability mass.")
    repetition_penalty: float = Field(1.0, gt=0.0, description="Divide the logits of tokens already present by this (1: off).")
    stop: list[str] = Field(
        default_factory=list, description="Stop strings or tokens (e.g. <EOS>): generation stops there and the text is cut before it."
    )
    num_sequences: int = Field(1, gt=0, description="Sequences per prompt.")
    seed: int = Field(0, description="Sampling seed.")

    @model_validator(mode="after")
    def _greedy(self) -> "SampleConfig":
        if self.greedy:
            fields = type(self).model_fields
            sampling = [k for k in ("temperature", "top_k", "top_p") if getattr(self, k) != fields[k].default]
            if sampling:
                raise ValueError(f"greedy decoding takes the most likely token, so {'/'.join(sampling)} would be ignored: "
                                 "remove them or turn greedy off")
            if self.num_sequences > 1:
                raise ValueError("greedy decoding gives one sequence per prompt: set num_sequences=1 or sample instead")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        return self


class ClassificationConfig(Section):
    labels: list[str] | None = Field(
        None, description="task=classification: label names in id order (data labels may be these names or their integer "
        "ids); unset: the distinct labels of the train file, sorted. Saved as id2label/label2id in the exported model."
    )


class RunConfig(Section):
    task: Literal["causal_lm", "classification"] = Field(
        "causal_lm", description="causal_lm: next-token fine-tuning. classification: a classification head on labelled "
        "CSV/JSONL (GPT2ForSequenceClassification)."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    classification: ClassificationConfig = Field(default_factory=ClassificationConfig)

    @model_validator(mode="after")
    def _combinations(self) -> "RunConfig":
        check_combinations(self)
        return self

    def updated(self, changes: dict[str, Any]) -> "RunConfig":
        """A validated copy with dotted keys changed (`{"memory.precision": "bf16"}`); this config is left as it is."""
        data = self.model_dump()
        for key, value in changes.items():
            data = deep_merge(data, nest(key, value))
        return validate_dict(data)

    def backend_for(self, world_size: int) -> str:
        """"torch" or "deepspeed" for a run of `world_size` processes (the launcher's count)."""
        t, m = self.train, self.memory
        if m.optimizer_in_backward and world_size > 1:
            raise ConfigError(
                f"memory.optimizer_in_backward runs on one device, but the launcher started {world_size} processes: "
                "launch one process, or turn optimizer_in_backward off and use ZeRO"
            )
        if self.optim.name in SINGLE_DEVICE_OPTIMIZERS and world_size > 1:
            raise ConfigError(
                f"optim.name={self.optim.name} runs on one device, but the launcher started {world_size} processes: "
                "launch one process, or use optim.name=adamw_8bit (or adamw) with ZeRO"
            )
        if t.backend == "torch" and world_size > 1:
            raise ConfigError(
                f"train.backend=torch runs one process but the launcher started {world_size}: use train.backend=deepspeed"
            )
        if t.backend != "auto":
            return t.backend
        return "deepspeed" if needs_deepspeed(m.zero_stage, world_size) else "torch"


def needs_deepspeed(zero_stage: int, world_size: int = 1) -> bool:
    """The one rule for it: ZeRO (any stage > 0) and several processes run on DeepSpeed."""
    return zero_stage > 0 or world_size > 1


def check_combinations(cfg: RunConfig) -> None:
    """Reject feature combinations that cannot work, saying what to change."""
    m, o, t = cfg.memory, cfg.optim, cfg.train
    if m.offload_optimizer and m.zero_stage == 0:
        raise ValueError("memory.offload_optimizer needs ZeRO: set memory.zero_stage to 1, 2 or 3")
    if m.offload_params and m.zero_stage != 3:
        raise ValueError("memory.offload_params needs memory.zero_stage=3 (only ZeRO-3 partitions parameters)")
    if o.name in BNB_OPTIMIZERS and (m.offload_optimizer or m.offload_params):
        raise ValueError(
            f"optim.name={o.name} cannot run on offloaded optimizer state (bitsandbytes kernels need the states on the "
            "device): use optim.name=cpu_adam (or adamw) with offload, or set memory.offload_optimizer=false"
        )
    if o.name in SINGLE_DEVICE_OPTIMIZERS and (needs_deepspeed(m.zero_stage) or t.backend == "deepspeed"):
        raise ValueError(f"optim.name={o.name} runs on the single-device torch backend, not under DeepSpeed/ZeRO: set "
                         "memory.zero_stage=0 and train.backend=torch (or auto), or use optim.name=adamw_8bit with ZeRO")
    if o.name == "cpu_adam" and not m.offload_optimizer:
        raise ValueError("optim.name=cpu_adam (DeepSpeedCPUAdam) needs memory.offload_optimizer=true; otherwise use optim.name=adamw")
    if needs_deepspeed(m.zero_stage) and t.backend == "torch":
        raise ValueError(f"memory.zero_stage={m.zero_stage} needs the DeepSpeed backend: set train.backend=deepspeed (or auto)")
    if m.optimizer_in_backward:
        if needs_deepspeed(m.zero_stage) or t.backend == "deepspeed":
            raise ValueError(
                "memory.optimizer_in_backward runs on the single-device torch backend: set memory.zero_stage=0 and "
                "train.backend=torch (or auto)"
            )
        if t.grad_accum_steps > 1 or t.global_batch_size not in (None, t.micro_batch_size):
            raise ValueError(
                "memory.optimizer_in_backward steps during every backward, so gradients cannot accumulate: set "
                "train.grad_accum_steps=1 (and no larger train.global_batch_size), or turn optimizer_in_backward off"
            )
    if m.master_weights == "bf16":
        if not m.optimizer_in_backward:
            raise ValueError("memory.master_weights=bf16 updates each parameter in fp32 inside backward: set "
                             "memory.optimizer_in_backward=true, or master_weights=fp32")
        if m.precision == "fp32":
            raise ValueError("memory.master_weights=bf16 computes in 16 bits, not memory.precision=fp32: set "
                             "memory.precision=bf16 (fp16 on GPUs without bf16, or auto), or master_weights=fp32")
    if m.loss_chunk_size and m.zero_stage == 3:
        raise ValueError("memory.loss_chunk_size calls the LM head outside ZeRO-3's gather hooks: use zero_stage<=2 or unset it")
    if m.keep_host_memory and m.release_host_memory:
        raise ValueError("memory.keep_host_memory keeps freed host memory for reuse, memory.release_host_memory returns "
                         "it to the OS at once: set one of them to false")
    if m.fused_head_loss and m.loss_chunk_size:
        raise ValueError("memory.fused_head_loss is the unchunked loss's one-pass head; memory.loss_chunk_size already "
                         "makes each chunk's gradient in place: unset one of them")
    if m.fused_head_loss and m.zero_stage == 3:
        raise ValueError("memory.fused_head_loss calls the LM head outside ZeRO-3's gather hooks: use zero_stage<=2 or "
                         "unset it")
    if t.fast_dropout and cfg.model.attn_implementation == "eager":
        raise ValueError("train.fast_dropout runs attention through the engine's SDPA-based path, not "
                         "model.attn_implementation=eager: set attn_implementation=sdpa, or fast_dropout=false")
    if m.checkpoint_every_n_layers > 1 and not m.activation_checkpointing:
        raise ValueError("memory.checkpoint_every_n_layers is set but memory.activation_checkpointing=false: enable it or remove the key")
    if t.compile_blocks and m.zero_stage == 3:
        raise ValueError("train.compile_blocks with memory.zero_stage=3: ZeRO-3 gathers each block's parameters in "
                         "hooks that break the compiled graph (measured 14x slower than eager on 2 CPU ranks): use "
                         "zero_stage<=2, or turn compile_blocks off")
    if t.compile_blocks and cfg.logging.track_memory:
        raise ValueError("train.compile_blocks runs compiled kernels the memory tracker cannot see (logging.track_memory "
                         "sees eager ops only): turn one of them off")
    if m.checkpoint_policy != "full" and not m.activation_checkpointing:
        raise ValueError(f"memory.checkpoint_policy={m.checkpoint_policy} is set but memory.activation_checkpointing=false: "
                         "enable it or remove the key")
    if m.lora.quantize_base != "none":
        if not m.lora.enabled:
            raise ValueError("memory.lora.quantize_base quantizes the frozen base under LoRA adapters: set "
                             "memory.lora.enabled=true, or memory.lora.quantize_base=none")
        if needs_deepspeed(m.zero_stage) or t.backend == "deepspeed":
            raise ValueError("memory.lora.quantize_base (4-bit base weights) runs on the single-device torch backend: "
                             "set memory.zero_stage=0 and train.backend=torch (or auto)")
    if m.lora.enabled and (m.freeze.embeddings or m.freeze.first_n_blocks):
        raise ValueError("memory.lora and memory.freeze are alternatives: LoRA already freezes every base weight; disable one")
    check_model(cfg)
    check_task_and_eval(cfg)
    check_data_source(cfg.data)


def check_model(cfg: RunConfig) -> None:
    """The model keys against each other and the memory features against the model's family, where the family is
    known before loading (random init, a named size, a local folder); a hub model is checked when it loads
    (`engine.model.check_family_features`)."""
    m, mem = cfg.model, cfg.memory
    if m.init == "pretrained":
        set_keys = [k for k in (*OVERRIDE_KEYS, "family") if getattr(m, k) is not None]
        if set_keys:
            raise ValueError(f"model.{'/'.join(set_keys)} only apply to model.init=random")
    fam, shape = m.family_known(), m.shape_known()
    if m.init == "random":
        problem = fam.check(m.architecture()[1])
        if problem:
            raise ValueError(problem)
    if shape and cfg.data.block_size > shape.context:
        raise ValueError(f"data.block_size={cfg.data.block_size} exceeds the model's context of {shape.context} tokens")
    if shape and mem.freeze.first_n_blocks >= shape.n_layer:
        raise ValueError(f"memory.freeze.first_n_blocks={mem.freeze.first_n_blocks} would freeze all {shape.n_layer} blocks")
    if fam is not None:
        problem = family_feature_problem(fam, mem)
        if problem:
            raise ValueError(problem)


def family_feature_problem(fam: Family, mem: MemoryConfig) -> str | None:
    """A memory feature the family cannot take, in one line (what to change), or None."""
    if mem.fused_gelu and not fam.gpt2_gelu:
        return (f"memory.fused_gelu swaps GPT-2's five-op GELU; a {fam.model_type} model's MLP ({fam.mlp}) has none: "
                "unset it (null) or set it false")
    return None


def check_data_source(d: DataConfig) -> None:
    """data.dataset against the file keys, and what data.validation_split may be."""
    if isinstance(d.validation_split, str):
        if d.dataset is None:
            raise ValueError(f"data.validation_split={d.validation_split!r} names a split of data.dataset, which is "
                             "unset: give a fraction (e.g. 0.1) with data.train_file, or set data.dataset")
    elif not 0.0 <= d.validation_split < 0.5:
        raise ValueError(f"data.validation_split={d.validation_split} must be a fraction from 0 up to 0.5 (or, with "
                         "data.dataset, a split name)")
    if d.prompt_field is not None and "{prompt}" not in d.prompt_template:
        raise ValueError("data.prompt_template must contain {prompt} where the prompt goes, e.g. 'Q: {prompt} A:'")
    if d.prompt_field is not None and d.format == "text":
        raise ValueError("data.prompt_field reads fields, which plain text has not: use JSONL or CSV (data.format=auto, "
                         "jsonl or csv) or data.dataset")
    if d.streaming:
        if d.dataset is None:
            raise ValueError("data.streaming reads data.dataset as a stream: set data.dataset (a folder, files, a glob "
                             "or a hub id), or data.streaming=false")
        if not isinstance(d.validation_split, str) and d.validation_split > 0:
            raise ValueError("data.streaming has no end to hold a fraction out from: name a validation split "
                             "(data.validation_split=NAME) or set data.validation_split=0")
    if d.dataset is None:
        if d.test_split is not None:
            raise ValueError("data.test_split names a split of data.dataset, which is unset: set data.dataset, or "
                             "data.test_file for a file")
        return
    files = [k for k in ("train_file", "validation_file", "test_file") if getattr(d, k) is not None]
    if files:
        raise ValueError(f"data.dataset and data.{files[0]} are two sources: with data.dataset name its splits "
                         "(data.split, data.validation_split, data.test_split), or unset data.dataset")
    if d.format != "auto":
        raise ValueError("data.format is for data.train_file; data.dataset reads files by their extension: unset "
                         "data.format")


def check_task_and_eval(cfg: RunConfig) -> None:
    """task=classification and early stopping / best checkpoint: what they cannot be combined with."""
    if cfg.task == "classification":
        if cfg.memory.loss_chunk_size:
            raise ValueError("memory.loss_chunk_size chunks the LM head's [tokens x vocab] logits, which task=classification "
                             "does not have (its head outputs one score per label): unset memory.loss_chunk_size")
        if cfg.data.format == "text":
            raise ValueError("task=classification needs labelled rows: data.format=csv or jsonl (or auto with .csv/.jsonl files)")
        if cfg.data.prompt_field is not None:
            raise ValueError("data.prompt_field (prompt/completion fine-tuning) is for task=causal_lm: unset it, or "
                             "set task=causal_lm")
    elif cfg.data.format == "csv" and cfg.data.prompt_field is None:
        raise ValueError("data.format=csv is for task=classification (or prompt/completion pairs with data.prompt_field); "
                         "language-model text is text or jsonl")
    elif cfg.classification.labels is not None:
        raise ValueError("classification.labels is set but task=causal_lm: set task=classification or remove the key")
    if (cfg.eval.early_stopping.patience or cfg.checkpoint.keep_best) and not cfg.eval.every_n_steps:
        what = "eval.early_stopping.patience" if cfg.eval.early_stopping.patience else "checkpoint.keep_best"
        raise ValueError(f"{what} acts on periodic evals, but eval.every_n_steps=0: set eval.every_n_steps")
    if cfg.data.streaming and cfg.train.max_steps is None:
        raise ValueError("data.streaming: a stream's length is unknown, so epochs cannot be counted: set train.max_steps")
    if cfg.data.streaming and cfg.task == "classification":
        raise ValueError("data.streaming is for task=causal_lm (a classifier's label names need the whole train split): "
                         "set data.streaming=false")
    labels = cfg.classification.labels
    if labels is not None and (len(labels) < 2 or len(set(labels)) != len(labels)):
        raise ValueError("classification.labels needs at least two distinct names")


# ----------------------------------------------------------------------------- loading

PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = "cpu_default"


def preset_dir() -> Path:
    """configs/ of a source checkout, or the copy packaged as engine.presets in a wheel."""
    if PRESETS_DIR.is_dir():
        return PRESETS_DIR
    return Path(str(files("engine.presets")))


def resolve_config_path(name: str) -> str:
    """A path, or the name of a shipped preset (`gpt2-xl_full_t4`)."""
    p = Path(name)
    if p.exists() or p.suffix in (".yaml", ".yml") or os.sep in name:
        return name
    candidate = preset_dir() / f"{name}.yaml"
    if candidate.exists():
        return str(candidate)
    known = ", ".join(sorted(x.stem for x in preset_dir().glob("*.yaml")))
    raise ConfigError(f"--config {name}: no such file or preset (presets: {known})")


def deep_merge(base: dict, update: dict) -> dict:
    """`update` merged into a copy of `base`, recursively for nested mappings (later wins)."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _flatten_keys(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        path = f"{prefix}{k}"
        keys.append(path)
        if isinstance(v, dict):
            keys.extend(_flatten_keys(v, path + "."))
    return keys


def parse_override(text: str) -> tuple[str, Any]:
    """`optim.lr=3e-5` -> ("optim.lr", 3e-05); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.lr=3e-5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def nest(key: str, value: Any) -> dict:
    """("optim.lr", 3e-5) -> {"optim": {"lr": 3e-5}}."""
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    if p.is_dir():
        raise ConfigError(f"config path is a directory, not a YAML file: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte offset {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {p}{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections (model:, data:, ...), got {type(data).__name__}")
    return data


def load_config(paths: list[str] | str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Merge YAML files (later wins) and dotted overrides, then validate.

    Errors name the offending key and where it came from (file or command line).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [str(paths)]
    merged: dict = {}
    source: dict[str, str] = {}
    layers = [(str(p), read_yaml(p)) for p in paths or []]
    for o in overrides or []:
        key, value = parse_override(o)
        layers.append(("the command line", nest(key, value)))
    for where, data in layers:
        for k in _flatten_keys(data):
            source[k] = where
        merged = _switch_to_pretrained(merged, data)
        merged = deep_merge(merged, data)
    return validate_dict(merged, source)


RANDOM_INIT_KEYS = (*OVERRIDE_KEYS, "family")


def _switch_to_pretrained(merged: dict, layer: dict) -> dict:
    """A layer that sets `model.init: pretrained` drops the random-init architecture keys of the layers below it (a
    preset's tiny model must not leak into a pretrained run); keys the layer sets itself stay and are checked."""
    model = layer.get("model")
    if not isinstance(model, dict) or model.get("init") != "pretrained" or not isinstance(merged.get("model"), dict):
        return merged
    kept = {k: v for k, v in merged["model"].items() if k not in RANDOM_INIT_KEYS}
    return {**merged, "model": kept}


def validate_dict(data: dict, source: dict[str, str] | None = None) -> RunConfig:
    source = source or {}
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from None


def _describe(e: ValidationError, source: dict[str, str]) -> str:
    parts = []
    for err in e.errors():
        loc = [str(x) for x in err["loc"]]
        # pydantic appends union/literal branch names; keep the dotted path of real keys only
        key = ".".join(x for x in loc if not x.startswith(("function-", "literal[")))
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            section = ".".join(loc[:-1])
            known = _known_keys(section)
            msg = f"unknown key (known keys{' in ' + section if section else ''}: {', '.join(known)})"
        where = _source_of(key, source)
        if key:
            parts.append(f"{key}: {msg}" + (f" (from {where})" if where else ""))
        else:
            parts.append(msg + (f" (from {', '.join(sorted(set(source.values())))})" if source else ""))
    return "invalid config: " + "; ".join(parts)


def _source_of(key: str, source: dict[str, str]) -> str | None:
    while key:
        if key in source:
            return source[key]
        key = key.rpartition(".")[0]
    return None


def _known_keys(section: str) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in [p for p in section.split(".") if p]:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def describe_schema(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every leaf: drives `engine train --help-config`."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_schema(ann, prefix + name + "."))
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((prefix + name, repr(default), field.description or ""))
    return rows
