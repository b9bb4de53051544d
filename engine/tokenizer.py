"""The tokenizer of a run or of a trained model, and the fingerprint that identifies it.

Every GPT-2 size shares one BPE vocabulary, vendored in `engine/assets/gpt2-tokenizer`, so nothing is
downloaded; a folder with its own tokenizer files (a saved model, `model.tokenizer`) takes precedence, and a
pretrained hub model other than the named GPT-2 sizes brings its own from the hub. Random-init models of every
family use the vendored one (engine.families sizes their embeddings to hold its ids).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from engine.config import ModelConfig
from engine.families import named_size
from engine.errors import DataError, ModelLoadError
from engine.notices import drop_late_console_handler

TOKENIZER_DIR = Path(__file__).parent / "assets" / "gpt2-tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def has_tokenizer_files(folder: str | Path) -> bool:
    p = Path(folder)
    return p.is_dir() and any((p / f).exists() for f in TOKENIZER_FILES)


def _ready(tok):
    """Padding reuses EOS (pad positions are masked out of attention and loss, so it adds no embedding row);
    lengths are checked against block_size / the model's context, not the tokenizer's own limit."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.model_max_length = 10**9
    return tok


def load_tokenizer(model_cfg: ModelConfig):
    """A run's tokenizer: the vendored GPT-2 BPE unless `model.tokenizer` (or a model folder with tokenizer files)
    gives one, plus the configured special tokens."""
    from transformers import AutoTokenizer, GPT2TokenizerFast

    folder = model_cfg.tokenizer
    if folder is None and has_tokenizer_files(model_cfg.name):
        folder = model_cfg.name
    if folder is None and uses_hub_tokenizer(model_cfg):
        tok = hub_tokenizer(model_cfg)
    elif folder is None:
        tok = GPT2TokenizerFast.from_pretrained(str(TOKENIZER_DIR))
    else:
        if not has_tokenizer_files(folder):
            raise DataError(f"model.tokenizer: {folder} is not a folder with tokenizer files (tokenizer.json or vocab.json)")
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=model_cfg.trust_remote_code)
    st = model_cfg.special_tokens
    special = {k: v for k, v in (("bos_token", st.bos), ("eos_token", st.eos), ("pad_token", st.pad)) if v}
    if special:
        tok.add_special_tokens(special)
    if st.additional:
        tok.add_special_tokens({"additional_special_tokens": list(st.additional)})
    if tok.eos_token is None:
        tok.add_special_tokens({"eos_token": "<|endoftext|>"})
    return _ready(tok)


def uses_hub_tokenizer(model_cfg: ModelConfig) -> bool:
    """A pretrained model from the hub whose tokenizer is not the vendored GPT-2 BPE (any hub id but a GPT-2 size)."""
    name = model_cfg.name
    if model_cfg.init != "pretrained" or name.startswith((".", "/", "~")) or Path(name).exists():
        return False  # (a path: its folder's tokenizer files, or the vendored one)
    found = named_size(model_cfg.name)
    return found is None or found[0].model_type != "gpt2"


def hub_tokenizer(model_cfg: ModelConfig):
    from transformers import AutoTokenizer

    drop_late_console_handler("huggingface_hub")  # its offline retries go to the log file, not the console
    try:
        return AutoTokenizer.from_pretrained(model_cfg.hub_id(), trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError):
        raise ModelLoadError(f"could not load the tokenizer of {model_cfg.name!r} from the model hub (offline or "
                             f"unknown name): download the model elsewhere and pass model.name=/path/to/{model_cfg.name}, "
                             "or set model.init=random to build its architecture with random weights") from None


def tokenizer_of(folder: str):
    """The tokenizer saved with a trained model (or adapter); the vendored GPT-2 BPE if the folder has none."""
    from transformers import AutoTokenizer

    if Path(folder).is_dir() and not has_tokenizer_files(folder):
        return load_tokenizer(ModelConfig())
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the tokenizer of {folder}: {str(e).splitlines()[0]}") from None
    return _ready(tok)


def tokenizer_fingerprint(tok) -> str:
    """Identifies a vocabulary (tokens and ids, added tokens included) and its special tokens: a resume with another
    tokenizer would train embeddings on the wrong rows, and a tokenization cache made with another EOS is stale."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    specials = [tok.bos_token, tok.eos_token, tok.pad_token]
    return hashlib.sha256(json.dumps([vocab, specials], ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
