"""Build a causal LM (GPT-2, Llama, Qwen2, GPT-NeoX: by name, local path or random init of a named size) with its
memory features applied (what differs by family is asked of engine.families).

Each model-side memory feature is applied here and only here, so training, the simulator and the
benchmarks all run the same module graph:
  fused GELU swap -> activation checkpointing -> LoRA (peft) or freezing.
"""

from __future__ import annotations

import copy
import os
import types
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

from engine.config import RunConfig, family_feature_problem
from engine.errors import ConfigError, ModelLoadError
from engine.families import Family, context_of, family_of
from engine.fast_dropout import use_fast_dropout
from engine.notices import drop_late_console_handler

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def random_config(cfg: RunConfig):
    """The transformers config `model.init: random` builds: a named size's published architecture (or a folder's
    config.json, or the overrides alone) with the overrides and model.dropout applied (engine.families)."""
    fam, arch = cfg.model.architecture()
    if cfg.model.dropout is not None:
        arch.update({key: cfg.model.dropout for key in fam.dropout_keys})
    return fam.config(arch)


def checked_family(model: nn.Module, cfg: RunConfig) -> Family:
    """The built model's family; a family the engine does not run, or a memory feature it cannot take, is one line
    (a hub model's family is first known here)."""
    fam = family_of(model)
    problem = family_feature_problem(fam, cfg.memory)
    if problem:
        raise ConfigError(problem)
    return fam


def classification_head(cfg: RunConfig) -> dict:
    """Config entries of the classification head: label names travel with the saved model (id2label/label2id)."""
    labels = cfg.classification.labels
    if not labels:
        raise ConfigError("task=classification: the label names are not known yet (they come from the train data or "
                          "classification.labels)")
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)},
            "problem_type": "single_label_classification"}


def is_local_path(name: str) -> bool:
    return os.sep in name or name.startswith(".") or Path(name).exists()


def from_pretrained(load, name: str, hub_hint: str = "pass a local folder instead", **kw):
    """`load(name, **kw)` (a transformers or peft `from_pretrained`) with one-line errors: a local folder that does
    not hold a saved model, or a hub name that cannot be fetched (offline here; `hub_hint` says what to do)."""
    drop_late_console_handler("huggingface_hub")  # its offline retries go to the log file, not the console
    try:
        return load(name, **kw)
    except (OSError, ValueError) as e:
        if is_local_path(name):
            raise ModelLoadError(f"could not load model from {name}: {str(e).splitlines()[0]} "
                                 "(the folder needs config.json and model.safetensors from save_pretrained)") from None
        raise ModelLoadError(f"could not load {name!r} from the model hub (offline or unknown name): {hub_hint}") from None


def storage_dtype(cfg: RunConfig) -> torch.dtype:
    """The dtype the model is built in: bf16 with memory.master_weights=bf16; the 16-bit compute precision for a QLoRA
    base (about to be quantized: no fp32 copy of gpt2-xl on the host first); else fp32 (the backend applies the
    compute precision). Built in it directly, so no fp32 copy of a 16-bit model ever exists on the host."""
    if cfg.memory.master_weights == "bf16":
        return torch.bfloat16
    if cfg.memory.lora.quantize_base != "none" and cfg.memory.precision in ("fp16", "bf16"):  # (implies LoRA)
        return DTYPES[cfg.memory.precision]
    return torch.float32


def load_base_model(cfg: RunConfig, vocab_size: int) -> nn.Module:
    """The causal LM (task=causal_lm) or its sequence classifier (task=classification) in its storage dtype
    (`storage_dtype`), weights random or pretrained. A pretrained LM gets a new, randomly initialised head."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    m = cfg.model
    classify = cfg.task == "classification"
    head = classification_head(cfg) if classify else {}
    auto = AutoModelForSequenceClassification if classify else AutoModelForCausalLM
    if m.init == "random":
        torch.manual_seed(cfg.train.seed)
        config = random_config(cfg)
        config._attn_implementation = m.attn_implementation
        config.update(head)
        model = auto.from_config(config, dtype=storage_dtype(cfg))
    else:
        extra = dict(head, ignore_mismatched_sizes=True) if classify else {}  # another label set: a new head
        model = from_pretrained(auto.from_pretrained, m.hub_id(), attn_implementation=m.attn_implementation,
                                dtype=storage_dtype(cfg), trust_remote_code=m.trust_remote_code,
                                hub_hint=f"download it elsewhere and pass model.name=/path/to/{m.name}, or set "
                                         "model.init=random to build its architecture with random weights", **extra)
        fam = family_of(model)
        if m.dropout is not None:
            for mod in model.modules():
                if isinstance(mod, nn.Dropout):
                    mod.p = m.dropout
            for key in fam.dropout_keys:  # (also what attention kernel calls read: not an nn.Dropout)
                setattr(model.config, key, m.dropout)
    return model


def resize_vocab(model: nn.Module, vocab_size: int) -> list[int]:
    """Grow wte for added special tokens (the tied lm_head follows); returns the new token ids.

    Not rounded up to a multiple of 64 (faster on GPU) because that would change the vocabulary size users see.
    """
    old = model.get_input_embeddings().weight.shape[0]
    if vocab_size <= old:
        return []
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    return list(range(old, vocab_size))


def apply_fused_gelu(model: nn.Module) -> int:  # (GPT-2's: Family.gpt2_gelu)
    """Swap GPT-2's five-op NewGELUActivation for the single-op tanh GELU (same function, saves 1 tensor not 5)."""
    from transformers.activations import ACT2FN, NewGELUActivation

    n = 0
    for mod in model.modules():
        for name, child in mod.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(mod, name, ACT2FN["gelu_pytorch_tanh"])
                n += 1
    return n


