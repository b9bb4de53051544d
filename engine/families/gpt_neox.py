"""GPT-NeoX (transformers' GPTNeoXForCausalLM): the Pythia suite.

LayerNorm, rotary positions on a quarter of each head, parallel attention and MLP, fused query/key/value, exact
GELU, untied input and output embeddings. Configurations as published in each model's config.json (parameter
counts checked against the model cards)."""

from engine.families.base import Family, NamedSize


def _pythia(name: str, n_layer: int, hidden: int, heads: int) -> NamedSize:
    return NamedSize(name, f"EleutherAI/{name}", {
        "num_hidden_layers": n_layer, "hidden_size": hidden, "num_attention_heads": heads,
        "intermediate_size": 4 * hidden, "max_position_embeddings": 2048, "vocab_size": 50304,
        "layer_norm_eps": 1e-5, "use_parallel_residual": True, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000, "partial_rotary_factor": 0.25}})


FAMILY = Family(
    model_type="gpt_neox",
    config_class="GPTNeoXConfig",
    keys={"n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_head": "num_attention_heads",
          "n_inner": "intermediate_size", "n_positions": "max_position_embeddings", "vocab_size": "vocab_size"},
    blocks_attr="layers",
    final_norm_attr="final_layer_norm",
    lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    dropout_keys=("attention_dropout", "hidden_dropout"),
    defaults={"bos_token_id": 50256, "eos_token_id": 50256, "hidden_act": "gelu"},
    sizes=(
        _pythia("pythia-160m", 12, 768, 12),
        _pythia("pythia-410m", 24, 1024, 16),
        _pythia("pythia-1b", 16, 2048, 8),
        _pythia("pythia-1.4b", 24, 2048, 16),
    ),
)
