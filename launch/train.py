"""Entry point for launchers: `deepspeed --num_gpus N launch/train.py --config FILE [key=value ...]`.

Also works under `torchrun --nproc_per_node N` and `srun` (rank/world read from the environment).
The deepspeed launcher appends --local_rank=N, which the CLI accepts and ignores (LOCAL_RANK is set too).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.cli import main  # noqa: E402
from engine.distributed import export_slurm_env  # noqa: E402

if __name__ == "__main__":
    export_slurm_env()
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    sys.exit(main(["train", *args]))
