"""Launchers users start the engine with: SLURM's variables mapped to torch's, the SLURM batch script (with
stand-ins for srun/scontrol), the hostfile example. The real 2-rank launches are in test_distributed.py."""

import os
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from engine.distributed import dist_env, export_slurm_env, first_slurm_host


@pytest.mark.parametrize("nodelist,first", [
    ("gpu-node7", "gpu-node7"),
    ("a100-[03-04,07],cpu1", "a100-03"),
    ("node1,node2", "node1"),
    ("rack[1-2]-n[5-6]", "rack1-n5"),
    ("n[1,3]", "n1"),
])
def test_first_slurm_host_is_what_scontrol_lists_first(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_srun_task_gets_torch_variables_and_rendezvous():
    env = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "gpu[12-13]"}
    export_slurm_env(env)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("9", "1", "16")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu12", "29500")
    assert dist_env(env).launched and dist_env(env).rank == 9


def test_torch_launcher_variables_win_over_slurm():
    """torchrun or deepspeed started inside a SLURM job: their per-GPU ranks, not SLURM's per-node tasks."""
    env = {"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "8", "MASTER_ADDR": "h0",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "h[0-1]"}
    before = dict(env)
    export_slurm_env(env)
    assert env == before
    assert (dist_env(env).rank, dist_env(env).local_rank, dist_env(env).world_size) == (3, 3, 8)


def test_batch_script_sets_the_rendezvous_and_starts_launch_train_under_srun(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[12-13]" ] && printf "gpu12\\ngpu13\\n"\n')
    (bin_dir / "srun").write_text('#!/bin/sh\necho "MASTER=$MASTER_ADDR:$MASTER_PORT"\necho "srun $*"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[12-13]",
           "SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "2", "SLURM_SUBMIT_DIR": str(ROOT), "PYTHON": "py"}
    env.pop("MASTER_PORT", None)
    env.pop("MASTER_ADDR", None)
    r = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "--config", "gpt2-xl_zero3_node", "optim.lr=1e-5"],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "MASTER=gpu12:29500" in r.stdout
    assert f"srun --kill-on-bad-exit=1 py {ROOT}/launch/train.py --config gpt2-xl_zero3_node optim.lr=1e-5" in r.stdout


def test_hostfile_example_parses_as_deepspeed_reads_it():
    from deepspeed.launcher.runner import _parse_hostfile

    lines = (ROOT / "launch" / "hostfile.example").read_text().splitlines(keepends=True)
    assert dict(_parse_hostfile(lines)) == {"node-1": 8, "node-2": 8}
    assert Path(ROOT / "configs" / "gpt2-xl_zero3_node.yaml").exists()  # the preset the examples name
