"""The recipe catalog (engine/recipes.py): every recipe is a valid config, and the planner, the presets and the
benchmarks get from it exactly the settings they spelled out themselves before (c672551)."""

from pathlib import Path

import pytest
import yaml

from engine.config import load_config, resolve_config_path
from engine.memory.gpus import GPU
from engine.plan import Request, activation_choices, config_overrides, strategies
from engine.recipes import CATALOG, recipe

ROOT = Path(__file__).resolve().parent.parent


def settings(overrides) -> dict[str, str]:
    """key -> value text, refusing a key set twice (where order would matter)."""
    items = [o.split("=", 1) for o in overrides]
    assert len({k for k, _ in items}) == len(items), overrides
    return dict(items)


@pytest.mark.parametrize("key", list(CATALOG))
def test_every_recipe_validates_as_a_config(key):
    r = CATALOG[key]
    assert r.key == key and r.title and r.overrides
    cfg = load_config(None, list(r.overrides))
    assert cfg.memory.optimizer_in_backward == r.in_backward and cfg.memory.zero_stage == r.zero_stage
    assert cfg.memory.offload_optimizer == r.offload_optimizer and cfg.memory.offload_params == r.offload_params
    assert cfg.memory.lora.enabled == r.lora
    settings(r.overrides)


def test_every_planner_candidate_validates_in_each_precision():
    """What `engine plan` writes for each candidate (with the GPU's precision, its most changed activations) loads."""
    for lora in (False, True):
        for gpus in (1, 2):
            for bf16 in (False, True):
                req = Request(gpu=GPU("x", 16_000, bf16=bf16, peak_tflops=65), gpus=gpus, lora=lora)
                for s in strategies(req):
                    load_config(None, config_overrides(req, s, activation_choices(s)[-1], 1, 1))


# The planner's candidates as spelled in engine/plan.py at c672551: name -> (settings, zero stage, offload optimizer,
# offload params, in backward, quality rank, has a quality note).
INB = {"memory.optimizer_in_backward": "true"}  # (clipping at the default 1.0 since clipping in backward)
OFF = {"optim.name": "cpu_adam", "memory.offload_optimizer": "true"}
LORA = {"optim.name": "adamw", "memory.lora.enabled": "true", "memory.lora.r": "16", "memory.lora.alpha": "32"}
PLANNER = {
    (False, 1): {
        "AdamW": ({"optim.name": "adamw"}, 0, False, False, False, 0, False),
        "AdamW8bit": ({"optim.name": "adamw_8bit"}, 0, False, False, False, 1, False),
        "AdamW, in-backward": ({"optim.name": "adamw", **INB}, 0, False, False, True, 0, False),
        "AdamW8bit, in-backward": ({"optim.name": "adamw_8bit", **INB}, 0, False, False, True, 1, True),
        "AdamW8bit, in-backward, bf16 weights": ({"optim.name": "adamw_8bit", **INB, "memory.master_weights": "bf16"},
                                                 0, False, False, True, 2, True),
        "AdamW4bit, in-backward, bf16 weights": ({"optim.name": "adamw_4bit", **INB, "memory.master_weights": "bf16"},
                                                 0, False, False, True, 3, True),
        "Adafactor, in-backward, bf16 weights": ({"optim.name": "adafactor", **INB, "memory.master_weights": "bf16"},
                                                 0, False, False, True, 4, True),
        "ZeRO-2 + optimizer offload": ({**OFF, "memory.zero_stage": "2"}, 2, True, False, False, 0, False),
        "ZeRO-3 + optimizer/param offload": ({**OFF, "memory.zero_stage": "3", "memory.offload_params": "true"},
                                             3, True, True, False, 0, False),
    },
    (False, 2): {
        "ZeRO-1, AdamW": ({"optim.name": "adamw", "memory.zero_stage": "1"}, 1, False, False, False, 0, False),
        "ZeRO-2, AdamW": ({"optim.name": "adamw", "memory.zero_stage": "2"}, 2, False, False, False, 0, False),
        "ZeRO-2, AdamW8bit": ({"optim.name": "adamw_8bit", "memory.zero_stage": "2"}, 2, False, False, False, 0, False),
        "ZeRO-3, AdamW": ({"optim.name": "adamw", "memory.zero_stage": "3"}, 3, False, False, False, 0, False),
        "ZeRO-2 + optimizer offload": ({**OFF, "memory.zero_stage": "2"}, 2, True, False, False, 0, False),
        "ZeRO-3 + optimizer offload": ({**OFF, "memory.zero_stage": "3"}, 3, True, False, False, 0, False),
        "ZeRO-3 + optimizer/param offload": ({**OFF, "memory.zero_stage": "3", "memory.offload_params": "true"},
                                             3, True, True, False, 0, False),
    },
    (True, 1): {
        "LoRA r16, AdamW": (LORA, 0, False, False, False, 0, True),
        "QLoRA r16 (NF4 base), AdamW": ({**LORA, "memory.lora.quantize_base": "nf4"}, 0, False, False, False, 1, True),
    },
    (True, 2): {"LoRA r16, AdamW, ZeRO-2": ({**LORA, "memory.zero_stage": "2"}, 2, False, False, False, 0, False)},
}