# What selective checkpointing keeps (memory.checkpoint_policy=selective): the outputs of the ops whose recompute
# costs most FLOPs - the projections and the MLP (Conv1D/Linear lower to addmm/mm) and the fused attention kernels
# (their output and logsumexp). The rest of a block (LayerNorm, GELU, bias and residual adds, dropout, views) is
# recomputed in backward from the block input and these. A matmul's backward needs its input, which is cheap to
# recompute (a LayerNorm or GELU output), so that is what is not kept.
# The math attention path's batched matmuls (bmm/baddbmm: what attention dropout forces on CPU, and wherever no fused
# kernel applies) are recomputed too: their scores are batch x heads x seq x seq, 25 MiB per gpt2 block at 2 x 512 in
# fp32, more than all the block's other kept outputs, for ~10% of its FLOPs. Measured on the T4 recipe's form (gpt2,
# 2 x 512, 2-core Xeon): peak 1,511 -> 1,203 MiB, speed within run-to-run noise (149.8 vs 144.8 tokens/s).
SELECTIVE_SAVE = (
    "mm", "addmm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
)


def selective_checkpoint_context():
    """`torch.utils.checkpoint`'s context_fn for memory.checkpoint_policy=selective: SELECTIVE_SAVE kept, the rest
    recomputed (`create_selective_checkpoint_contexts`, a dispatch-level policy)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    keep = {getattr(torch.ops.aten, name).default for name in SELECTIVE_SAVE if hasattr(torch.ops.aten, name)}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(model: nn.Module, every_n_layers: int, policy: str = "full") -> None:
    # use_reentrant=False: works with frozen inputs (LoRA/freeze) and keyword args, and composes with ZeRO-3; it is
    # also the form that takes a selective policy (context_fn).
    kwargs = {"use_reentrant": False}
    if policy == "selective":
        kwargs["context_fn"] = selective_checkpoint_context
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
    # The KV cache is useless in training and conflicts with recompute.
    model.config.use_cache = False


def compile_blocks(model: nn.Module) -> int:
    """train.compile_blocks: `torch.compile` every transformer block in place (`nn.Module.compile`: names and state
    dict unchanged). Compiled around the block's whole call, so activation checkpointing (HF's, inside the block's
    forward) is traced with it and a selective policy goes to the compiler's partitioner; the blocks share one code
    object, so the first compiles and the rest reuse it. Compilation happens at the first step. Returns the blocks.

    Dynamo's in-process cache is reset first: every block of every model shares that code object, and its
    recompile limit (8 guard sets) would otherwise be used up by earlier runs in the process (a sweep), after which
    blocks run eager. A repeat of the same shapes then loads from inductor's disk cache, in seconds."""
    torch._dynamo.reset()
    lm = unwrap(model, through_peft=True)
    blocks = family_of(lm).blocks(lm)
    for block in blocks:
        block.compile()
    return len(blocks)


def compile_seconds() -> float:
    """Wall seconds torch.compile has spent in this process so far (dynamo's own count; 0 before any compile)."""
    try:
        from torch._dynamo.utils import calculate_time_spent

        return float(calculate_time_spent().get("total_wall_time", 0.0))
    except (ImportError, AttributeError):  # a torch without the counter: the compile time is not reported
        return 0.0


