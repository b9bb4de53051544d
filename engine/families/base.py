"""The family interface (engine/families/__init__.py says what it is for)."""

from __future__ import annotations

from dataclasses import dataclass, field

# The engine's own random-init override keys (GPT-2's names, kept for every family) -> what they set.
OVERRIDE_KEYS = ("n_layer", "n_embd", "n_head", "n_kv_head", "n_inner", "n_positions", "vocab_size")
# transformers' config keys of the Llama layout, which Qwen2 shares (and its projections, LoRA's default targets)
LLAMA_KEYS = {"n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_head": "num_attention_heads",
              "n_kv_head": "num_key_value_heads", "n_inner": "intermediate_size",
              "n_positions": "max_position_embeddings", "vocab_size": "vocab_size"}
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """The architecture figures the planner's arithmetic and the pre-flight read (from a config dict)."""

    n_layer: int
    hidden: int
    n_head: int
    n_kv_head: int
    intermediate: int
    vocab: int
    context: int
    tied: bool


@dataclass(frozen=True)
class NamedSize:
    name: str  # the engine's name for it (model.name, `engine plan --model`)
    hub_id: str  # where from_pretrained finds its weights
    config: dict  # the published config.json's architecture keys, as the family's config class takes them


@dataclass(frozen=True)
class Family:
    model_type: str  # transformers' config.model_type
    config_class: str  # the transformers config class
    keys: dict[str, str]  # engine override key (OVERRIDE_KEYS) -> this family's config key
    blocks_attr: str  # the ModuleList of transformer blocks on the base model
    final_norm_attr: str  # the norm after the last block, on the base model
    lora_targets: tuple[str, ...]  # memory.lora.target_modules by default: every matmul of a block
    dropout_keys: tuple[str, ...]  # what model.dropout sets
    sizes: tuple[NamedSize, ...]
    position_embedding_attr: str | None = None  # a learned position table on the base model (GPT-2's wpe)
    conv1d: bool = False  # matmuls are transformers' Conv1D, weights stored [in, out] (GPT-2)
    gpt2_gelu: bool = False  # has GPT-2's five-op NewGELUActivation, which memory.fused_gelu swaps
    mlp: str = "gelu"  # what the MLP is, for messages: "gelu" (two matrices) or "swiglu" (three)
    tied_by_default: bool = False  # the config class's tie_word_embeddings when a config does not say
    defaults: dict = field(default_factory=dict)  # config keys the engine always sets for a random init

    # ---- modules of a built model (a transformers PreTrainedModel, under no wrapper)

    def body(self, lm):
        return lm.base_model

    def blocks(self, lm):
        return getattr(lm.base_model, self.blocks_attr)

    def final_norm(self, lm):
        return getattr(lm.base_model, self.final_norm_attr)

    def embeddings(self, lm) -> list:
        """The input embedding modules: the token table (also a tied head) and a learned position table."""
        pos = getattr(lm.base_model, self.position_embedding_attr) if self.position_embedding_attr else None
        return [lm.get_input_embeddings()] + ([pos] if pos is not None else [])

    # ---- configurations (dicts of config keys; transformers only in `config`)

    def shape(self, config: dict) -> Shape:
        k = self.keys
        hidden, heads = config[k["n_embd"]], config[k["n_head"]]
        kv = config.get(k["n_kv_head"]) if "n_kv_head" in k else None
        inner = config.get(k["n_inner"]) or 4 * hidden
        tied = config.get("tie_word_embeddings", self.tied_by_default)
        return Shape(config[k["n_layer"]], hidden, heads, kv or heads, inner, config["vocab_size"],
                     config[k["n_positions"]], bool(tied))

    def architecture(self, base: dict, overrides: dict) -> dict:
        """A random-init configuration: `base` (a named size's published keys) with the engine's overrides
        (OVERRIDE_KEYS, None = keep). A new width keeps the base's MLP ratio unless n_inner is given; new heads keep
        its grouping of query heads per key/value head where it divides, else one key/value head per query head."""
        out = {**self.defaults, **base}
        k, ov = self.keys, {key: v for key, v in overrides.items() if v is not None}
        if "n_embd" in ov and "n_inner" not in ov and k["n_inner"] in out and out[k["n_inner"]]:
            ov["n_inner"] = max(8, 8 * round(out[k["n_inner"]] * ov["n_embd"] / out[k["n_embd"]] / 8))
        if "n_head" in ov and "n_kv_head" in k and "n_kv_head" not in ov and out.get(k["n_kv_head"]):
            group = out[k["n_head"]] // out[k["n_kv_head"]]
            kv = max(1, ov["n_head"] // group)
            ov["n_kv_head"] = kv if ov["n_head"] % kv == 0 else ov["n_head"]
        for key, value in ov.items():
            if key not in k:
                raise ValueError(f"model.{key} does not apply to {self.model_type} models")
            out[k[key]] = value
        if "n_embd" in ov or "n_head" in ov:
            out.pop("head_dim", None)  # hidden / heads again
        return out

    def check(self, config: dict) -> str | None:
        """What is wrong with a random-init configuration, in one line, or None."""
        s = self.shape(config)
        if s.hidden % s.n_head:
            return f"model.n_embd={s.hidden} must be divisible by model.n_head={s.n_head}"
        if s.n_head % s.n_kv_head:
            return f"model.n_head={s.n_head} must be divisible by model.n_kv_head={s.n_kv_head}"
        return None

    def config(self, arch: dict, **extra):
        """The transformers config of a random-init architecture."""
        import transformers

        return getattr(transformers, self.config_class)(**{**arch, **extra})

    def named(self, name: str) -> NamedSize | None:
        return next((s for s in self.sizes if name.lower() in (s.name.lower(), s.hub_id.lower())), None)