@pytest.mark.parametrize("lora,gpus", list(PLANNER))
def test_planner_candidates_are_what_they_were(lora, gpus):
    got = strategies(Request(gpus=gpus, lora=lora))
    assert [s.name for s in got] == list(PLANNER[(lora, gpus)])  # names key the recorded plan figures
    for s in got:
        want, stage, off_opt, off_par, inb, rank, noted = PLANNER[(lora, gpus)][s.name]
        assert settings(s.overrides) == want, s.name
        assert (s.zero_stage, s.offload_optimizer, s.offload_params, s.in_backward, s.quality_rank) == \
            (stage, off_opt, off_par, inb, rank), s.name
        assert bool(s.quality) == noted, s.name


@pytest.mark.parametrize("preset,key", [("gpt2-xl_full_t4", "adamw_8bit_inb"), ("gpt2-xl_full_8gb", "bf16_8bit"),
                                        ("gpt2-xl_qlora_4gb", "qlora"), ("gpt2-large_lora_8gb", "lora"),
                                        ("gpt2-xl_zero2_offload", "zero2_offload"), ("gpt2-xl_zero3_node", "zero3_adamw"),
                                        ("qwen2.5-1.5b_full_8gb", "bf16_8bit"), ("qwen2.5-1.5b_qlora_4gb", "qlora"),
                                        ("llama-3.2-1b_full_8gb", "bf16_8bit"), ("llama-3.2-1b_qlora_4gb", "qlora")])
def test_presets_hold_their_catalog_recipe(preset, key):
    """The benchmarks measure presets as these recipes: the recipe's overrides change nothing in its preset."""
    path = [resolve_config_path(preset)]
    assert load_config(path, list(recipe(key).overrides)).model_dump() == load_config(path).model_dump()


