"""Resuming on another layout: world size, ZeRO stage, precision-specific DeepSpeed layouts and backend change
between runs, the optimizer state comes along bit for bit, and the losses continue those of a run that never changed
layout (dropout 0, the same global batch of 4 sequences: one process with micro-batch 4, or 2 ranks with
micro-batch 2). Run in fp32 and, where this CPU computes bf16 natively (`conftest.NATIVE_BF16`), in bf16. fp16 is
not in the chain: DeepSpeed's CPU accelerator refuses it on CPUs without fp16 kernels (`precision_problem`), and the
torch backend's fp16 resume is tests/test_resilience.py's.

The 2-rank runs are the suite's shared chain (tests/two_ranks.py, one launcher start): fp32 ZeRO-3 from scratch
(the 2-rank run that never changes layout), ZeRO-2 for 3 steps, ZeRO-3 resumed from the one-process reference at
step 3, ZeRO-1 and ZeRO-0 resumed from the ZeRO-3 run at step 6; in bf16: ZeRO-3 from scratch, ZeRO-2 and ZeRO-0
for 3 steps, ZeRO-1 resumed from the bf16 ZeRO-3 run at step 6. One-process continuations and bitwise state checks
load those checkpoints in this process (DeepSpeed targets on one rank) and read the state back (DeepSpeed's
`safe_get_full_*`)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import needs_native_bf16, precisions, run_inprocess, run_main, tiny_overrides, train_losses
from engine.backends.deepspeed_backend import load_deepspeed_file
from engine.config import validate_dict
from engine.distributed import dist_env
from engine.errors import EngineError
from engine.resume import checkpoint_layout
from engine.train import TrainingRecipe
from test_distributed import check_zero_run
from two_ranks import TOTAL, ckpt, layout

pytestmark = pytest.mark.slow

TOL = 1e-5
# bf16 autocast: one process with micro-batch 4 and 2 ranks with micro-batch 2 round differently (other matmul shapes,
# another reduction order). Measured (2-core AMD EPYC, avx512-bf16): the 2-rank bf16 run itself differs from the
# one-process run by up to 3.0e-4 in its first 3 steps, and its one-process continuations by up to 2.8e-4 over 10
# steps; a 2-rank continuation of a 2-rank run (ZeRO-3 -> ZeRO-1) is exact (0.0).
BF16_TOL = 1e-3
needs_bf16 = needs_native_bf16


def read_portable(ckpt: Path, with_states: bool = True):
    """The checkpoint as its own layout class reads it."""
    return checkpoint_layout(ckpt).to_portable(ckpt, with_states)


@pytest.fixture(scope="module")
def runs(two_ranks):
    return two_ranks


def assert_follows(losses: list[float], ref: list[float], first_step: int, atol: float = TOL) -> None:
    assert len(losses) == 10 or first_step == 1
    expected = ref[first_step - 1: first_step - 1 + len(losses)]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=0, atol=atol)


@pytest.mark.parametrize("precision", precisions("fp32", "bf16"))
def test_two_ranks_zero2_continue_on_one_process_and_in_backward(corpus, tmp_path, runs, precision):
    """fp32 within 1e-5 of the one-process run; bf16 (the DeepSpeed shards DeepSpeed names `bf16_zero_pp_rank_*`)
    within BF16_TOL."""
    suffix, atol = ("", TOL) if precision == "fp32" else ("_bf16", BF16_TOL)
    ref = train_losses(runs["ref" + suffix])
    for name, lay in (("plain", layout(precision=precision, train={"max_steps": 13})),
                      ("in_backward", layout(in_backward=True, precision=precision, train={"max_steps": 13}))):
        out = tmp_path / name
        lay["checkpoint"]["resume"] = str(ckpt(runs["zero2" + suffix], 3))
        run_inprocess(corpus, out, **lay)
        assert_follows(train_losses(out), ref, 4, atol)


@pytest.mark.parametrize("name, stage", [("zero3", 3), ("zero2", 2), ("zero1", 1)])
def test_zero_runs_match_one_process_deepspeed_and_the_simulator(corpus, runs, name, stage):
    """The two runs that started on 2 ranks: losses within 1e-4 of one process (the reduction order differs), and
    export, tracked memory and simulated peak as tests/test_distributed.py `check_zero_run` says."""
    assert_follows(train_losses(runs[name]), train_losses(runs["ref"]), 1, atol=1e-4)
    check_zero_run(runs[name], runs.configs[name], stage)


def test_one_process_continues_on_two_ranks_zero3_and_zero3_on_zero1_and_zero0(runs):
    zero3 = train_losses(runs["zero3"])
    assert_follows(train_losses(runs["to_zero3"]), zero3, 4)
    assert_follows(train_losses(runs["to_zero1"]), zero3, 7)
    assert_follows(train_losses(runs["to_zero0"]), zero3, 7)  # 2-rank data parallel without ZeRO


@needs_bf16
def test_bf16_zero3_continues_on_zero1(runs):
    """The 2-rank bf16 ZeRO-3 run resumed on 2-rank bf16 ZeRO-1 at step 6: the same reduction order, so the bf16
    continuation follows the run that never changed as closely as fp32 does."""
    assert_follows(train_losses(runs["to_zero1_bf16"]), train_losses(runs["zero3_bf16"]), 7)


def resumed_state(corpus, out: Path, lay: dict) -> tuple[dict, dict]:
    """Load a checkpoint on `lay` in this process and read the state back by name: (weights, optimizer states)."""
    cfg = validate_dict(tiny_overrides(corpus, out, **lay))
    recipe = TrainingRecipe(cfg, dist_env())
    recipe.setup_data()
    recipe.setup_backend()
    recipe.resume()
    backend = recipe.backend
    if backend.name == "deepspeed" and backend.cfg.memory.zero_stage == 0:  # DeepSpeed's wrapper: fp32 copies
        opt = backend.optimizer
        masters = {id(p): m for g, ms in zip(opt.fp16_groups, opt.fp32_groups) for p, m in zip(g, ms)}
        named = [(n, masters[id(p)]) for n, p in backend.engine.module.named_parameters() if p.requires_grad]
        return {n: m.detach().cpu() for n, m in named}, {n: opt.optimizer.state[m] for n, m in named}
    if backend.name == "deepspeed":
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        named = [(n, p) for n, p in backend.engine.module.named_parameters() if p.requires_grad]
        weights = {n: safe_get_full_fp32_param(p).cpu() for n, p in named}
        states = {n: {k: safe_get_full_optimizer_state(p, k).cpu() for k in ("exp_avg", "exp_avg_sq")}
                  for n, p in named}
        for st in states.values():
            st["step"] = next(iter(backend.optimizer.optimizer.state.values()))["step"]
        return weights, states
    named = [(n, p) for n, p in backend.model.named_parameters() if p.requires_grad]
    opt = backend.optimizer
    per_param = getattr(opt, "optimizers", None)
    states = {n: (per_param[n] if per_param else opt).state[p] for n, p in named}
    return {n: p.detach().cpu() for n, p in named}, states


@pytest.mark.parametrize("source, target", [
    (("zero2", 3), layout()),
    (("zero2", 3), layout(in_backward=True)),
    (("ref", 3), layout(3)),  # DeepSpeed ZeRO-3 on this process's one rank
    (("zero3", 6), layout(1)),
    (("zero2", 3), layout(2)),
    (("to_zero0", 9), layout()),  # 2-rank DeepSpeed without ZeRO -> one process
    pytest.param(("zero2_bf16", 3), layout(precision="bf16"), marks=needs_bf16),
    pytest.param(("zero2_bf16", 3), layout(in_backward=True, precision="bf16"), marks=needs_bf16),
    pytest.param(("zero3_bf16", 6), layout(1, precision="bf16"), marks=needs_bf16),
    pytest.param(("ref_bf16", 3), layout(3, precision="bf16"), marks=needs_bf16),
    pytest.param(("zero0_bf16", 3), layout(precision="bf16"), marks=needs_bf16),  # DeepSpeed's 16-bit wrapper
    pytest.param(("zero3_bf16", 6), layout(0, precision="bf16"), marks=needs_bf16),
    (("to_zero1", 9), layout(in_backward=True)),  # ZeRO-1 as the source
    pytest.param(("to_zero1_bf16", 9), layout(precision="bf16"), marks=needs_bf16),
    pytest.param(("zero3_bf16", 6), layout(in_backward=True, precision="bf16"), marks=needs_bf16),
    pytest.param(("zero0_bf16", 3), layout(2, precision="bf16"), marks=needs_bf16),
], ids=lambda v: v[0] if isinstance(v, tuple) else None)
def test_converted_state_is_bitwise_the_source(corpus, tmp_path, runs, source, target):
    src = ckpt(runs[source[0]], source[1])
    target["checkpoint"]["resume"] = str(src)
    weights, states = resumed_state(corpus, tmp_path / "run", target)
    ps = read_portable(src)
    assert set(weights) == set(ps.weights) and len(weights) > 10
    for name, w in weights.items():
        assert torch.equal(w, ps.weights[name]), name
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(states[name][key]).cpu().float(), ps.states[name][key].float()), (name, key)
        # (DeepSpeed's 16-bit wrapper without ZeRO creates its states with one zero-gradient step at start)
        assert float(ps.states[name]["step"]) == source[1] + (source[0] == "zero0_bf16")


def test_8bit_states_move_between_the_plain_and_the_in_backward_step(corpus, tmp_path):
    """bitsandbytes' 8-bit AdamW keeps one state per parameter on both torch paths: converted bit for bit."""
    src = tmp_path / "plain8"
    eight = {"optim": {"name": "adamw_8bit", "grad_clip": None}}
    run_inprocess(corpus, src, **layout(train={"max_steps": 3}, **eight))
    target = layout(in_backward=True, **eight)
    target["checkpoint"]["resume"] = str(ckpt(src, 3))
    _, states = resumed_state(corpus, tmp_path / "inb8", target)
    ps = read_portable(ckpt(src, 3))
    assert {"state1", "state2", "absmax1", "absmax2"} <= set(ps.states["transformer.wte.weight"])
    for name, st in ps.states.items():
        for key, value in st.items():
            assert torch.equal(torch.as_tensor(states[name][key]).cpu(), torch.as_tensor(value)), (name, key)
    # into ZeRO's flat partitions they cannot go (blocks would straddle parameters): refused, or weights only
    zero = layout(1, train={"max_steps": 4}, **eight)
    zero["checkpoint"]["resume"] = str(ckpt(src, 3))
    with pytest.raises(EngineError, match="flat ZeRO partitions cannot be cut by parameter.*allow_layout_change=true"):
        run_inprocess(corpus, tmp_path / "zero_refused", **zero)
    zero["checkpoint"]["allow_layout_change"] = True
    assert len(run_inprocess(corpus, tmp_path / "zero_fresh", **zero)[1]) == 1


