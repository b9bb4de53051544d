"""`engine plan`: choices from recorded simulation figures (exact), the written config, sizes, CLI errors,
and the pre-flight check of `engine train`."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import ROOT
from engine.errors import ConfigError, EngineError
from engine.memory.gpus import GPUS
from engine.plan import (ActivationChoice, Request, Row, activation_choices, choose, micro_batches, parse_size,
                         peak_from_figures, recommend, rows_from_figures, strategies, write_config)

# gpt2-xl, fp16, 1 GPU, sequence 1024: per-phase peaks at micro-batch 1 and 2 for every candidate, recorded with
# `engine.plan.gather_figures` (simulate_deep, CUDA kernels).
FIGURES = json.loads((Path(__file__).parent / "data" / "plan_figures_gpt2-xl_t4.json").read_text())["figures"]
GIB = 2**30


def budget(mem_mib: int, host_gib: float | None, **kw) -> Request:
    return Request(model="gpt2-xl", gpu=replace(GPUS["t4"], memory_mib=mem_mib),
                   host_bytes=None if host_gib is None else int(host_gib * GIB), **kw)


@pytest.mark.parametrize("mem_mib,host_gib,expected", [
    # T4 + Colab's 12 GB host: offload needs ~34 GiB of host RAM; bf16 weights (fp16 compute on a T4) with 8-bit AdamW
    # stepped in backward fit without any recompute: the fastest
    (15_360, 12, ("AdamW8bit, in-backward, bf16 weights", "no checkpointing", 1)),
    # 8 GB: a full fine-tune with Adafactor over bf16 weights, half the blocks checkpointed (8-bit states need every
    # block checkpointed: slower); the host no longer matters
    (8_192, 12, ("Adafactor, in-backward, bf16 weights", "checkpoint 1 block in 2 + chunked loss", 1)),
    (8_192, 64, ("Adafactor, in-backward, bf16 weights", "checkpoint 1 block in 2 + chunked loss", 1)),
    (4_096, 12, None),  # nothing: offload would fit the GPU, not the host
    (23_028, 12, ("AdamW8bit", "no checkpointing", 2)),  # as fast as the bf16-weight ones, closer to AdamW
    (40_960, 64, ("AdamW", "no checkpointing", 4)),
])
def test_choice_for_fixed_budgets(mem_mib, host_gib, expected):
    rows, chosen = rows_from_figures(budget(mem_mib, host_gib), FIGURES)
    assert len(rows) == sum(len(activation_choices(s)) for s in strategies(budget(mem_mib, host_gib)))
    if expected is None:
        assert chosen is None
        assert all(not r.fits and r.reason for r in rows)
        return
    assert (chosen.strategy.name, chosen.activations.name, chosen.micro) == expected
    assert chosen.fits and chosen.gpu_bytes <= mem_mib * 2**20
    # nothing that fits is predicted faster
    assert all(r.relative_time >= chosen.relative_time for r in rows if r.fits)


def test_rows_say_why_they_do_not_fit():
    rows, _ = rows_from_figures(budget(15_360, 12), FIGURES)
    by = {r.name: r for r in rows}
    assert "per GPU at micro-batch 1" in by["AdamW | no checkpointing"].reason
    assert "host RAM" in by["ZeRO-2 + optimizer offload | checkpoint all blocks + chunked loss"].reason


def test_micro_batch_is_affine_per_phase():
    """Two phases with different slopes: the larger one wins at each micro-batch."""
    b = {"parameters": 0, "gradients": 0, "optimizer": 0, "activations": 0, "temporaries": 0, "other": 0}
    figs = {"step": ((100, b), (100, b)), "fwd:head": ((60, b), (90, b))}
    assert peak_from_figures(figs, 1)[0] == 100 and peak_from_figures(figs, 1)[2] == "step"
    assert peak_from_figures(figs, 3)[0] == 120 and peak_from_figures(figs, 3)[2] == "fwd:head"


def test_global_batch_layouts():
    req = budget(15_360, None, gpus=2, global_batch=8)
    assert micro_batches(req, in_backward=False) == [(1, 4), (2, 2), (4, 1)]
    assert micro_batches(req, in_backward=True) == [(4, 1)]  # stepping inside backward cannot accumulate
    with pytest.raises(ConfigError, match="multiple of --gpus"):
        micro_batches(budget(15_360, None, gpus=2, global_batch=7), False)


@pytest.mark.parametrize("text,expected", [("16GiB", 16 * GIB), ("16GB", 16 * GIB), ("15360MiB", 15360 * 2**20),
                                           ("12.5g", int(12.5 * GIB)), ("8", 8 * GIB)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("activations, compiled, expected", [
    (ActivationChoice("checkpoint 1 block in 2 + chunked loss", 2, True), False,
     ("checkpoint_every_n_layers: 2", "checkpoint_policy: full", "compile_blocks: false")),
    (ActivationChoice("selective recompute + chunked loss", 1, True, "selective"), True,
     ("checkpoint_every_n_layers: 1", "checkpoint_policy: selective", "compile_blocks: true")),
])
def test_written_config_round_trips_through_train_dry_run(tmp_path, activations, compiled, expected):
    """The recommended configuration, written as YAML, is accepted by `engine train` unchanged."""
    from conftest import run_inprocess_cli

    req = budget(15_360, 12, compile_blocks=compiled)
    s = next(s for s in strategies(req) if s.name == "AdamW8bit, in-backward")
    row = Row(s, activations, 1, 1, 13 * GIB, 8 * GIB, 1.18, True, "")
    path = tmp_path / "plan.yaml"
    write_config(req, row, path)
    r = run_inprocess_cli(["train", "--config", str(path), "--dry-run", "--no-preflight", f"logging.output_dir={tmp_path / 'run'}",
                 "model.init=random"])
    assert r.returncode == 0, r.stderr
    for expected in ("optimizer_in_backward: true", "loss_chunk_size: 1024", "activation_checkpointing: true",
                     "name: adamw_8bit", "precision: fp16", "preflight: false", *expected):
        assert expected in r.stdout, expected


def speed_options_rows() -> dict[str, dict[str, str]]:
    """benchmarks/results/speed_options/results.csv by row name: what the planner's measured constants come from."""
    import csv

    path = Path(__file__).parents[1] / "benchmarks" / "results" / "speed_options" / "results.csv"
    return {row["name"]: row for row in csv.DictReader(path.open())}


