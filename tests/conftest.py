import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # so tests can import reference.py


def assert_close(got, ref, dtype):
    """float32 within 1e-5 of the output scale, float64 within 1e-12."""
    tol = 1e-5 if np.dtype(dtype) == np.float32 else 1e-12
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    err = float(np.abs(got - ref).max(initial=0.0))
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol:g} x scale {scale:.3g}"


@pytest.fixture
def close():
    return assert_close
