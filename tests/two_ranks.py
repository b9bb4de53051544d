"""Every 2-rank run of the test suite, trained in ONE launcher start (tests/helpers/train_many.py, ranks from a
one-host hostfile, which also covers the launcher's hostfile path): launcher and interpreter start-up is paid once,
not per test. The `two_ranks` fixture (conftest.py) trains them once per session; tests/test_layout_change.py and
tests/test_distributed.py read them.

Two single-process references of 16 steps (fp32 and, where the CPU computes bf16 natively, bf16) and 9-step ones of
the other families (`family_refs`) are trained in the test process first; some 2-rank runs resume from them."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from conftest import NATIVE_BF16, ROOT, TINY_OF, flat_overrides, run_cli, run_inprocess, tiny_model, tiny_overrides

TOTAL = 16


def launch(overrides: dict, port: int, hostfile: Path | None = None, script: Path | None = None,
           env_extra: dict | None = None):
    # A one-host hostfile takes the launcher's hostfile path without ssh (no second node here).
    where = (["--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1"] if hostfile
             else ["--num_gpus", "2"])
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", *where, "--master_port", str(port),
                str(script or ROOT / "launch" / "train.py")]
    r = run_cli(flat_overrides(overrides), launcher=launcher, timeout=900, env_extra=env_extra)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def layout(stage: int = 0, ranks: int = 1, in_backward: bool = False, precision: str = "fp32", **extra) -> dict:
    """Overrides for one layout of the same run: no clipping (in-backward has none), checkpoints every 3, a constant
    lr after warmup (so runs that stop at different steps share the schedule), 16 steps."""
    return {"memory": {"zero_stage": stage, "optimizer_in_backward": in_backward, "precision": precision},
            "schedule": {"decay": "constant"},
            "train": {"micro_batch_size": 4 // ranks, "max_steps": TOTAL, **extra.pop("train", {})},
            "optim": {"grad_clip": None}, "checkpoint": {"every_n_steps": 3, "keep_last": 10, **extra.pop("checkpoint", {})},
            **extra}


def speed_layout(stage: int, **extra) -> dict:
    """`layout` with selective activation checkpointing (and what `extra` adds: compiled blocks)."""
    lay = layout(stage, 2, **extra)
    lay["memory"].update(activation_checkpointing=True, checkpoint_policy="selective")
    return lay


def family_layout(fam: str, stage: int = 0, ranks: int = 1, steps: int = 9, resume: Path | None = None,
                  **memory) -> dict:
    """`layout` on a family's tiny model (tests/test_families.py) for `steps` steps, resumed from `resume`, with
    `memory` added (offload: DeepSpeed's CPU Adam, which offloaded states need)."""
    lay = layout(stage, ranks, model=tiny_model(fam), train={"max_steps": steps},
                 checkpoint={"resume": str(resume)} if resume else {})
    lay["memory"].update(memory)
    if memory.get("offload_optimizer"):
        lay["optim"]["name"] = "cpu_adam"
    return lay


def family_refs() -> dict[str, dict]:
    """The one-process family references the 2-rank family runs resume from or follow: 9 steps of each family in
    fp32 (ref_llama, ref_qwen2, ref_gpt_neox) and, where this CPU computes bf16 natively, Qwen2 in bf16."""
    refs = {f"ref_{fam}": family_layout(fam) for fam in TINY_OF}
    if NATIVE_BF16:
        refs["ref_qwen2_bf16"] = family_layout("qwen2", precision="bf16")
    return refs


def ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:07d}"


TRACKED = {"logging": {"track_memory": True}}  # checked against DeepSpeed and the simulator (check_zero_run)
NAN_AT_STEP_3_ON_RANK_1 = {"rank": 1, "call": 3, "kind": "nan"}


@dataclass
class Runs:
    root: Path
    configs: dict[str, dict]  # run name -> its overrides (tiny_overrides form)

    def __getitem__(self, name: str) -> Path:
        return self.root / name

    def __contains__(self, name: str) -> bool:
        return name in self.configs