def test_step_time_factors_are_the_measured_ones():
    """RECOMPUTE_TIME and COMPILE_TIME are benchmarks/results/speed_options' ratios (tokens/s of the step without
    the option over the step with it), to the 2 decimals they are written with."""
    from engine.plan import COMPILE_TIME, RECOMPUTE_TIME

    tps = {name: float(row["tokens_per_s"]) for name, row in speed_options_rows().items()}
    measured = {
        ("recompute", "full"): tps["plain step"] / tps["+ full recompute"],
        ("recompute", "selective"): tps["plain step"] / tps["+ selective recompute"],
        ("compile", "none"): tps["plain step"] / tps["plain step, compiled"],
        ("compile", "full"): tps["+ full recompute"] / tps["+ full recompute, compiled"],
        ("compile", "selective"): tps["+ selective recompute"] / tps["+ selective recompute, compiled"],
    }
    for (kind, policy), ratio in measured.items():
        assert {"recompute": RECOMPUTE_TIME, "compile": COMPILE_TIME}[kind][policy] == pytest.approx(ratio, abs=0.005)


def test_compiled_plans_leave_zero3_out_and_apply_the_compile_factor():
    plain, compiled = budget(15_360, 12, gpus=2), budget(15_360, 12, gpus=2, compile_blocks=True)
    assert any(s.zero_stage == 3 for s in strategies(plain))
    assert strategies(compiled) and not any(s.zero_stage == 3 for s in strategies(compiled))
    selective = ActivationChoice("selective recompute", 1, False, "selective")
    from engine.plan import COMPILE_TIME, RECOMPUTE_TIME

    assert selective.time_factor(False) == RECOMPUTE_TIME["selective"]
    assert selective.time_factor(True) == pytest.approx(RECOMPUTE_TIME["selective"] * COMPILE_TIME["selective"])
    half = ActivationChoice("checkpoint 1 block in 2", 2, False)
    assert half.time_factor(False) == pytest.approx(1 + (RECOMPUTE_TIME["full"] - 1) / 2)