@pytest.mark.parametrize("run, prefix", [("zero2", ""), pytest.param("zero2_bf16", "bf16_", marks=needs_bf16)])
def test_a_missing_rank_shard_is_one_line_naming_it(runs, tmp_path, run, prefix):
    """The shard names are DeepSpeed's own, by precision: a bf16 run's complete checkpoint reads (the conversions
    above), and a missing shard is named as DeepSpeed wrote it."""
    broken = tmp_path / "step-0000003"
    shutil.copytree(ckpt(runs[run], 3), broken)
    shard = broken / "deepspeed" / f"{prefix}zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.unlink()
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["files"].pop(f"deepspeed/{shard.name}")
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match=f"rank 1's shard .*/{prefix}zero_pp_rank_1_mp_rank_00_optim_states.pt.* is missing"):
        read_portable(broken)


def test_another_optimizer_needs_allow_layout_change_and_starts_fresh(corpus, tmp_path, runs):
    lay = layout(train={"max_steps": 5}, optim={"name": "adamw_8bit", "grad_clip": None})
    lay["checkpoint"]["resume"] = str(ckpt(runs["zero2"], 3))
    with pytest.raises(EngineError, match="optimizer='adamw' there, 'adamw_8bit' now.*allow_layout_change=true"):
        run_inprocess(corpus, tmp_path / "refused", **lay)
    lay["checkpoint"]["allow_layout_change"] = True
    summary, losses = run_inprocess(corpus, tmp_path / "allowed", **lay)
    assert len(losses) == 2 and summary["steps"] == 5