def apply_freeze(model: nn.Module, embeddings: bool, first_n_blocks: int) -> None:
    fam = family_of(model)
    if embeddings:
        # A tied head shares the token embedding's weight, so freezing it freezes the output projection too.
        for emb in fam.embeddings(model):
            for p in emb.parameters():
                p.requires_grad_(False)
    for block in fam.blocks(model)[:first_n_blocks]:
        for p in block.parameters():
            p.requires_grad_(False)


def quantize_base_4bit(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """QLoRA's base: every matmul of the blocks (GPT-2's Conv1D, the other families' nn.Linear; not the embeddings
    or heads) becomes a bitsandbytes `Linear4bit` holding its weight in NF4 with double quantization, quantized here
    on the host; returns the weights replaced. Conv1D stores [in, out], Linear4bit [out, in]: transposed once.
    Biases stay as they are (frozen)."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    n = 0
    for parent in [m for block in family_of(model).blocks(model) for m in block.modules()]:
        for name, child in list(parent.named_children()):
            if not isinstance(child, (Conv1D, nn.Linear)) or isinstance(child, bnb.nn.Linear4bit):
                continue
            weight = child.weight.detach()
            weight = weight.t() if isinstance(child, Conv1D) else weight  # [out, in]
            out_f, in_f = weight.shape
            with unset_fake_temporarily():  # (a no-op outside the simulator) the module itself, its weight set below
                q = bnb.nn.Linear4bit(in_f, out_f, bias=child.bias is not None, compute_dtype=compute_dtype,
                                      compress_statistics=True, quant_type="nf4", device="meta")
            q.support_avx512bf16_for_cpu = False  # else an eval on such a CPU repacks the weight in place for inference
            if is_fake(weight):
                q.weight = fake_4bit_weight(weight.to("cpu", compute_dtype))
            else:
                q.weight = bnb.nn.Params4bit(weight.to(compute_dtype).contiguous(), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4", module=q)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.detach(), requires_grad=False)
            setattr(parent, name, q if is_fake(weight) else q.to(weight.device))  # moving it is what quantizes it
            n += weight.numel()
    model.is_loaded_in_4bit = True  # what transformers sets for a 4-bit load; peft picks its 4-bit LoRA layer by it
    return n


def fake_4bit_weight(weight: torch.Tensor) -> nn.Parameter:
    """The memory simulator's 4-bit weight (fake tensors): bitsandbytes' own quantize_4bit on the fake weight gives
    the stored tensors' shapes (its constant maps are computed from values once, outside the fake mode)."""
    import bitsandbytes as bnb

    with unset_fake_temporarily(), torch.device("cpu"):  # (the simulator builds under the meta device)
        bnb.functional.quantize_4bit(torch.zeros(64, dtype=weight.dtype), compress_statistics=True, quant_type="nf4")
    packed, state = bnb.functional.quantize_4bit(weight, compress_statistics=True, quant_type="nf4")
    p = nn.Parameter(packed, requires_grad=False)
    # what Linear4bit.forward and peft's 4-bit LoRA layer read from a Params4bit
    p.quant_state, p.compress_statistics, p.quant_type, p.blocksize = state, True, "nf4", state.blocksize
    p.bnb_quantized, p.quant_storage = True, torch.uint8
    return p


def quant_state_tensors(p: torch.Tensor) -> list[torch.Tensor]:
    """What a 4-bit weight keeps beside its packed values: block scales (themselves quantized with double
    quantization, with their own scales) and the code tables."""
    qs = getattr(p, "quant_state", None)
    out = []
    while qs is not None:
        out += [t for t in (qs.absmax, qs.code, getattr(qs, "offset", None)) if isinstance(t, torch.Tensor)]
        qs = getattr(qs, "state2", None)
    return out


def merged_copy(peft_model: nn.Module) -> nn.Module:
    """A CPU copy of a LoRA model with its adapters merged, the training model left as it is. peft's merge, or for a
    4-bit base (QLoRA) each Linear4bit dequantized into an fp32 matmul module of the family (GPT-2's Conv1D, else
    nn.Linear) with the adapter's delta added: the plain model again (peft's own 4-bit merge would quantize the
    merged weight back to 4 bits)."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer
    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(peft_model).cpu()
    base = unwrap(model, through_peft=True)
    if not getattr(base, "is_loaded_in_4bit", False):
        return model.merge_and_unload()
    conv1d = family_of(base).conv1d
    for parent in list(base.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer) and isinstance(child.get_base_layer(), bnb.nn.Linear4bit):
                q = child.get_base_layer()
                w = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()  # [out, in]
                for adapter in child.active_adapters:
                    w += child.get_delta_weight(adapter).float()
                if conv1d:
                    merged = Conv1D(w.shape[0], w.shape[1])
                    merged.weight.data = w.t().contiguous()
                else:
                    merged = nn.Linear(w.shape[1], w.shape[0], bias=q.bias is not None)
                    merged.weight.data = w
                if q.bias is not None:
                    merged.bias.data = q.bias.detach().float()
                setattr(parent, name, merged)
    base.is_loaded_in_4bit = False
    return base


def apply_lora(model: nn.Module, cfg: RunConfig, extra_trainable: list[str] | None = None,
               new_token_ids: list[int] | None = None) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lc = cfg.memory.lora
    fam = family_of(model)
    emb = model.get_input_embeddings()
    emb_name = next(name for name, mod in model.named_modules() if mod is emb).rpartition(".")[2]
    targets = list(lc.target_modules or fam.lora_targets)
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]  # (peft's suffix match)
    if missing:
        raise ConfigError(f"memory.lora.target_modules: {', '.join(missing)} name no module of this {fam.model_type} "
                          f"model; its matmuls are {', '.join(fam.lora_targets)} (null targets them all)")
    peft_cfg = LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=targets,
        # GPT-2's Conv1D stores weights as [in, out]; QLoRA's Linear4bit stores [out, in] like nn.Linear.
        fan_in_fan_out=fam.conv1d and lc.quantize_base == "none",
        bias="none",
        # SEQ_CLS: peft adds the classification head ("score") to modules_to_save, so it trains in full and is saved.
        task_type="SEQ_CLS" if cfg.task == "classification" else "CAUSAL_LM",
        modules_to_save=extra_trainable,
        # Rows of added special tokens start random: train just those rows of the (tied) embedding.
        trainable_token_indices={emb_name: new_token_ids} if new_token_ids else None,
    )
    return get_peft_model(model, peft_cfg)


SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def special_ids_of(model: nn.Module) -> dict[str, int | None]:
    """The bos/eos/pad token ids a built model carries in its config (what `build_model` was given)."""
    config = unwrap(model, through_peft=True).config
    return {k: getattr(config, k, None) for k in SPECIAL_IDS}


def build_model(cfg: RunConfig, vocab_size: int, special_ids: dict[str, int | None] | None = None,
                training: bool = True) -> nn.Module:
    """The trainable model with every model-side memory feature of `cfg.memory` applied, its dtypes placed
    (`place_dtypes`; `training=False`: the model an export writes, frozen weights kept as built).

    `special_ids` (bos/eos/pad_token_id from the tokenizer) go into the config and generation config, so
    generation stops at a user-defined EOS."""
    model = load_base_model(cfg, vocab_size)
    fam = checked_family(model, cfg)
    new_ids = resize_vocab(model, vocab_size)
    for key, value in (special_ids or {}).items():
        if value is not None:
            setattr(model.config, key, value)
            if getattr(model, "generation_config", None) is not None:
                setattr(model.generation_config, key, value)
    context = context_of(model.config)
    if cfg.data.block_size > context:
        raise ConfigError(f"data.block_size={cfg.data.block_size} exceeds {cfg.model.name}'s context of {context} tokens")
    mem = cfg.memory
    if mem.fused_gelu is not False and fam.gpt2_gelu:  # (null: on where it applies)
        apply_fused_gelu(model)
    if cfg.train.fast_dropout and training:  # (an export's model keeps torch's dropout and SDPA)
        use_fast_dropout(model)
    if mem.activation_checkpointing:
        apply_activation_checkpointing(model, mem.checkpoint_every_n_layers, mem.checkpoint_policy)
    if mem.lora.enabled:
        if mem.lora.quantize_base == "nf4":
            quantize_base_4bit(model, DTYPES[mem.precision] if mem.precision in DTYPES else torch.float32)
        model = apply_lora(model, cfg, new_token_ids=new_ids)
    elif mem.freeze.embeddings or mem.freeze.first_n_blocks:
        apply_freeze(model, mem.freeze.embeddings, mem.freeze.first_n_blocks)
    if mem.activation_checkpointing and (mem.lora.enabled or mem.freeze.embeddings):
        # With frozen embeddings the first block's input has no grad; non-reentrant checkpointing handles that,
        # but HF's helper also makes the embedding output require grad, which costs nothing and is robust.
        unwrap(model, through_peft=True).enable_input_require_grads()
    place_dtypes(model, cfg, training)
    return model


def place_dtypes(model: nn.Module, cfg: RunConfig, training: bool = True) -> None:
    """Every dtype decision after the build, in one place (the build dtype itself is `storage_dtype`):
    - trainable parameters over a 16-bit-built base (LoRA adapters, a classifier head) train in fp32;
    - memory.master_weights=bf16: the weights themselves are bf16 (no fp32 master copy), and under fp16 compute
      (GPUs without bf16 math) `compute_fp16_from_bf16` makes the graph compute in fp16 from them;
    - training in 16 bits with memory.frozen_weights_16bit: frozen matmul weights stored in the compute dtype
      (`cast_frozen_matmul_weights`). Not for `training=False` (an export keeps the base's own fp32 weights).
    DeepSpeed casts the whole module to its 16-bit dtype itself, over what is set here."""
    mem = cfg.memory
    if mem.master_weights == "bf16" and mem.precision == "fp32":
        raise ConfigError("memory.master_weights=bf16 computes in 16 bits, but memory.precision resolved to fp32 on "
                          "this device: set master_weights=fp32 here")
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point():
            want = torch.bfloat16 if mem.master_weights == "bf16" else torch.float32
            if p.dtype != want:
                p.data = p.data.to(want)
    if not training or mem.precision not in ("fp16", "bf16"):
        return
    if mem.master_weights == "bf16" and mem.precision == "fp16":
        compute_fp16_from_bf16(model)
    if mem.frozen_weights_16bit:
        cast_frozen_matmul_weights(model, DTYPES[mem.precision], embeddings=mem.lora.quantize_base != "none")


def compute_fp16_from_bf16(model: nn.Module) -> None:
    """bf16 weights on a GPU without bf16 math (T4, V100): autocast runs every matmul in fp16 from the bf16 weights
    (a cast per use; a bf16 weight of normal magnitude is exact in fp16). Embedding lookups are not autocast ops,
    so their bf16 outputs are cast to fp16 here: otherwise bf16 + fp16 would promote the residual stream to fp32.
    LayerNorms run in fp32, as CUDA's autocast runs them (CPU autocast would meet fp16 inputs with bf16 weights, a
    combination its kernel refuses); RMSNorms (Llama, Qwen2) too, returning their input's fp16 (their own forward
    would multiply the bf16 weight into fp16 and promote the residual branch to fp32). Gradients reach the weights
    in bf16 after fp16 loss scaling."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.register_forward_hook(lambda _m, _args, out: out.to(torch.float16))
        elif isinstance(module, nn.LayerNorm):
            module.forward = types.MethodType(fp32_layer_norm, module)
        elif type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(fp32_rms_norm, module)