def test_plan_cli_errors_are_one_line():
    from conftest import run_inprocess_cli

    r = run_inprocess_cli(["plan", "--model", "gpt2-xl"])
    assert r.returncode == 2 and r.stderr.strip().startswith("error: say which GPU") and "Traceback" not in r.stderr
    r = run_inprocess_cli(["plan", "--gpu-mem", "lots"])
    assert r.returncode == 2 and "cannot read the size 'lots'" in r.stderr
    r = run_inprocess_cli(["plan", "--model", "gpt5", "--gpu-mem", "8GiB"])
    assert r.returncode == 2 and "--model gpt5: not a named size (distilgpt2, gpt2" in r.stderr
    r = run_inprocess_cli(["plan", "--model", "pythia-1b", "--gpu-mem", "8GiB", "--seq-len", "4096"])
    assert r.returncode == 2 and "--seq-len 4096: pythia-1b takes 2 to 2048 tokens" in r.stderr


def test_the_chunked_loss_takes_fewer_tokens_of_a_larger_vocabulary():
    from engine.plan import loss_chunk_tokens

    assert loss_chunk_tokens(1024, 50257) == 1024  # GPT-2's: one sequence, as the recorded plan figures have it
    assert loss_chunk_tokens(1024, 151936) == 384  # Qwen2's logits per chunk within GPT-2's per sequence
    assert loss_chunk_tokens(128, 151936) == 64


