"""A non-finite gradient on one rank: `poisoned_losses(rank, bad_rank, at, kind)` makes the DeepSpeed backend's loss
give rank `bad_rank` alone an infinite or NaN gradient from its `at`-th loss on; the other ranks' gradients stay
finite. Used by tests/two_ranks.py to check that every rank skips the same DeepSpeed step."""

import contextlib

import torch

import engine.backends.deepspeed_backend as ds


class BadGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kind):
        ctx.kind = kind
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float(ctx.kind), None


@contextlib.contextmanager
def poisoned_losses(rank: int, bad_rank: int, at: int, kind: str = "nan"):
    real = ds.batch_loss_sum
    calls = [0]

    def loss(model, batch, chunk, **kw):
        calls[0] += 1
        s, n = real(model, batch, chunk, **kw)
        return (BadGrad.apply(s, kind) if calls[0] == at and rank == bad_rank else s), n

    ds.batch_loss_sum = loss
    try:
        yield
    finally:
        ds.batch_loss_sum = real
