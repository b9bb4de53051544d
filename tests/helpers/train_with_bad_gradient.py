"""A launcher entry point (like launch/train.py) whose rank BAD_RANK gets an infinite or NaN gradient from its
BAD_CALL-th loss on (env: BAD_RANK, BAD_CALL, BAD_KIND=inf|nan); the other ranks' gradients stay finite. Used by
tests/test_layout_change.py to check that every rank skips the same DeepSpeed step."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import engine.backends.deepspeed_backend as ds  # noqa: E402
from engine.cli import main  # noqa: E402


class BadGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float(os.environ.get("BAD_KIND", "nan"))


def poisoned(real, rank: int, at: int):
    calls = [0]

    def loss(model, batch, chunk, **kw):
        calls[0] += 1
        s, n = real(model, batch, chunk, **kw)
        return (BadGrad.apply(s) if calls[0] == at and rank == int(os.environ["BAD_RANK"]) else s), n

    return loss


if __name__ == "__main__":
    rank = int(os.environ.get("RANK", "0"))
    ds.batch_loss_sum = poisoned(ds.batch_loss_sum, rank, int(os.environ["BAD_CALL"]))
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    sys.exit(main(["train", *args]))