def test_benchmark_recipes_are_what_they_were():
    """A few of the benchmarks' recipes against their spellings at c672551 (same keys and values), and their CLI
    names unchanged."""
    from benchmarks import gpu_check, quality, run, single_device

    assert list(quality.RECIPES) == ["reference", "reference_noclip", "adamw_bf16", "adamw_8bit_inb",
                                     "adamw_8bit_inb_exact", "adamw_8bit_inb_noclip", "bf16_8bit", "bf16_4bit",
                                     "bf16_adafactor", "lora", "qlora"]
    clip = {"optim.grad_clip": "1.0"}  # pinned by the quality benchmark, whatever the default
    assert settings(quality.RECIPES["reference"]) == {"optim.name": "adamw", "memory.precision": "fp32", **clip}
    assert settings(quality.RECIPES["reference_noclip"]) == {"optim.name": "adamw", "memory.precision": "fp32",
                                                             "optim.grad_clip": "null"}
    assert settings(quality.RECIPES["bf16_4bit"]) == {"optim.name": "adamw_4bit", **INB, "memory.precision": "bf16",
                                                      "memory.master_weights": "bf16", **clip}
    assert settings(quality.RECIPES["adamw_8bit_inb_exact"]) == {"optim.name": "adamw_8bit", **INB, **clip,
                                                                 "memory.precision": "fp32",
                                                                 "optim.clip_in_backward": "exact"}
    assert settings(quality.RECIPES["qlora"]) == {**LORA, "memory.lora.dropout": "0.0", "memory.precision": "bf16",
                                                  "memory.lora.quantize_base": "nf4", **clip}
    assert sorted(single_device.RECIPES) == ["adafactor", "adamw_4bit", "bf16_weights", "bf16_weights_compiled",
                                             "bf16_weights_fast_dropout", "bf16_weights_fast_dropout_kept",
                                             "bf16_weights_selective", "full", "lora", "qlora"]
    assert single_device.RECIPES["bf16_weights_fast_dropout_kept"] == (
        ["--config", "gpt2-xl_full_8gb"],
        ["train.fast_dropout=true", "memory.release_host_memory=false", "memory.keep_host_memory=true"])
    assert single_device.RECIPES["bf16_weights_selective"] == (["--config", "gpt2-xl_full_8gb"],
                                                               ["memory.checkpoint_policy=selective"])
    preset, extra = single_device.RECIPES["qlora"]
    assert preset == ["--config", "gpt2-xl_qlora_4gb"] and settings(extra) == {
        "memory.optimizer_in_backward": "false", "optim.grad_clip": "1.0", **LORA, "memory.precision": "bf16",
        "memory.lora.quantize_base": "nf4", "train.global_batch_size": "null"}
    assert single_device.RECIPES["adamw_4bit"] == (["--config", "gpt2-xl_full_8gb"], ["optim.name=adamw_4bit"])
    assert list(gpu_check.RECIPES) == ["t4 preset", "8gb preset", "qlora preset", "adafactor bf16 weights", "adamw",
                                       "adamw8bit+ckpt", "lora preset", "adamw fp16", "zero2 1 rank", "zero3 1 rank",
                                       "t4 preset, selective recompute", "t4 preset, compiled blocks",
                                       "t4 preset, selective + compiled", "adamw, fused head loss"]
    assert gpu_check.RECIPES["adamw, fused head loss"] == (None, ["optim.name=adamw", "memory.fused_head_loss=true"])
    assert gpu_check.RECIPES["adamw8bit+ckpt"] == (None, ["optim.name=adamw_8bit", "memory.activation_checkpointing=true"])
    assert gpu_check.RECIPES["adamw fp16"] == (None, ["optim.name=adamw", "memory.precision=fp16"])
    assert gpu_check.RECIPES["zero3 1 rank"] == (None, ["memory.zero_stage=3"])
    assert settings(run.BASELINE_RECIPE) == {
        "memory.precision": "fp32", "optim.name": "adamw", "optim.grad_clip": "1.0", "memory.fused_gelu": "false",
        "memory.activation_checkpointing": "false", "memory.loss_chunk_size": "null", "memory.lora.enabled": "false",
        "memory.optimizer_in_backward": "false", "memory.zero_stage": "0", "memory.offload_optimizer": "false"}


def test_matrices_expand_catalog_recipes_in_place():
    from benchmarks.run import expand, with_recipes

    matrix = yaml.safe_load((ROOT / "benchmarks/matrices/low_memory_options.yaml").read_text())
    jobs = dict(expand(matrix))
    base = matrix["base"]
    assert jobs["bf16 weights + 4-bit AdamW"][len(base):] == [
        "memory.precision=bf16", "optim.name=adamw_4bit", "memory.optimizer_in_backward=true",
        "memory.master_weights=bf16"]
    assert settings(jobs["t4-recipe (fp32 weights, 8-bit AdamW in backward)"][len(base):]) == {
        "memory.precision": "fp32", "optim.name": "adamw_8bit", **INB}
    for path in sorted((ROOT / "benchmarks/matrices").glob("*.yaml")):  # every recipe= names a catalog recipe
        assert all(not o.startswith("recipe=") for _, ov in expand(yaml.safe_load(path.read_text())) for o in ov)
    with pytest.raises(SystemExit, match="recipe=nope: no such recipe"):
        with_recipes(["recipe=nope"])