def chain(root: Path) -> list[tuple[str, dict, dict | None]]:
    """(name, layout overrides, bad gradient) of each 2-rank run, in the order they train (a resumed run after
    its source)."""
    runs = [
        ("zero3", layout(3, 2, **TRACKED), None),  # the 2-rank run that never changes layout
        ("zero2", layout(2, 2, train={"max_steps": 3}, **TRACKED), None),
        ("to_zero3", layout(3, 2, train={"max_steps": 13}, checkpoint={"resume": str(ckpt(root / "ref", 3))}), None),
        ("to_zero1", layout(1, 2, checkpoint={"resume": str(ckpt(root / "zero3", 6))}), None),
        ("to_zero0", layout(0, 2, checkpoint={"resume": str(ckpt(root / "zero3", 6))}), None),
        ("zero1", layout(1, 2, train={"max_steps": 6}, **TRACKED), None),
        # dropout on (each rank's RNG): stopped after step 3 and resumed, it must continue bit for bit
        ("zero2_drop", layout(2, 2, model={"dropout": 0.1}, train={"max_steps": 6}), None),
        ("zero2_drop_resumed", layout(2, 2, model={"dropout": 0.1}, train={"max_steps": 6},
                                      checkpoint={"resume": str(ckpt(root / "zero2_drop", 3))}), None),
        ("nan_zero0", layout(0, 2, train={"max_steps": 6}, checkpoint={"every_n_steps": 0}), NAN_AT_STEP_3_ON_RANK_1),
        ("nan_zero2", layout(2, 2, train={"max_steps": 6}, checkpoint={"every_n_steps": 0}), NAN_AT_STEP_3_ON_RANK_1),
        # the full combination: ZeRO-3, optimizer and parameter offload, checkpointing, LoRA, the sample
        ("zero3_offload_lora", {
            "memory": {"zero_stage": 3, "offload_optimizer": True, "offload_params": True,
                       "activation_checkpointing": True, "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}},
            "optim": {"name": "cpu_adam", "lr": 1e-2}, "train": {"micro_batch_size": 2, "max_steps": 4},
            "checkpoint": {"every_n_steps": 2}, "sample": {"max_new_tokens": 5}}, None),
        # the speed options under ZeRO (tests/test_speed_options.py): selective recompute on ZeRO-3 against the plain
        # ZeRO-3 run, selective + compiled blocks on ZeRO-1 against the plain ZeRO-1 run (ZeRO-3 refuses compile)
        ("zero3_selective", speed_layout(3, train={"max_steps": 6}), None),
        ("zero1_selective_compiled", speed_layout(1, train={"max_steps": 6, "compile_blocks": True}), None),
        # Beyond GPT-2 (tests/test_families.py): each other family on another ZeRO layout, resumed across layouts, and
        # with offload. Llama from one process at step 3 onto ZeRO-3 (tracked: check_zero_run); GPT-NeoX onto ZeRO-1;
        # Qwen2 on ZeRO-2 with optimizer offload, and from its step 3 onto ZeRO-3 with optimizer and parameter offload.
        # (That conversion crashed inside DeepSpeed, for GPT-2 too, until `_materialize_optimizer_state` kept ZeRO-3's
        # offloaded gradient buffers.)
        ("llama_to_zero3", {**family_layout("llama", 3, 2, resume=ckpt(root / "ref_llama", 3)), **TRACKED}, None),
        ("gpt_neox_to_zero1", family_layout("gpt_neox", 1, 2, resume=ckpt(root / "ref_gpt_neox", 3)), None),
        ("qwen2_zero2_offload", family_layout("qwen2", 2, 2, 6, offload_optimizer=True), None),
        ("qwen2_offload_to_zero3", family_layout("qwen2", 3, 2, 6, resume=ckpt(root / "qwen2_zero2_offload", 3),
                                                 offload_optimizer=True, offload_params=True), None),
    ]
    if NATIVE_BF16:
        runs += [
            # Qwen2 in bf16: ZeRO-2 (against its one-process bf16 run), resumed at step 3 on ZeRO-3
            ("qwen2_zero2_bf16", family_layout("qwen2", 2, 2, 6, precision="bf16"), None),
            ("qwen2_bf16_to_zero3", family_layout("qwen2", 3, 2, 6, resume=ckpt(root / "qwen2_zero2_bf16", 3),
                                                  precision="bf16"), None),
            ("zero3_bf16", layout(3, 2, precision="bf16"), None),
            ("zero2_bf16", layout(2, 2, precision="bf16", train={"max_steps": 3}), None),
            ("zero0_bf16", layout(0, 2, precision="bf16", train={"max_steps": 3}), None),
            ("to_zero1_bf16", layout(1, 2, precision="bf16", checkpoint={"resume": str(ckpt(root / "zero3_bf16", 6))}),
             None),
        ]
    return runs


def train_chain(corpus: dict, root: Path) -> Runs:
    run_inprocess(corpus, root / "ref", **layout())
    for name, lay in family_refs().items():
        run_inprocess(corpus, root / name, **lay)
    if NATIVE_BF16:
        run_inprocess(corpus, root / "ref_bf16", **layout(precision="bf16"))
    runs = chain(root)
    configs = {name: tiny_overrides(corpus, root / name, **lay) for name, lay, _ in runs}
    spec = [{"overrides": flat_overrides(configs[name]), **({"bad_gradient": bad} if bad else {})}
            for name, _, bad in runs]
    (root / "runs.json").write_text(json.dumps(spec))
    hostfile = root / "hostfile"
    hostfile.write_text("# the format of launch/hostfile.example, one local host\nlocalhost slots=2\n")
    launch({}, 29631, hostfile, script=ROOT / "tests" / "helpers" / "train_many.py",
           env_extra={"RUNS": str(root / "runs.json")})
    refs = {"ref": layout(), **family_refs()}
    return Runs(root, {**{name: tiny_overrides(corpus, root / name, **lay) for name, lay in refs.items()}, **configs})
