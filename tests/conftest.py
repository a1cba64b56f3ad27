import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # so tests can import reference.py

from option_cases import assert_close as scaled_close  # noqa: E402


def assert_close(got, ref, dtype):
    """float32 within 1e-5 of the output scale, float64 within 1e-12."""
    scaled_close(got, ref, 1e-5 if np.dtype(dtype) == np.float32 else 1e-12)


@pytest.fixture
def close():
    return assert_close
