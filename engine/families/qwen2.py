"""Qwen2 (transformers' Qwen2ForCausalLM): Qwen2.5 0.5B and 1.5B.

Llama's layout with biases on the query/key/value projections and a 151,936-token vocabulary (tied at these
sizes). Configurations as published in each model's config.json (parameter counts checked against the model
cards)."""

from engine.families.base import LLAMA_KEYS, LLAMA_PROJECTIONS, Family, NamedSize

FAMILY = Family(
    model_type="qwen2",
    config_class="Qwen2Config",
    keys=LLAMA_KEYS,
    blocks_attr="layers",
    final_norm_attr="norm",
    lora_targets=LLAMA_PROJECTIONS,
    dropout_keys=("attention_dropout",),
    mlp="swiglu",
    defaults={"bos_token_id": 50256, "eos_token_id": 50256, "hidden_act": "silu", "use_sliding_window": False},
    sizes=(
        NamedSize("Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B", {
            "num_hidden_layers": 24, "hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2,
            "intermediate_size": 4864, "max_position_embeddings": 32768, "vocab_size": 151936, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "tie_word_embeddings": True}),
        NamedSize("Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B", {
            "num_hidden_layers": 28, "hidden_size": 1536, "num_attention_heads": 12, "num_key_value_heads": 2,
            "intermediate_size": 8960, "max_position_embeddings": 131072, "vocab_size": 151936, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "tie_word_embeddings": True}),
    ),
)
