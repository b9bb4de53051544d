"""Bytes autograd saves for backward, counted per unique storage (what activation memory is made of)."""

from __future__ import annotations

import contextlib

import torch


class SavedTensorCounter:
    """Context manager: every tensor autograd saves inside it is counted once per storage.

    Parameters (leaf tensors that require grad) are reported separately: they are saved by
    reference, not allocated by the forward.
    """

    def __init__(self):
        self.storages: dict[int, int] = {}
        self.param_storages: dict[int, int] = {}
        self._ctx = None

    def _pack(self, t: torch.Tensor):
        try:
            st = t.untyped_storage()
            key, nbytes = st._cdata if hasattr(st, "_cdata") else id(st), st.nbytes()
        except (RuntimeError, NotImplementedError):
            key, nbytes = id(t), t.numel() * t.element_size()
        target = self.param_storages if (t.is_leaf and t.requires_grad) else self.storages
        target[key] = nbytes
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def activation_bytes(self) -> int:
        return sum(self.storages.values())


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