@pytest.mark.parametrize("run", ["nan_zero0", "nan_zero2"])
def test_a_bad_gradient_on_one_rank_is_skipped_by_every_rank(runs, run):
    """Rank 1 alone gets a NaN gradient at step 3 (tests/helpers/bad_gradient.py): every rank skips that step
    (DeepSpeed's own non-finite check under ZeRO, the engine's under ZeRO-0, where gradients are all-reduced before
    the check), the weights stay finite and the run goes on; each rank's optimizer took 5 steps of 6."""
    out = runs[run]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [rec for rec in recs if "loss" in rec]
    assert [rec["skipped"] for rec in steps] == [False, False, True, False, False, False]
    assert all(math.isfinite(rec["loss"]) for rec in steps)
    shards = sorted((ckpt(out, 6) / "deepspeed").glob("*optim_states.pt")) or [ckpt(out, 6) / "deepspeed" /
                                                                             "mp_rank_00_model_states.pt"]
    for shard in shards:
        sd = load_deepspeed_file(shard)
        opt = sd.get("optimizer_state_dict") or sd["optimizer"]
        base = opt.get("base_optimizer_state") or opt
        assert {float(s["step"]) for s in base["state"].values()} == {5.0}, shard.name
        weights = opt.get("single_partition_of_fp32_groups") or [p for p in sd.get("module", {}).values()]
        assert all(torch.isfinite(w).all() for w in weights)