def test_plan_cli_writes_a_config_for_a_tiny_budget(tmp_path):
    """End to end on a small model (real simulations): LoRA on distilgpt2 within 2 GiB."""
    from conftest import run_cli

    out = tmp_path / "p.yaml"
    r = run_cli(["plan", "--model", "distilgpt2", "--gpu-mem", "2GiB", "--seq-len", "128", "--lora", "--workers", "2",
                 "--write", str(out)], timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Recommended: LoRA r16" in r.stdout and out.exists()
    assert "lora:" in out.read_text()


# --- the recommendation: only a configuration whose direct simulation fits ---------------------------------------


def fake_plan(monkeypatch, passes: set[str]) -> list[str]:
    """`engine plan`'s simulations replaced (nothing simulated): three fitting candidates, fastest first, and a
    direct simulation (`verify`) that only `passes` survive. Returns the names verified, in order."""
    import engine.commands.plan as command

    def plan(req, progress=None, workers=None):
        by = {s.name: s for s in strategies(req)}
        rows = [Row(by[name], ActivationChoice("no checkpointing", None, False), 1, 1, 10 * GIB, 8 * GIB, t, True, "")
                for name, t in (("AdamW", 1.0), ("AdamW8bit", 1.1), ("AdamW8bit, in-backward", 1.2))]
        return rows, rows[0]

    verified = []

    def verify(req, row):
        verified.append(row.strategy.name)
        if row.strategy.name not in passes:
            row.fits, row.reason = False, "the direct simulation needs 99.00 GiB per GPU"
        return row

    monkeypatch.setattr(command, "plan", plan)
    monkeypatch.setattr(command, "verify", verify)
    return verified


def test_plan_cli_recommends_nothing_when_no_direct_simulation_fits(tmp_path, monkeypatch):
    """Every candidate fails its direct simulation: nothing is written, nothing called "Recommended", exit 1
    (c672551 wrote the second failing one as the recommendation)."""
    from conftest import run_inprocess_cli

    verified = fake_plan(monkeypatch, passes=set())
    out = tmp_path / "p.yaml"
    r = run_inprocess_cli(["plan", "--gpu", "t4", "--write", out])
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Recommended" not in r.stdout and "Nothing fits" in r.stdout and not out.exists()
    assert verified == ["AdamW", "AdamW8bit", "AdamW8bit, in-backward"]  # each tried, in the plan's order
    assert r.stdout.count("no: the direct simulation needs") == 3


def test_plan_cli_recommends_the_first_candidate_whose_direct_simulation_fits(tmp_path, monkeypatch):
    from conftest import run_inprocess_cli

    verified = fake_plan(monkeypatch, passes={"AdamW8bit, in-backward"})
    out = tmp_path / "p.yaml"
    r = run_inprocess_cli(["plan", "--gpu", "t4", "--write", out])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Recommended: AdamW8bit, in-backward | no checkpointing" in r.stdout
    assert verified == ["AdamW", "AdamW8bit", "AdamW8bit, in-backward"]
    assert "optimizer_in_backward: true" in out.read_text() and "adamw_8bit" in out.read_text()


def test_recommend_stops_at_the_first_row_that_verifies():
    """Pure: rows in `choose`'s order (fastest, then quality rank, then the larger micro-batch); rows that do not fit
    by their figures are never verified."""
    req = budget(15_360, None)
    by = {s.name: s for s in strategies(req)}
    act = ActivationChoice("no checkpointing", None, False)

    def row(name, micro, t, fits=True):
        return Row(by[name], act, micro, 1, GIB, GIB, t, fits, "")

    rows = [row("AdamW8bit", 1, 1.0), row("AdamW", 1, 1.0), row("AdamW", 2, 1.0), row("AdamW", 4, 0.5, fits=False),
            row("AdamW, in-backward", 1, 2.0)]
    seen = []

    def check(r):
        seen.append((r.strategy.name, r.micro))
        r.fits = r.strategy.name == "AdamW, in-backward"
        return r

    assert recommend(rows, check) is rows[-1]
    assert seen == [("AdamW", 2), ("AdamW", 1), ("AdamW8bit", 1), ("AdamW, in-backward", 1)]
    assert choose(rows) is rows[-1]  # the only row still marked as fitting
    assert recommend(rows, lambda r: replace(r, fits=False)) is None


# --- pre-flight ---------------------------------------------------------------------------------------------------


def test_preflight_stops_a_run_that_cannot_fit_this_machine(tmp_path):
    from conftest import run_inprocess_cli

    out = tmp_path / "run"
    xl = ["model.n_layer=48", "model.n_embd=1600", "model.n_head=25", "model.n_positions=1024"]  # over cpu_default's
    r = run_inprocess_cli(["train", "model.name=gpt2-xl", "model.init=random", *xl, "data.block_size=1024",
                 "train.micro_batch_size=64", f"logging.output_dir={out}"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().startswith("error: pre-flight: this configuration needs") and "engine plan" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_preflight_on_cuda_compares_with_free_memory(monkeypatch):
    """The CUDA branch (no GPU here): free memory comes from torch.cuda.mem_get_info."""
    import torch

    from engine.config import load_config
    from engine.distributed import DistEnv
    from engine.preflight import preflight

    cfg = load_config(None, ["model.init=random", "model.n_layer=2", "model.n_embd=64", "model.n_head=2",
                             "model.n_positions=64", "data.block_size=64", "train.micro_batch_size=2",
                             "memory.precision=fp32"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (8 * GIB, 16 * GIB))
    pred = preflight(cfg, DistEnv(), "cuda")
    assert pred["kernel"] == "cuda" and 512 * 2**20 < pred["device_bytes"] < GIB  # includes the GPU margin
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (256 * 2**20, 16 * GIB))
    with pytest.raises(EngineError, match="per GPU .* but 0.25 GiB is free"):
        preflight(cfg, DistEnv(), "cuda")
    cfg.train.preflight = False
    assert preflight(cfg, DistEnv(), "cuda") is None


@pytest.mark.parametrize("strategy,stage", [("ZeRO-2 + optimizer offload", 2), ("ZeRO-3 + optimizer/param offload", 3)])
def test_plan_model_states_equal_deepspeed_estimators(strategy, stage):
    """Where both count the same thing (per-GPU model states), the plan's figures equal DeepSpeed's estimators;
    the plan also carries what they leave out: the reduce bucket (5e7 fp16 elements; ZeRO-2 doubles it with
    overlap_comm; allocator blocks of 512 B), ZeRO-2 offload's device gradient buffer of the largest parameter, and
    the parameters ZeRO-3 keeps gathered (min(Ψ, 1e9/2) x 2 B, beyond the estimator's 4 B x largest layer)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rec = next(r for r in FIGURES if r["strategy"] == strategy and r["activations"] == "no checkpointing")
    n = rec["info"]["params"]["total"]
    _, b = rec["figures"]["bwd:embeddings"][0]  # end of backward: the reduce buckets exist
    bucket = -(-(50_000_000 * 2 * (2 if stage == 2 else 1)) // 512) * 512
    wte = 50257 * 1600
    extra = 2 * wte if stage == 2 else 2 * 500_000_000 - 4 * wte
    states = b["parameters"] + b["gradients"] + b["optimizer"] - bucket - extra
    if stage == 2:
        _, gpu = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=1, cpu_offload=True)
    else:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(n, 50257 * 1600, num_gpus_per_node=1, cpu_offload=True,
                                                         cpu_offload_params=True)
    assert states == gpu


def test_a_recipe_over_the_quality_bar_is_marked_with_its_gap():
    """LoRA misses 1% against a full fine-tune on the quality benchmark's domains (new vocabulary, frozen embeddings):
    its note says OVER with the gap, and the table marks its rows; QLoRA, measured against LoRA, is not marked."""
    from engine.plan import QUALITY_TOLERANCE_PCT, format_table, quality_worst

    by = {s.name: s for s in strategies(Request(lora=True))}
    lora = next(s for name, s in by.items() if name.startswith("LoRA"))
    worst = quality_worst("lora")
    assert worst[0] > QUALITY_TOLERANCE_PCT and lora.quality_over == worst[0] and "OVER 1%" in lora.quality
    row = Row(lora, ActivationChoice("no checkpointing", None, False), 1, 1, GIB, GIB, 1.0, True, "")
    assert f"[quality: {worst[0]:+.1f}% loss]" in format_table([row], row)
    assert quality_worst("qlora")[0] <= QUALITY_TOLERANCE_PCT


def test_compiled_runs_are_predicted_by_the_measured_bound():
    """COMPILED_BOUND covers the largest excess of a compiled step's peak RSS over its eager step's (as a fraction of
    the eager tracked peak) in benchmarks/results/speed_options, by less than 0.01; the pre-flight and the plan apply
    it to compiled runs only."""
    from engine.config import load_config
    from engine.distributed import DistEnv
    from engine.memory.simulate import COMPILED_BOUND
    from engine.preflight import predict_peak

    rows = speed_options_rows()
    pairs = [(n.replace(", compiled", "").replace(" + compiled", ""), n) for n in rows if "compiled" in n]
    pairs = [(e if e in rows else e.replace("t4 recipe", "t4 recipe (full recompute)"), c) for e, c in pairs]
    assert len(pairs) == 6 and all(e in rows for e, _ in pairs), pairs
    excess = max((float(rows[c]["peak_rss_mib"]) - float(rows[e]["peak_rss_mib"])) / float(rows[e]["peak_mib"])
                 for e, c in pairs)
    assert 1 + excess <= COMPILED_BOUND < 1 + excess + 0.01, excess

    tiny = ["model.init=random", "model.n_layer=2", "model.n_embd=64", "model.n_head=2", "model.n_positions=64",
            "data.block_size=64", "train.micro_batch_size=2", "memory.precision=fp32"]
    eager = predict_peak(load_config(None, tiny), DistEnv(), "cpu")["device_bytes"]
    compiled = predict_peak(load_config(None, tiny + ["train.compile_blocks=true"]), DistEnv(), "cpu")["device_bytes"]
    assert compiled == int(eager * COMPILED_BOUND)
    req = budget(15_360, 12)
    rows_eager, _ = rows_from_figures(req, FIGURES)
    rows_compiled, _ = rows_from_figures(replace(req, compile_blocks=True), FIGURES)
    by = {r.name: r for r in rows_eager}
    for r in rows_compiled:  # the bound costs each candidate memory: a smaller micro-batch, or more at the same one
        e = by[r.name]
        assert r.micro < e.micro or (r.micro == e.micro and r.gpu_bytes > e.gpu_bytes), (r.name, r.micro, e.micro)


@pytest.mark.parametrize("model, lora", [("Qwen2.5-1.5B", False), ("SmolLM2-1.7B", True), ("pythia-1.4b", False),
                                         ("Llama-3.2-1B", False)])
def test_every_candidate_is_a_valid_run_of_another_family(model, lora):
    """The plan's configurations of a non-GPT-2 model load as configs (no GPT-2-only key such as the GELU swap), and
    the chunked loss takes the vocabulary's share of a sequence."""
    from engine.config import load_config
    from engine.plan import config_overrides, loss_chunk_tokens, model_shape

    req = Request(model=model, gpu=GPUS["t4"], lora=lora)
    chunk = loss_chunk_tokens(req.seq_len, model_shape(model).vocab)
    for s in strategies(req):
        for a in activation_choices(s):
            cfg = load_config(None, config_overrides(req, s, a, 1, 1) + ["model.init=random"])
            assert cfg.model.size == model and cfg.memory.fused_gelu is None
            assert cfg.memory.loss_chunk_size == (chunk if a.chunked_loss else None)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_quality_notes_hold_what_the_quality_benchmark_recorded(family):
    """Every gap in engine.plan.QUALITY_GRIDS is its results.json figure (3 seeds; QLoRA's against LoRA), and a cell
    left None there has no 3-seed result: the notes the plan prints are the benchmark's."""
    from engine.plan import QUALITY_CELLS, QUALITY_GRIDS

    grid = QUALITY_GRIDS[family]
    rows = json.loads((ROOT / grid.results).with_name("results.json").read_text())["rows"]
    recorded = {(r["recipe"], f"{r['domain']}/{r['lr']} lr"): r.get("gap_pct_vs_lora", r["gap_pct_vs_reference"])
                for r in rows if r["seeds"] == 3}
    for key, gaps in grid.gaps.items():
        assert [recorded.get((key, cell)) for cell in QUALITY_CELLS] == list(gaps), key


def test_a_family_without_its_own_quality_grid_reads_the_nearest_and_says_so():
    from engine.plan import quality_note

    assert "a small Qwen2, 3 seeds" in quality_note("bf16_8bit", "qwen2")
    assert "a small Qwen2, the nearest family measured to llama" in quality_note("bf16_8bit", "llama")
    assert "a small GPT-2, the nearest family measured to gpt_neox" in quality_note("bf16_8bit", "gpt_neox")
    by = {s.name: s for s in strategies(Request(model="Qwen2.5-1.5B"))}
    assert all("a small Qwen2" in s.quality for s in by.values() if s.quality)


def test_fused_head_loss_plans_unchunked_candidates_with_it_and_a_lower_peak():
    """`engine plan --fused-head-loss`: the unchunked candidates run memory.fused_head_loss (not the chunked ones,
    nor ZeRO-3's, whose head is gathered in hooks it bypasses), and their simulated memory at the head is lower (a
    bf16 GPU: under fp16 loss scaling the head keeps autograd's path)."""
    from engine.plan import config_overrides, simulate_phases

    req = Request(model="gpt2", gpu=GPUS["l4"], seq_len=256)
    fused = replace(req, fused_head_loss=True)
    s = next(s for s in strategies(req) if s.zero_stage == 0 and not s.in_backward)
    plain = next(a for a in activation_choices(s) if not a.chunked_loss and not a.checkpoint_every)
    chunked = next(a for a in activation_choices(s) if a.chunked_loss)
    key = "memory.fused_head_loss=true"
    assert key in config_overrides(fused, s, plain, 1, 1) and key not in config_overrides(req, s, plain, 1, 1)
    assert key not in config_overrides(fused, s, chunked, 1, 1)
    two = replace(fused, gpus=2)
    z3 = next(s for s in strategies(two) if s.zero_stage == 3)
    assert key not in config_overrides(two, z3, next(a for a in activation_choices(z3) if not a.chunked_loss), 1, 1)
    phases = lambda r: {k: v[0] for k, v in simulate_phases(r, s, plain, 1, False)[0].items()}  # noqa: E731
    with_it, without = phases(fused), phases(req)
    # Lower where the head is (gpt2 at 256 tokens, bf16: 1,915 vs 1,966 MB alone, 1,864 vs 1,889 MB in the suite's
    # process); the step's peak here is the embedding's backward, which the head does not reach: no higher.
    assert with_it["fwd:head"] < without["fwd:head"]
    assert max(with_it.values()) <= max(without.values())
