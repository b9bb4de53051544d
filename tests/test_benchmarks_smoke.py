"""Tiny smoke runs of benchmark code paths (not the benchmarks themselves)."""

import pytest

from benchmarks.gelu_saving import activation_mib


@pytest.mark.parametrize("fake", [False, True])
def test_gelu_saving_counts_fewer_bytes_when_fused(fake):
    old = activation_mib("distilgpt2", False, 0.0, 64, "fp32", fake)
    new = activation_mib("distilgpt2", True, 0.0, 64, "fp32", fake)
    # NewGELU also saves tanh(.), 0.5x and 1+tanh(.) ([seq x 3072] fp32 each) per block: 6 x 3 x 64 x 3072 x 4 B
    assert old - new == pytest.approx(6 * 3 * 64 * 3072 * 4 / 2**20, rel=0.01)
