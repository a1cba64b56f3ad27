"""Build the Cython kernels. Metadata lives in pyproject.toml."""
import os
import platform

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

# FASTRNN_DEBUG_CYTHON=1 turns bounds/None/initialisation checks back on.
DEBUG = os.environ.get("FASTRNN_DEBUG_CYTHON", "0") == "1"

directives = {
    "boundscheck": DEBUG,
    "wraparound": False,
    "initializedcheck": DEBUG,
    "nonecheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
    "language_level": 3,
}

# Flags that let the compiler vectorise the gate loops; neither changes a
# result or NaN handling (unlike -ffast-math), neither targets a CPU.
# -fno-trapping-math: the code never reads floating-point exception flags;
#   without it GCC will not turn the activations' clamps into vector selects.
# vect-max-version-for-alias-checks: an LSTM row reads and writes more
#   arrays than GCC's default of 10 run-time overlap checks allows.
COMPILE_ARGS = ["-fno-trapping-math", "--param=vect-max-version-for-alias-checks=64"]

# Each kernel module is built for any x86-64 (SSE2) or other CPU, and on
# x86-64 also as <name>_avx2 (AVX2 + FMA) and <name>_avx512 (AVX-512 F, BW,
# DQ, VL), which fastrnn/_kernels.py imports at run time only on CPUs that
# have them: the vectorised gate math runs ~4x faster with AVX2, and the
# micro-kernel (_microkernel.h) does twice the multiply-adds per instruction
# with AVX-512.
SIMD_VARIANTS = {"": []}
if platform.machine().lower() in ("x86_64", "amd64"):
    SIMD_VARIANTS["_avx2"] = ["-mavx2", "-mfma"]
    SIMD_VARIANTS["_avx512"] = ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512dq",
                                "-mavx512vl"]

extensions = [
    Extension(f"fastrnn.{name}{suffix}", [f"fastrnn/{name}{suffix}.pyx"],
              include_dirs=["fastrnn", numpy.get_include()],
              define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
              extra_compile_args=COMPILE_ARGS + flags)
    for name in ("_forward", "_backward")
    for suffix, flags in SIMD_VARIANTS.items()
]
# the kernels' shared worker thread (no arithmetic: built once)
extensions.append(Extension("fastrnn._worker", ["fastrnn/_worker.pyx"],
                            include_dirs=["fastrnn"], extra_compile_args=["-pthread"],
                            extra_link_args=["-pthread"]))

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives),
)
