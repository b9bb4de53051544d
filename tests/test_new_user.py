"""Defects a new user hit (issue 13), one test each: machine-independent fp16 checks, options between overrides,
a pretrained model from the default preset, `memory.precision: auto`, and library noise kept off the console."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import run_cli, run_main, tiny_overrides, flat_overrides
from engine.backends.deepspeed_backend import precision_problem
from engine.cli import library_notices_to_file, parse_args
from engine.config import DEFAULT_PRESET, load_config, resolve_config_path
from engine.devices import cpu_has_native_bf16, resolve_precision
from engine.errors import ConfigError


class FakeAccelerator:
    def __init__(self, fp16: bool):
        self.fp16 = fp16

    def is_fp16_supported(self) -> bool:
        return self.fp16

    def device_name(self) -> str:
        return "cpu"


def test_deepspeed_fp16_check_follows_the_probe_not_the_machine():
    """1. DeepSpeed's CPU accelerator reports fp16 on CPUs with fp16 kernels (AMX-FP16, avx512-fp16) and not on others:
    the check answers from the probe, so the same test holds on every x86-64 CPU."""
    assert "fp16 is not supported by DeepSpeed on cpu: use bf16 or fp32" in precision_problem("fp16", FakeAccelerator(False))
    assert precision_problem("fp16", FakeAccelerator(True)) is None
    assert precision_problem("bf16", FakeAccelerator(False)) is None and precision_problem("fp32", FakeAccelerator(False)) is None


def test_deepspeed_fp16_on_this_cpu_matches_its_probe(corpus, tmp_path):
    """On this machine, whatever its CPU: a run is rejected at start-up exactly when the accelerator says no fp16."""
    from deepspeed.accelerator import get_accelerator

    from engine.backends.deepspeed_backend import DeepSpeedBackend
    from engine.config import validate_dict
    from engine.distributed import DistEnv

    cfg = validate_dict(tiny_overrides(corpus, tmp_path / "r", memory={"zero_stage": 1, "precision": "fp16"}))
    if get_accelerator().is_fp16_supported():
        pytest.skip("this CPU has fp16 kernels: DeepSpeed fp16 is allowed here (the probe test covers the rule)")
    with pytest.raises(ConfigError, match="fp16 is not supported by DeepSpeed on cpu: use bf16 or fp32"):
        DeepSpeedBackend(cfg, DistEnv(), model=None, total_steps=1)


def test_options_may_come_between_overrides():
    """2. `engine train data.train_file=x.txt --resume CKPT logging.output_dir=out` (argparse's intermixed parsing)."""
    args = parse_args(["train", "data.train_file=x.txt", "--resume", "CKPT", "logging.output_dir=out", "--dry-run",
                       "optim.lr=1e-4"])
    assert args.overrides == ["data.train_file=x.txt", "logging.output_dir=out", "optim.lr=1e-4"]
    assert args.resume == "CKPT" and args.dry_run and args.command == "train"
    args = parse_args(["--local_rank=0", "train", "a.b=1", "--config", "p", "c.d=2"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.config == ["p"]
    args = parse_args(["eval", "run1", "--batch-size", "2", "run2"])  # several models around an option
    assert args.models == ["run1", "run2"] and args.batch_size == 2


def test_options_between_overrides_end_to_end(corpus, tmp_path):
    base = flat_overrides(tiny_overrides(corpus, tmp_path / "run"))
    rc, out, err = run_main(["train", *base[:3], "--dry-run", *base[3:]])
    assert rc == 0, err
    assert '"total_steps": 6' in out


def test_pretrained_model_from_the_default_preset_needs_two_keys(lm_runs, tmp_path):
    """3. `model.init=pretrained model.name=PATH` over the default preset: its random-init architecture keys do not
    leak into the pretrained run; set in the same layer as init=pretrained they are still an error. The folder's own
    context is checked against data.block_size at once."""
    preset = resolve_config_path(DEFAULT_PRESET)
    model_dir = str(lm_runs["full"] / "model")
    # this saved model's context is 64 tokens, the preset's blocks 128: known from its config.json, before loading
    with pytest.raises(ConfigError, match="data.block_size=128 exceeds the model's context of 64 tokens"):
        load_config([preset], ["model.init=pretrained", f"model.name={model_dir}"])
    blocks = "data.block_size=64"
    cfg = load_config([preset], ["model.init=pretrained", f"model.name={model_dir}", blocks])
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head, cfg.model.n_positions) == (None,) * 4
    assert cfg.model.name == model_dir and cfg.optim.lr == load_config([preset]).optim.lr  # the rest of the preset stays
    with pytest.raises(ConfigError, match="only apply to model.init=random"):
        load_config([preset], ["model.init=pretrained", f"model.name={model_dir}", "model.n_layer=2", blocks])
    rc, out, err = run_main(["train", "model.init=pretrained", f"model.name={model_dir}", blocks, "--dry-run",
                             f"logging.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"])
    assert rc == 0, err
    assert "n_layer: null" in out and f"name: {model_dir}" in out


@pytest.mark.parametrize("device,cuda_bf16,features,expected", [
    ("cuda", True, set(), "bf16"),  # Ampere and newer
    ("cuda", False, set(), "fp16"),  # T4, V100
    ("cpu", None, {"avx2", "amx_bf16", "amx_tile"}, "bf16"),  # Sapphire Rapids and newer
    ("cpu", None, {"avx2", "avx512_bf16"}, "bf16"),  # Cooper Lake, Zen 4
    ("cpu", None, {"avx2", "avx512_f"}, "fp32"),  # no native bf16 matmul
])
def test_precision_auto_resolves_by_probed_capability(device, cuda_bf16, features, expected):
    """4. memory.precision=auto (the default): bf16 where the hardware multiplies it natively, fp16 on GPUs without
    bf16, fp32 on other CPUs. An explicit precision is kept."""
    precision, why = resolve_precision("auto", torch.device(device), cuda_bf16=cuda_bf16, cpu_features_=features)
    assert precision == expected and why
    assert resolve_precision("fp32", torch.device(device), cuda_bf16=cuda_bf16, cpu_features_=features)[0] == "fp32"
    assert load_config(None, []).memory.precision == "auto"


def test_the_run_logs_the_precision_auto_chose(corpus, tmp_path):
    expected = "bf16" if cpu_has_native_bf16() else "fp32"
    rc, out, err = run_main(["train", "--dry-run", *flat_overrides(tiny_overrides(corpus, tmp_path / "run")),
                             "memory.precision=auto"])
    assert rc == 0, err
    assert f"precision: {expected} (" in out and "memory.precision=auto" in out
    assert f'"precision": "{expected}"' in out  # the plan (and the run's config.yaml) holds the resolved value


def test_library_notices_go_to_the_log_file_not_the_console(tmp_path, capsys):
    """5. A library's own logging (bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" on
    CPUs with avx512-bf16) is written to the log file; the console keeps what the user can act on."""
    log = tmp_path / "engine.log"
    with library_notices_to_file(log):
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward (test)")
        logging.getLogger("deepspeed.runtime").warning("a DeepSpeed notice (test)")
        # offline, the hub client retries each file 5 times, a warning each time, before the engine's one line
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5]. (test)")
    err = capsys.readouterr().err
    assert "Failed to load" not in err and "Retrying" not in err
    text = log.read_text()
    assert "Failed to load CPU gemm_4bit_forward (test)" in text and "a DeepSpeed notice (test)" in text
    assert "Retrying in 1s [Retry 1/5]. (test)" in text
    assert logging.getLogger("bitsandbytes").propagate  # restored afterwards


def test_an_8bit_adam_run_prints_no_library_noise(corpus, tmp_path):
    """The real thing, in a fresh process (bitsandbytes logs at import): nothing on stderr but the progress bar."""
    r = run_cli(["train", *flat_overrides(tiny_overrides(corpus, tmp_path / "run", optim={"name": "adamw_8bit"},
                                                         train={"max_steps": 2})), "logging.progress=false"],
                env_extra={"ENGINE_LOG": str(tmp_path / "engine.log")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.strip() == "", r.stderr
