"""The CLI end to end: the default preset, help for every command, one-line errors without tracebacks."""

import json

import pytest

from conftest import run_cli, run_inprocess_cli, run_main
from engine.commands import COMMANDS

HELP = {c.NAME: c.HELP for c in COMMANDS}


@pytest.mark.parametrize("command", list(HELP))
def test_every_command_has_help(command):
    """In-process: the parser is the CLI's own (an interpreter start per command would cost ~7 s each)."""
    rc, out, _ = run_main([command, "--help"])
    assert rc == 0 and out.startswith(f"usage: engine {command}") and HELP[command].split(":")[0][:30] in " ".join(out.split())


def test_default_preset_end_to_end(tmp_path):
    """The README's default run, shortened: loss falls, val perplexity, HF export, sample printed."""
    out = tmp_path / "default"
    r = run_cli(["train", f"logging.output_dir={out}", "train.max_steps=30", "eval.every_n_steps=15",
                 "checkpoint.every_n_steps=15", "sample.max_new_tokens=8", f"data.cache_dir={tmp_path / 'cache'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in recs if "loss" in x]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < losses[0] - 1.0
    assert "final: val_loss" in r.stdout and "sample ('Once upon a time')" in r.stdout
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "tokenizer.json").exists()
    assert "train:" in r.stderr  # the progress bar
    # on by default: TensorBoard events and the end-of-run plots
    assert next((out / "tensorboard").glob("events.out.tfevents.*")).stat().st_size > 0
    assert {p.name for p in (out / "plots").iterdir()} == {"loss.png", "lr.png", "tokens_per_s.png", "memory.png",
                                                         "overview.png"}


def test_dry_run_prints_plan_without_a_model(tmp_path):
    r = run_inprocess_cli(["train", "--dry-run", "memory.zero_stage=2", f"logging.output_dir={tmp_path / 'x'}"])
    assert r.returncode == 0, r.stderr
    assert '"train_batch_size": 8' in r.stdout and '"backend": "deepspeed"' in r.stdout
    assert not (tmp_path / "x").exists()


def test_help_config_lists_keys():
    r = run_inprocess_cli(["train", "--help-config"])
    assert r.returncode == 0 and "memory.activation_checkpointing" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["train", "optim.lrr=1"], "optim.lrr: unknown key"),
    (["train", "train.micro_batch_size=-2"], "train.micro_batch_size"),
    (["train", "--config", "no_such_preset"], "no such file or preset"),
    (["train", "data.train_file=/nonexistent/train.txt"], "data file not found: /nonexistent/train.txt"),
    (["train", "memory.zero_stage=1", "memory.offload_optimizer=true", "optim.name=adamw_8bit"], "cannot run on offloaded"),
    (["train", "model.init=pretrained", "model.name=/nonexistent/model", "model.n_layer=null", "model.n_embd=null",
      "model.n_head=null", "model.n_positions=null"], "could not load model from /nonexistent/model"),
])
def test_bad_input_is_one_line_without_traceback(tmp_path, args, needle):
    r = run_inprocess_cli(args + [f"logging.output_dir={tmp_path / 'o'}"] if args[-1] != "no_such_preset" else args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("error: ") and needle in lines[-1], r.stderr
    assert not (tmp_path / "o").exists()


def test_existing_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    r = run_inprocess_cli(["train", f"logging.output_dir={out}"])
    assert r.returncode == 2 and "already holds a run" in r.stderr
    assert (out / "run.json").read_text() == "{}"


def test_resume_before_an_override_takes_no_path(corpus, tmp_path):
    """`engine train data.train_file=x.txt --resume logging.output_dir=out` (the README's own example): a key=value token
    after --resume is an override, never the checkpoint's path, so the run resumes the newest checkpoint of out."""
    out = tmp_path / "out"
    rc, stdout, err = run_main(["train", f"data.train_file={corpus['train']}", "--resume", f"logging.output_dir={out}",
                                "--dry-run", "model.n_layer=1", "train.max_steps=2"])
    assert rc == 0, err
    assert "not a checkpoint folder" not in err
    assert f"no complete checkpoint in {out}" in stdout and f"output_dir: {out}" in stdout
