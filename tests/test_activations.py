"""Accuracy of the float32 activations over their whole input range.

The kernels compute float32 sigmoid and tanh with their own polynomials
(fastrnn/_gates.pxd.tp); the quantized kernels with rational functions of
their own, to a bound of their own. These tests sweep float32 bit patterns
across every binade, positive and negative, and bound the error against
float64 libm.
"""
import importlib

import numpy as np
import pytest

from fastrnn import _kernels, quantized

# every build of the kernels this CPU runs (setup.py, _kernels.py), and of the
# quantized kernels (their own activations: fused multiply-adds in FMA builds)
BUILDS = ["fastrnn._forward"] + [f"fastrnn._forward_{build}" for build in ("avx2", "avx512")
                                 if _kernels.cpu_supports(build)]
QUANT_BUILDS = ["fastrnn._quant" + ("" if build == "baseline" else "_" + build)
                for build in quantized.INT8_BUILDS if quantized._int8_cpu_supports(build)]


@pytest.fixture(scope="module", params=BUILDS)
def kernels(request):
    return importlib.import_module(request.param)


@pytest.fixture(scope="module", params=QUANT_BUILDS)
def quant_kernels(request):
    return importlib.import_module(request.param)


def run(x, kernels=_kernels.forward):
    x = np.ascontiguousarray(x, np.float32)
    s, t = np.empty_like(x), np.empty_like(x)
    kernels.activations(x=x, sigmoid_out=s, tanh_out=t)
    return s, t


def all_finite_floats(stride=251):
    """Every stride-th positive finite float32 (all binades, denormals too),
    and their negatives."""
    bits = np.arange(0, 0x7F800000, stride, dtype=np.uint32)
    pos = bits.view(np.float32)
    return np.concatenate([pos, -pos])


def _sweep(kernels):
    """x over all binades, the kernels' sigmoid and tanh of it, float64's."""
    x = all_finite_floats()
    s, t = run(x, kernels)
    x64 = x.astype(np.float64)
    with np.errstate(over="ignore"):
        ref_s = 1 / (1 + np.exp(-x64))
    return x, s, t, ref_s, np.tanh(x64)


@pytest.fixture(scope="module")
def sweep(kernels):
    return _sweep(kernels)


def test_sigmoid_absolute_error(sweep):
    x, s, _, ref, _ = sweep
    assert np.abs(s - ref).max() <= 1.5e-7                     # ~1 float32 ulp at 0.5-1
    assert s.min() >= 0 and s.max() <= 1


def test_sigmoid_relative_error_in_the_negative_tail(sweep):
    """1 / (1 + e^-x) keeps relative accuracy where sigmoid is tiny (ORT's
    0.5 + p/q form does not); flush-to-zero territory excepted."""
    x, s, _, ref, _ = sweep
    tail = (x < 0) & (ref > 1e-37)
    rel = np.abs(s[tail] - ref[tail]) / ref[tail]
    assert rel.max() <= 2e-6


def test_tanh_relative_error(sweep):
    """tanh stays accurate relative to its value near 0 (no cancellation)."""
    x, _, t, _, ref = sweep
    nonzero = np.abs(ref) > 1e-30
    rel = np.abs(t[nonzero] - ref[nonzero]) / np.abs(ref[nonzero])
    assert rel.max() <= 4 * np.finfo(np.float32).eps             # within 4 ulp
    assert np.abs(t - ref).max() <= 1.2e-7
    assert np.abs(t).max() <= 1


def test_tanh_is_odd_and_exact_at_zero(kernels):
    x = np.float32([0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 3.0, -3.0])
    _, t = run(x, kernels)
    np.testing.assert_array_equal(t[::2], -t[1::2])
    assert t[0] == 0 and np.signbit(t[1])


def test_special_values(kernels):
    s, t = run(np.float32([np.nan, np.inf, -np.inf, 88.0, -88.0, 1e30, -1e30]), kernels)
    assert np.isnan(s[0]) and np.isnan(t[0])                    # NaN propagates
    assert s[1] == 1 and 0 <= s[2] < 1e-37     # 1 / (1 + e^88): a denormal, 0 under FTZ
    np.testing.assert_array_equal(t[1:3], [1, -1])
    np.testing.assert_array_equal(t[3:], [1, -1, 1, -1])
    assert s[3] == 1 and 0 <= s[4] < 1e-37


# --- the quantized kernels' rational sigmoid and tanh ---------------------------------------

@pytest.fixture(scope="module")
def quant_sweep(quant_kernels):
    return _sweep(quant_kernels)


def test_rational_activations_absolute_error(quant_sweep):
    """The bounds fastrnn/_gates.pxd.tp states (measured 6.1e-7 and 3.3e-7):
    far below the int8 rounding of h at each step (1/254 of a row's largest
    value), and inside [-1, 1] and [0, 1]."""
    x, s, t, ref_s, ref_t = quant_sweep
    assert np.abs(t - ref_t).max() <= 7e-7
    assert np.abs(s - ref_s).max() <= 4e-7
    assert np.abs(t).max() <= 1
    assert s.min() >= 0 and s.max() <= 1


def test_rational_tanh_near_zero(quant_sweep):
    """tanh(x) = x (1 + O(x^2)): relative accuracy where |x| is small, x
    itself below the square's underflow."""
    x, _, t, _, ref_t = quant_sweep
    small = (np.abs(x) < 1e-2) & (np.abs(x) > 1e-30)
    assert (np.abs(t[small] - ref_t[small]) / np.abs(ref_t[small])).max() <= 4e-7
    tiny = (np.abs(x) < 1e-20) & (x != 0)
    np.testing.assert_array_equal(t[tiny], x[tiny])


def test_rational_activations_odd_and_special_values(quant_kernels):
    x = np.float32([0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 3.0, -3.0, 8.4, -8.4, 20.0, -20.0])
    s, t = run(x, quant_kernels)
    np.testing.assert_array_equal(t[::2], -t[1::2])            # odd, exactly
    assert t[0] == 0 and np.signbit(t[1]) and s[0] == 0.5
    s, t = run(np.float32([np.nan, np.inf, -np.inf, 1e30, -1e30]), quant_kernels)
    assert np.isnan(s[0]) and np.isnan(t[0])                    # NaN propagates
    assert 1 - 7e-7 <= t[1] <= 1 and t[2] == -t[1] and t[3] == t[1] and t[4] == t[2]
    assert 1 - 4e-7 <= s[1] <= 1 and 0 <= s[2] <= 4e-7 and s[3] == s[1] and s[4] == s[2]
