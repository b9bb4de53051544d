"""2-rank runs through the real `deepspeed` launcher (gloo on CPU) against the single process."""

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, flat_overrides, run_cli, run_inprocess, tiny_overrides, train_losses

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    """One process, micro-batch 4: the global batch two ranks of micro-batch 2 also see."""
    out = tmp_path_factory.mktemp("single") / "run"
    return run_inprocess(corpus, out, train={"micro_batch_size": 4})[1]


def check_zero_run(out: Path, overrides: dict, stage: int) -> None:
    """A 2-rank ZeRO run against DeepSpeed and the simulator: the exported HF model is exactly the consolidated
    weights of DeepSpeed's own last checkpoint; rank 0's tracked parameter + optimizer-state bytes
    (`logging.track_memory`) equal `zero_model_states` (within 1%; under ZeRO-3 the tracker finds the parameter
    partitions inside the optimizer, so the two categories are compared as a sum), and rank 0's whole tracked peak,
    reduce bucket included, equals the simulated 2-rank peak within 5%. (ZeRO-2 and ZeRO-3 runs of
    tests/test_layout_change.py are checked with it too.)"""
    import json

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    from engine.config import load_config
    from engine.memory.simulate import simulate, zero_model_states

    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="deepspeed")
    exported = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    for k, v in consolidated.items():
        assert torch.equal(exported[k], v), k
    summary = json.loads((out / "summary.json").read_text())
    rule = zero_model_states(summary["params"]["total"], summary["params"]["trainable"], stage, 2, "fp32")
    tracked = summary["tracked_memory"]
    assert (tracked["parameters_mib"] + tracked["optimizer_mib"]) * 2**20 == pytest.approx(
        rule["params"] + rule["optimizer"], rel=0.01)
    sim = simulate(load_config(None, flat_overrides(overrides)), kernel="cpu", steps=2, zero_world=2)
    assert sim.peak_bytes == pytest.approx(tracked["peak_mib"] * 2**20, rel=0.05)
    if stage >= 2:
        assert tracked["gradients_mib"] * 2**20 >= 5e7 * 4  # the reduce bucket dominates a tiny model's peak


def test_two_rank_zero2_resume_is_bitwise_equal(two_ranks):
    """2-rank ZeRO-2 with dropout (per-rank RNG), stopped after step 3 and resumed (the shared chain,
    tests/two_ranks.py): steps 4-6 and the final fp32 weights equal the uninterrupted run's bit for bit."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    full, resumed = two_ranks["zero2_drop"], two_ranks["zero2_drop_resumed"]
    assert train_losses(resumed) == train_losses(full)[3:] and len(train_losses(resumed)) == 3
    a, b = (get_fp32_state_dict_from_zero_checkpoint(str(d / "checkpoints" / "step-0000006"), tag="deepspeed")
            for d in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_rank_zero3_offload_checkpointing_lora_end_to_end(two_ranks):
    """The full combination through the launcher (ranks from a hostfile: the shared chain, tests/two_ranks.py):
    trains, checkpoints, exports adapter + merged model, prints a sample."""
    from transformers import AutoModelForCausalLM

    out = two_ranks["zero3_offload_lora"]
    losses = train_losses(out)
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert (out / "adapter" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.n_layer == 2
    assert json.loads((out / "summary.json").read_text())["sample"]
    assert len(list((out / "checkpoints").iterdir())) == 2

    # `engine generate` from this ZeRO-3 run: its merged export, and its adapter on the random-init base rebuilt
    # from the run's config.yaml (same seed, same weights) give the same seeded text and the same logits.
    from conftest import run_main
    from engine.artifacts import load_trained

    args = ["-p", "the cat sat", "--seed", "2", "--temperature", "1.0", "--max-new-tokens", "12", "--output", "jsonl"]
    texts = []
    for folder in (out, out / "adapter"):
        rc, o, err = run_main(["generate", folder, *args])
        assert rc == 0, err
        texts.append(json.loads(o)["completion"])
    assert texts[0] == texts[1] and texts[0]
    x = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_trained(str(out / "adapter")).model(x).logits, model.eval()(x).logits,
                                   atol=1e-5, rtol=1e-5)


def test_two_ranks_under_torchrun_match_single_process_and_only_rank0_writes(corpus, tmp_path, single):
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE and no --local_rank argument: the same entry point picks them up
    (the losses equal one process only if the two ranks took different halves of each batch), and rank 0 alone
    writes metrics, TensorBoard events and the plots."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", "29631", str(ROOT / "launch" / "train.py")]
    overrides = tiny_overrides(corpus, out, train={"micro_batch_size": 2}, logging={"plots": True, "tensorboard": True})
    r = run_cli(flat_overrides(overrides), launcher=launcher, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    plan = json.loads((out / "run.json").read_text())["plan"]
    assert plan["world_size"] == 2 and plan["backend"] == "deepspeed"
    torch.testing.assert_close(torch.tensor(train_losses(out)), torch.tensor(single), rtol=0, atol=1e-4)
    events = list((out / "tensorboard").iterdir())
    assert len(events) == 1 and events[0].name.startswith("events.out.tfevents")
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 7))
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(
        ["loss.png", "lr.png", "tokens_per_s.png", "memory.png", "overview.png"])
    assert r.stdout.count("plots: ") == 1
