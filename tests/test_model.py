import pytest
import torch

from engine.config import validate_dict
from engine.errors import ModelLoadError
from engine.families import size_names
from engine.model import apply_fused_gelu, build_model, load_base_model, parameter_counts, random_config

# Parameter counts of the released checkpoints (a tied head counted once), from their model cards / safetensors.
RELEASED = {"distilgpt2": 81_912_576, "gpt2": 124_439_808, "gpt2-medium": 354_823_168,
            "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200,
            "SmolLM2-135M": 134_515_008, "SmolLM2-360M": 361_821_120, "Llama-3.2-1B": 1_235_814_400,
            "SmolLM2-1.7B": 1_711_376_384, "Qwen2.5-0.5B": 494_032_768, "Qwen2.5-1.5B": 1_543_714_304,
            "pythia-160m": 162_322_944, "pythia-410m": 405_334_016, "pythia-1b": 1_011_781_632,
            "pythia-1.4b": 1_414_647_808}
RELEASED["TinyLlama-1.1B"] = 1_100_048_384


def test_every_named_size_has_its_released_count():
    assert set(RELEASED) == set(size_names())


@pytest.mark.parametrize("size", list(RELEASED))
def test_random_init_builds_exact_architecture(size):
    from transformers import AutoModelForCausalLM

    cfg = validate_dict({"model": {"name": size, "init": "random"}})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(random_config(cfg))
    fam, arch = cfg.model.architecture()
    shape, published = fam.shape(arch), fam.named(size).config["vocab_size"]
    # At random init a vocabulary smaller than the GPT-2 tokenizer's (TinyLlama, SmolLM2) holds its 50,257 ids.
    extra_rows = (max(published, 50257) - published) * shape.hidden * (1 if shape.tied else 2)
    assert parameter_counts(model)["total"] == RELEASED[size] + extra_rows
    assert shape.vocab == max(published, 50257)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == shape.tied


def test_offline_name_gives_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = validate_dict({"model": {"name": "gpt2-xl"}})
    with pytest.raises(ModelLoadError, match=r"model.name=/path/to/gpt2-xl, or set model.init=random"):
        load_base_model(cfg, 50257)


def test_missing_local_path_message(tmp_path):
    cfg = validate_dict({"model": {"name": str(tmp_path / "nope")}})
    with pytest.raises(ModelLoadError, match="could not load model from"):
        load_base_model(cfg, 50257)


def tiny(**mem):
    return validate_dict({"model": {"init": "random", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64,
                                    "dropout": 0.0}, "data": {"block_size": 32}, "memory": mem})


def test_resize_keeps_embeddings_tied():
    model = build_model(tiny(), vocab_size=50261)
    assert model.transformer.wte.weight.shape[0] == 50261
    assert model.lm_head.weight is model.transformer.wte.weight


def test_fused_gelu_is_the_same_function_with_fewer_saved_tensors():
    """Parity (logits within 1e-5) and the saving, counted as bytes saved for backward."""
    torch.manual_seed(0)
    ref = build_model(tiny(fused_gelu=False), 50257)
    fused = build_model(tiny(fused_gelu=False), 50257)
    fused.load_state_dict(ref.state_dict())
    assert apply_fused_gelu(fused) == 2
    x = torch.randint(0, 50257, (2, 32))
    torch.testing.assert_close(fused(x).logits, ref(x).logits, atol=1e-5, rtol=1e-5)

    def saved_bytes(model):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.transformer.h[0].mlp(torch.randn(1, 32, 32, requires_grad=True))
        return total

    assert saved_bytes(fused.cpu()) < saved_bytes(ref.cpu())


def test_lora_only_adapters_train():
    cfg = tiny(lora={"enabled": True, "r": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc"]})
    model = build_model(cfg, 50257)
    counts = parameter_counts(model)
    # c_attn: in 32 -> out 96; c_fc: 32 -> 128; adapter = r*(in+out) per module, per layer
    expected = 2 * (4 * (32 + 96) + 4 * (32 + 128))
    assert counts["trainable"] == expected
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_freeze_first_blocks_and_embeddings():
    model = build_model(tiny(freeze={"embeddings": True, "first_n_blocks": 1}), 50257)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "transformer.wte.weight" in frozen and "transformer.wpe.weight" in frozen
    assert all(n.startswith(("transformer.h.0.", "transformer.w")) for n in frozen)
    assert any(p.requires_grad for n, p in model.named_parameters() if n.startswith("transformer.h.1."))


def test_lora_trains_the_rows_of_added_special_tokens():
    cfg = tiny(lora={"enabled": True, "r": 4, "alpha": 8, "target_modules": ["c_attn"]})
    model = build_model(cfg, vocab_size=50259)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    token_params = {n: c for n, c in trainable.items() if "lora_" not in n}
    assert sum(token_params.values()) == 2 * 32, trainable  # two new rows of the 32-wide embedding
    x = torch.tensor([[50257, 50258, 11, 50257]])
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
