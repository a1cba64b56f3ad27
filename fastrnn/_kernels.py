"""Picks the kernel build for this CPU.

The Cython kernels are compiled three times on x86-64 (setup.py): for any
CPU, with AVX2 and FMA, and with AVX-512 (F, BW, DQ, VL). The widest build
the CPU has (as numpy detects it, which includes the operating system's
support for the registers) is used; FASTRNN_SIMD=baseline, avx2 or avx512
forces one (for comparison and testing).
"""
import os

BUILDS = ("baseline", "avx2", "avx512")


def _cpu_features():
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        try:  # numpy < 2
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return {}
    return features


def cpu_supports(build):
    """Whether this CPU runs the given build's instructions."""
    features = _cpu_features()
    if build == "baseline":
        return True
    has_avx2 = bool(features.get("AVX2") and features.get("FMA3"))
    if build == "avx2":
        return has_avx2
    return has_avx2 and all(features.get(name) for name in
                            ("AVX512F", "AVX512BW", "AVX512DQ", "AVX512VL"))


def _import(build):
    import importlib
    suffix = "" if build == "baseline" else "_" + build
    forward = importlib.import_module("fastrnn._forward" + suffix)
    backward = importlib.import_module("fastrnn._backward" + suffix)
    # the layer-normalised cells' kernels read the weights _forward packs:
    # always the same build (the packed layout depends on the instruction set)
    layernorm = importlib.import_module("fastrnn._layernorm" + suffix)
    projection = importlib.import_module("fastrnn._projection" + suffix)
    return forward, backward, layernorm, projection


def env_choice(variable):
    """A build named by an environment variable, lower case; 'auto' when it
    is unset or set but empty (an env file's "FASTRNN_SIMD="), as an empty
    FASTRNN_NUM_THREADS counts as unset."""
    return os.environ.get(variable, "").strip().lower() or "auto"


def forced_build_missing(variable, choice, portable_module):
    """A forced build (``variable``=``choice``) this installation lacks (a
    wheel or build for another CPU family): an error naming the variable;
    but when the portable build is missing too, the sources are unbuilt,
    which the package's own message says (the ModuleNotFoundError goes on)."""
    import importlib
    importlib.import_module(portable_module)   # (missing too: that error goes on)
    raise ImportError(f"fastrnn: {variable}={choice}, but this installation has no {choice} "
                      f"build of the kernels (built for another CPU family?); unset "
                      f"{variable} to use the widest build it has") from None


def _load():
    choice = env_choice("FASTRNN_SIMD")
    if choice not in ("auto",) + BUILDS:
        raise ImportError(f"fastrnn: FASTRNN_SIMD must be 'auto', 'baseline', 'avx2' or "
                          f"'avx512', got {choice!r}")
    if choice != "auto":
        if not cpu_supports(choice):
            raise ImportError(f"fastrnn: FASTRNN_SIMD={choice}, but this CPU lacks its "
                              f"instructions (the build would stop on an illegal instruction)")
        try:
            return (*_import(choice), choice)
        except ModuleNotFoundError:
            forced_build_missing("FASTRNN_SIMD", choice, "fastrnn._forward")
    for build in reversed(BUILDS):
        if cpu_supports(build):
            try:
                return (*_import(build), build)
            except ImportError:   # not built here (another architecture)
                continue
    raise ImportError("fastrnn: no kernel build could be imported")


forward, backward, layernorm, projection, SIMD = _load()
