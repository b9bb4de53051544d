"""Model families: what the engine needs to know about an architecture, in one place per family.

The memory features need a few facts that transformers' classes do not state in one common way: where a model's
blocks, final norm and position embedding sit, which linear layers LoRA targets, whether its matmuls are GPT-2's
transposed `Conv1D`, whether it has GPT-2's five-op GELU to swap, the published configurations of its named sizes
(`model.init: random` builds them exactly, offline) and the shape the planner's arithmetic reads. Each family is one
`Family` (engine/families/<model_type>.py), keyed by transformers' `config.model_type`; everything else goes through
transformers' common API (`get_input_embeddings`, `get_output_embeddings`, `base_model`).

Pure data and pure functions: no torch or transformers import at module level (the config layer reads the sizes).
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.errors import ModelLoadError
from engine.families import gpt2, gpt_neox, llama, qwen2
from engine.families.base import OVERRIDE_KEYS, Family, NamedSize, Shape  # noqa: F401 (the package's interface)

# The vendored GPT-2 tokenizer's vocabulary: a random-init model holds at least these rows, so its ids fit.
TOKENIZER_VOCAB = 50257


FAMILIES: dict[str, Family] = {f.model_type: f for f in (gpt2.FAMILY, llama.FAMILY, qwen2.FAMILY, gpt_neox.FAMILY)}


def supported() -> str:
    return ", ".join(FAMILIES)


def family(model_type: str) -> Family:
    """The family of a transformers model_type; one line naming the supported ones for any other."""
    if model_type not in FAMILIES:
        raise ModelLoadError(f"model_type {model_type!r} is not supported: the engine runs {supported()} models")
    return FAMILIES[model_type]


def family_of(model) -> Family:
    """The family of a built transformers model (its config's model_type)."""
    return family(model.config.model_type)


def context_of(config) -> int:
    """A transformers config's context length (its family's key; n_positions or max_position_embeddings otherwise)."""
    fam = FAMILIES.get(getattr(config, "model_type", None))
    key = fam.keys["n_positions"] if fam else "n_positions" if hasattr(config, "n_positions") else "max_position_embeddings"
    return int(getattr(config, key, None) or 1024)


def named_size(name: str) -> tuple[Family, NamedSize] | None:
    """A named size of any family by its engine name or hub id (case-insensitive), or None."""
    for fam in FAMILIES.values():
        size = fam.named(name)
        if size is not None:
            return fam, size
    return None


def size_names() -> list[str]:
    return [s.name for fam in FAMILIES.values() for s in fam.sizes]


def folder_config(name: str) -> dict | None:
    """A local model folder's config.json (plain JSON: no transformers import), or None if `name` is no such folder."""
    path = Path(name) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not read {path}: {e}") from None


# Keys of a saved config.json that describe the file or its tokenizer, not the architecture (a pad id would also make
# transformers look into the token ids for padding, which the simulator's fake tensors cannot answer).
_NOT_ARCHITECTURE = ("architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "auto_map",
                     "model_type", "quantization_config", "pad_token_id")


def random_architecture(name: str, family_name: str | None, overrides: dict) -> tuple[Family, dict]:
    """The configuration `model.init: random` builds, as a dict of config keys, and its family:
    - a named size (`name`): its published configuration;
    - a local model folder (`name`): its config.json (random weights in its architecture);
    - otherwise `family_name` (default gpt2) with n_layer, n_embd and n_head all given: the family's first named
      size supplies the rest (MLP ratio, key/value grouping, norms, positions).
    The overrides (OVERRIDE_KEYS, None = keep) then apply. Without a vocab_size override the model holds at least
    TOKENIZER_VOCAB rows, so the vendored GPT-2 tokenizer's ids fit. Raises ValueError with one line."""
    found = named_size(name)
    saved = None if found else folder_config(name)
    if found:
        fam, base = found[0], dict(found[1].config)
    elif saved is not None:
        fam = family(saved.get("model_type", "?"))
        base = {k: v for k, v in saved.items() if k not in _NOT_ARCHITECTURE}
    else:
        fam = FAMILIES[family_name or "gpt2"]
        if not all(overrides.get(k) for k in ("n_layer", "n_embd", "n_head")):
            raise ValueError(f"model.init=random needs a named size ({', '.join(size_names())}), a model folder, or "
                             f"model.n_layer/n_embd/n_head; got {name!r}")
        base = dict(fam.sizes[0].config)
    if family_name and family_name != fam.model_type:
        raise ValueError(f"model.family={family_name} but {name} is a {fam.model_type} model: unset model.family")
    arch = fam.architecture(base, overrides)
    if overrides.get("vocab_size") is None:
        arch["vocab_size"] = max(arch["vocab_size"], TOKENIZER_VOCAB)
    return fam, arch
