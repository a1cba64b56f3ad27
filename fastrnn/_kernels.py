"""Picks the kernel build for this CPU.

The Cython kernels are compiled twice (setup.py): for any CPU, and with AVX2
and FMA. The second is used when the CPU has both, as numpy detects them;
FASTRNN_SIMD=baseline forces the first (for comparison and testing).
"""
import os


def _cpu_has_avx2_fma():
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        try:  # numpy < 2
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return False
    return bool(features.get("AVX2") and features.get("FMA3"))


def _load():
    choice = os.environ.get("FASTRNN_SIMD", "auto").lower()
    if choice not in ("auto", "baseline", "avx2"):
        raise ImportError(f"fastrnn: FASTRNN_SIMD must be 'auto', 'baseline' or 'avx2', "
                          f"got {choice!r}")
    if choice == "avx2" and not _cpu_has_avx2_fma():
        raise ImportError("fastrnn: FASTRNN_SIMD=avx2, but this CPU lacks AVX2 or FMA "
                          "(the build would stop on an illegal instruction)")
    if choice != "baseline" and _cpu_has_avx2_fma():
        try:
            from fastrnn import _backward_avx2 as backward
            from fastrnn import _forward_avx2 as forward
            return forward, backward, "avx2"
        except ImportError:
            if choice == "avx2":
                raise
    from fastrnn import _backward as backward
    from fastrnn import _forward as forward
    return forward, backward, "baseline"


forward, backward, SIMD = _load()
