"""Llama architecture (transformers' LlamaForCausalLM): TinyLlama, Llama 3.2, SmolLM2.

RMSNorm, rotary positions, grouped-query attention and a SwiGLU MLP (gate, up, down: three matrices).
Configurations as published in each model's config.json (parameter counts checked against the model cards). At
random init TinyLlama's 32,000 and SmolLM2's 49,152 embedding rows become 50,257: the vendored GPT-2 tokenizer's ids
must fit (model.vocab_size sets them exactly, with a tokenizer of that size)."""

from engine.families.base import LLAMA_KEYS, LLAMA_PROJECTIONS, Family, NamedSize

ROPE = {"rope_type": "default"}

FAMILY = Family(
    model_type="llama",
    config_class="LlamaConfig",
    keys=LLAMA_KEYS,
    blocks_attr="layers",
    final_norm_attr="norm",
    lora_targets=LLAMA_PROJECTIONS,
    dropout_keys=("attention_dropout",),
    mlp="swiglu",
    defaults={"bos_token_id": 50256, "eos_token_id": 50256, "hidden_act": "silu"},
    sizes=(
        NamedSize("SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M", {
            "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
            "intermediate_size": 1536, "max_position_embeddings": 8192, "vocab_size": 49152, "rms_norm_eps": 1e-5,
            "rope_parameters": {**ROPE, "rope_theta": 100000.0}, "tie_word_embeddings": True}),
        NamedSize("SmolLM2-360M", "HuggingFaceTB/SmolLM2-360M", {
            "num_hidden_layers": 32, "hidden_size": 960, "num_attention_heads": 15, "num_key_value_heads": 5,
            "intermediate_size": 2560, "max_position_embeddings": 8192, "vocab_size": 49152, "rms_norm_eps": 1e-5,
            "rope_parameters": {**ROPE, "rope_theta": 100000.0}, "tie_word_embeddings": True}),
        NamedSize("TinyLlama-1.1B", "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", {
            "num_hidden_layers": 22, "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4,
            "intermediate_size": 5632, "max_position_embeddings": 2048, "vocab_size": 32000, "rms_norm_eps": 1e-5,
            "rope_parameters": {**ROPE, "rope_theta": 10000.0}, "tie_word_embeddings": False}),
        NamedSize("Llama-3.2-1B", "meta-llama/Llama-3.2-1B", {
            "num_hidden_layers": 16, "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 8,
            "intermediate_size": 8192, "max_position_embeddings": 131072, "vocab_size": 128256, "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                "original_max_position_embeddings": 8192},
            "tie_word_embeddings": True}),
        NamedSize("SmolLM2-1.7B", "HuggingFaceTB/SmolLM2-1.7B", {
            "num_hidden_layers": 24, "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 32,
            "intermediate_size": 8192, "max_position_embeddings": 8192, "vocab_size": 49152, "rms_norm_eps": 1e-5,
            "rope_parameters": {**ROPE, "rope_theta": 130000.0}, "tie_word_embeddings": True}),
    ),
)