@pytest.mark.parametrize("run", ["zero3", pytest.param("zero3_bf16", marks=needs_bf16)])
def test_export_from_zero3_shards_without_a_launcher(runs, tmp_path, run):
    """`engine export` on a 2-rank ZeRO-3 checkpoint (fp32, and bf16: DeepSpeed's bf16_-named shards), in one
    process: the model, loaded with transformers, equals DeepSpeed's own consolidation of the shards (the fp32
    masters), bit for bit; so does the run's own end-of-run export of its last checkpoint (the same path)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    src = ckpt(runs[run], 6)
    rc, out, err = run_main(["export", src, "--out", tmp_path / "x"])
    assert rc == 0, err
    assert f"exported model from {src}" in out
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "x" / "model").state_dict()
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(src), tag="deepspeed")
    for k, v in consolidated.items():
        assert torch.equal(exported[k], v.contiguous()), k
    at_end = AutoModelForCausalLM.from_pretrained(runs[run] / "model").state_dict()
    last = get_fp32_state_dict_from_zero_checkpoint(str(ckpt(runs[run], TOTAL)), tag="deepspeed")
    assert all(torch.equal(at_end[k], v.contiguous()) for k, v in last.items())
    rc, _, err = run_main(["export", runs[run]])  # the run folder: its newest checkpoint, but it holds an export
    assert rc != 0 and "already holds an export: pass --out DIR" in err and "Traceback" not in err


def test_export_of_a_lora_run_equals_its_own_export(corpus, tmp_path):
    out = tmp_path / "run"
    run_inprocess(corpus, out, memory={"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}},
                  train={"max_steps": 3}, optim={"lr": 1e-2})
    rc, _, err = run_main(["export", out, "--out", tmp_path / "again"])
    assert rc == 0, err
    for kind, file in (("adapter", "adapter_model.safetensors"), ("model", "model.safetensors")):
        a, b = load_file(out / kind / file), load_file(tmp_path / "again" / kind / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind


@pytest.mark.parametrize("run", ["zero1", "zero2", "to_zero0", *[pytest.param(r, marks=needs_bf16) for r in (
    "zero2_bf16", "zero0_bf16", "to_zero1_bf16")]])
def test_every_deepspeed_run_exports_its_fp32_masters(runs, run):
    """The end of every run exports through the one export path: a 2-rank run of each ZeRO stage and precision wrote
    its final checkpoint's fp32 masters (ZeRO 1-3: as DeepSpeed's own consolidation has them; ZeRO-0: the client
    optimizer's weights in fp32, DeepSpeed's fp32 copies in bf16), loadable with transformers."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    out = runs[run]
    last = sorted((out / "checkpoints").iterdir())[-1]
    exported = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    if runs.configs[run]["memory"]["zero_stage"] > 0:
        masters = get_fp32_state_dict_from_zero_checkpoint(str(last), tag="deepspeed")
    else:
        masters = dict(read_portable(last, with_states=False).weights)
    assert masters and all(torch.equal(exported[k], v.contiguous()) for k, v in masters.items())
    assert all(exported[k].dtype == torch.float32 for k in masters)
