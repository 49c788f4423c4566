"""DenseLinear on the host: weights kept [out, in], `x @ w` as NumPy's x @ w.T (the GPU paths are
tests/test_weight_stream_gpu.py's)."""

from __future__ import annotations

import numpy as np
import pytest

from cupaged.layers.dense_linear import DenseLinear, matmul


def test_matmul_is_x_times_w_transposed() -> None:
    rng = np.random.default_rng(3)
    w, x = rng.standard_normal((7, 12)).astype(np.float32), rng.standard_normal((5, 12)).astype(np.float32)
    linear = DenseLinear(w)
    assert linear.shape == (12, 7)
    np.testing.assert_allclose(matmul(x, linear), x @ w.T, rtol=1e-6)
    out = np.full((5, 7), np.nan, np.float32)
    assert matmul(x, linear, out=out) is out
    np.testing.assert_allclose(out, x @ w.T, rtol=1e-6)
    assert matmul(x, linear, np.float64).dtype == np.float64


def test_matmul_refuses_a_wrong_width() -> None:
    with pytest.raises(ValueError, match="12 inputs"):
        matmul(np.ones((2, 11), np.float32), DenseLinear(np.ones((7, 12), np.float32)))