def fp32_layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return torch.nn.functional.layer_norm(x.float(), module.normalized_shape, module.weight.float(),
                                              module.bias.float(), module.eps)


def fp32_rms_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm (x / rms(x) * weight) in fp32, returned in the input's dtype."""
    with torch.autocast(x.device.type, enabled=False):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        return (module.weight.float() * h).to(x.dtype)


def unwrap(model: nn.Module, through_peft: bool = False) -> nn.Module:
    """The model under DeepSpeed's engine (and, with `through_peft`, under peft's PeftModel too: the transformers
    model, whose LoRA layers stay inside it)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if through_peft and hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def parameter_counts(model: nn.Module) -> dict[str, int]:
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        if getattr(p, "quant_state", None) is not None:  # a 4-bit weight: two values per stored byte
            n = p.quant_state.shape.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return {"total": total, "trainable": trainable}


def cast_frozen_matmul_weights(model: nn.Module, dtype: torch.dtype, embeddings: bool = False) -> int:
    """Store frozen Linear/Conv1D weights and biases in `dtype`; returns the parameters cast.

    Under autocast these are cast to `dtype` at every use anyway (addmm/linear are autocast-to-16-bit ops), so
    keeping them in 16-bit changes no result. Embedding weights (also the tied LM head) and LayerNorm stay fp32:
    they feed fp32 paths (the residual stream, layer_norm), where 16-bit storage would change results. With
    `embeddings` (QLoRA) frozen embeddings are cast too: the residual stream then runs in 16 bits, and the tied LM
    head needs no 16-bit copy of the embedding per use.
    """
    from transformers.pytorch_utils import Conv1D

    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    n = 0
    for m in model.modules():
        if embeddings and isinstance(m, nn.Embedding):
            for p in m.parameters(recurse=False):
                if not p.requires_grad and p.dtype != dtype:
                    p.data = p.data.to(dtype)
                    n += p.numel()
        if isinstance(m, (nn.Linear, Conv1D)):
            for name, p in m.named_parameters(recurse=False):
                if not p.requires_grad and p.is_floating_point() and id(p) not in embedding_params and p.dtype != dtype:
                    p.data = p.data.to(dtype)
                    n += p.numel()
    return n
