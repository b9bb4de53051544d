"""GPT-2 (transformers' GPT2LMHeadModel): the engine's reference family."""

from engine.families.base import Family, NamedSize


def _size(name: str, n_layer: int, n_embd: int, n_head: int, hub_id: str | None = None) -> NamedSize:
    return NamedSize(name, hub_id or name, {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head,
                                            "n_positions": 1024, "vocab_size": 50257})


FAMILY = Family(
    model_type="gpt2",
    config_class="GPT2Config",
    keys={"n_layer": "n_layer", "n_embd": "n_embd", "n_head": "n_head", "n_inner": "n_inner",
          "n_positions": "n_positions", "vocab_size": "vocab_size"},
    blocks_attr="h",
    final_norm_attr="ln_f",
    position_embedding_attr="wpe",
    lora_targets=("c_attn", "c_proj", "c_fc"),
    dropout_keys=("resid_pdrop", "embd_pdrop", "attn_pdrop"),
    conv1d=True,
    gpt2_gelu=True,
    tied_by_default=True,
    defaults={"bos_token_id": 50256, "eos_token_id": 50256},
    # the released checkpoints (hub names are their own aliases)
    sizes=(
        _size("distilgpt2", 6, 768, 12),
        _size("gpt2", 12, 768, 12),
        _size("gpt2-medium", 24, 1024, 16),
        _size("gpt2-large", 36, 1280, 20),
        _size("gpt2-xl", 48, 1600, 25),
    ),
)
