"""Build the Cython kernels. Metadata lives in pyproject.toml."""
import glob
import hashlib
import os
import sysconfig
import tempfile

import numpy
from Cython import Tempita
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

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

def target_machine():
    """The CPU family the modules are for. sysconfig's platform follows a
    cross build (cibuildwheel sets _PYTHON_HOST_PLATFORM to build x86-64 Mac
    wheels on an arm64 Mac, and the reverse), where platform.machine() would
    name the build machine; MSVC's target is VSCMD_ARG_TGT_ARCH."""
    if os.name == "nt" and os.environ.get("VSCMD_ARG_TGT_ARCH"):
        machine = os.environ["VSCMD_ARG_TGT_ARCH"].lower()
    else:
        machine = sysconfig.get_platform().rsplit("-", 1)[-1].lower()
    return {"amd64": "x86_64", "x64": "x86_64"}.get(machine, machine)


# the float types the templates write their typed structs and entries for:
# (C type, suffix of the fields and functions), FLOATS in the templates
FLOATS = [("float", "f32"), ("double", "f64")]


def generate_from_templates(folder="fastrnn"):
    """Write each fastrnn/*.tp (a Tempita template: float32 and float64
    versions of the kernels' typed jobs from one text, as scikit-learn's
    .pyx.tp files) as the file its name ends in, e.g. _forward.pyx.tp ->
    _forward.pyx. A file whose text is unchanged is left alone, so its
    timestamp does not rebuild the modules that include it. The first line
    records a hash of the text below it: a file whose text no longer matches
    its hash was edited by hand, and the build stops and says so rather than
    overwrite the edit."""
    for template in sorted(glob.glob(os.path.join(folder, "*.tp"))):
        target = template[:-len(".tp")]
        with open(template, encoding="utf-8") as f:
            body = Tempita.sub(f.read(), __name=template, FLOATS=FLOATS)
        text = _generated_header(template, body) + body
        if os.path.exists(target):
            with open(target, encoding="utf-8") as f:
                old = f.read()
            if old == text:
                continue
            old_header, _, old_body = old.partition("\n")
            if old_header + "\n" != _generated_header(template, old_body):
                raise SystemExit(
                    f"{target} was edited after setup.py wrote it from {template}: make "
                    f"the change in {template}, then delete {target} (deleting it alone "
                    "discards the edit)")
        with open(target, "w", encoding="utf-8") as f:
            f.write(text)


def _generated_header(template, body):
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]
    return (f"# Generated from {os.path.basename(template)} by setup.py: edit that file, "
            f"not this one. (text sha256 {digest})\n")


# Each kernel module is built for any x86-64 (SSE2) or other CPU, and on
# x86-64 also as <name>_avx2 (AVX2 + FMA) and <name>_avx512 (AVX-512 F, BW,
# DQ, VL), which fastrnn/_kernels.py imports at run time only on CPUs that
# have them: the vectorised gate math runs ~4x faster with AVX2, and the
# micro-kernel (_microkernel.h) does twice the multiply-adds per instruction
# with AVX-512. Not on arm64/aarch64 (nor in a macOS universal2 build: one
# compiler call for both CPUs), where _kernels.py finds the portable build only.
SIMD_BUILDS = [""] + (["_avx2", "_avx512"] if target_machine() == "x86_64" else [])
# The kernels of quantized inference (_quant.pyx, _qkernel.h) have three more
# builds on x86-64: with AVX-512 VNNI (int8 vpdpbusd), and with VNNI and
# BF16 (bfloat16 vdpbf16ps), and with those and AMX (int8 and bf16 tiles, GCC 11+ or
# Clang 12+ on Linux; a compiler without the flags builds it as _bf16);
# fastrnn/quantized.py picks the widest the CPU runs (the _avx512 one runs
# on CPUs with none of them).
QUANT_BUILDS = SIMD_BUILDS + (["_vnni", "_bf16", "_amx"] if target_machine() == "x86_64"
                              else [])

# Flags per compiler family ("unix": GCC and Clang, on Linux, macOS and
# MinGW; "msvc") and build. None changes a result or NaN handling (unlike
# -ffast-math), and no build targets a CPU beyond its instruction set.
# GCC and Clang:
# -fno-trapping-math: the code never reads floating-point exception flags, so
#   GCC may evaluate both sides of the kernels' conditional expressions (clamps,
#   masks) and vectorise them as selects.
# --param=vect-max-version-for-alias-checks=64 (GCC only: Clang warns about
#   it): an LSTM row reads and writes more arrays than GCC's default of 10
#   run-time overlap checks allows.
# MSVC: /fp:precise, its default, keeps NaN handling; /arch:AVX2 and
#   /arch:AVX512 let it use those instructions and FMA (it defines no
#   __FMA__: _microkernel.h knows), and /fp:contract lets it fuse a * b + c
#   as GCC does.
SIMD_FLAGS = {
    "unix": {"": [], "_avx2": ["-mavx2", "-mfma"],
             "_avx512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512dq",
                         "-mavx512vl"],
             "_vnni": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512dq",
                       "-mavx512vl", "-mavx512vnni"],
             "_bf16": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512dq",
                       "-mavx512vl", "-mavx512vnni", "-mavx512bf16"]},
    "msvc": {"": [], "_avx2": ["/arch:AVX2", "/fp:contract"],
             "_avx512": ["/arch:AVX512", "/fp:contract"], "_vnni": ["/arch:AVX512"],
             "_bf16": ["/arch:AVX512"], "_amx": ["/arch:AVX512"]},
}
# The quantized kernels give the same bits in every build with FMA: no build
# may fuse a multiply and an add that another does not (GCC and Clang
# contract by default with FMA; MSVC only with /fp:contract, left out for
# them); FASTRNN_EXPLICIT_FMA fuses the activations' polynomials by hand
# where the CPU has FMA (fastrnn/_activations.h); FASTRNN_RATIONAL_ACTIVATIONS
# gives them their own sigmoid and tanh (fastrnn/_gates.pxd.tp).
QUANT_FLAGS = {"unix": ["-ffp-contract=off", "-DFASTRNN_EXPLICIT_FMA",
                        "-DFASTRNN_RATIONAL_ACTIVATIONS=1"],
               "msvc": ["/DFASTRNN_RATIONAL_ACTIVATIONS=1"]}
# the AMX build: bf16's flags and the tiles' (without them where the
# compiler cannot build the tiles' intrinsics: BuildExt._assembles_amx)
AMX_FLAGS = ["-mamx-tile", "-mamx-int8", "-mamx-bf16"]
SIMD_FLAGS["unix"]["_amx"] = SIMD_FLAGS["unix"]["_bf16"] + AMX_FLAGS
# Layer norm's row sums (fastrnn/_layernorm.pyx.tp) are C loops that GCC
# fused in one build and not in another: the AVX-512 and AVX2 builds' row
# statistics differed in the last bit (rows of n values, n % 8 in 4..7).
# Compiled without contraction, the activations' polynomials fused by hand
# (FASTRNN_EXPLICIT_FMA), as the quantized kernels: the same bits in both.
LAYERNORM_FLAGS = {"unix": ["-ffp-contract=off", "-DFASTRNN_EXPLICIT_FMA"], "msvc": []}
UNIX_FLAGS = ["-fno-trapping-math"]
GCC_ONLY_FLAGS = ["--param=vect-max-version-for-alias-checks=64"]


class BuildExt(build_ext):
    """Gives each module the flags of the compiler that builds it."""

    def build_extensions(self):
        family = "msvc" if self.compiler.compiler_type == "msvc" else "unix"
        common, threads = [], []
        if family == "unix":
            common = UNIX_FLAGS + [flag for flag in GCC_ONLY_FLAGS if self._takes(flag)]
            threads = [] if os.name == "nt" else ["-pthread"]   # Win32 threads need no flag
        for ext in self.extensions:
            if ext.name == "fastrnn._worker":
                ext.extra_compile_args = threads
                ext.extra_link_args = threads
            elif ext.name.startswith("fastrnn._quant"):
                build = ext.name.replace("fastrnn._quant", "")
                flags = [f for f in SIMD_FLAGS[family][build] if f != "/fp:contract"]
                if build == "_amx" and not self._assembles_amx(flags):
                    flags = [f for f in flags if f not in AMX_FLAGS]   # then _bf16's twin
                ext.extra_compile_args = common + flags + QUANT_FLAGS[family]
            elif ext.name.startswith("fastrnn._layernorm"):
                build = ext.name.replace("fastrnn._layernorm", "")
                flags = [f for f in SIMD_FLAGS[family][build] if f != "/fp:contract"]
                ext.extra_compile_args = common + flags + LAYERNORM_FLAGS[family]
            else:
                build = (ext.name.replace("fastrnn._forward", "").replace("fastrnn._backward", "")
                         .replace("fastrnn._projection", ""))
                ext.extra_compile_args = common + SIMD_FLAGS[family][build]
        super().build_extensions()

    def _assembles_amx(self, flags):
        """Whether the compiler and assembler build AMX intrinsics with these
        flags (GCC 11+ takes the flags, but binutils before 2.36 cannot
        assemble the instructions)."""
        if not set(AMX_FLAGS) <= set(flags):
            return False
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, "amx.c")
            with open(source, "w") as f:
                f.write("#include <immintrin.h>\n"
                        "void fastrnn_probe(void) { _tile_zero(0); _tile_dpbusd(0, 1, 2);\n"
                        "    _tile_dpbf16ps(0, 1, 2); _tile_release(); }\n")
            try:
                self.compiler.compile([source], output_dir=tmp,
                                      extra_postargs=flags + ["-Werror"])
            except CompileError:
                return False
        return True

    def _takes(self, flag):
        """Whether the C compiler takes flag without a warning."""
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, "flag.c")
            with open(source, "w") as f:
                f.write("int main(void) { return 0; }\n")
            try:
                self.compiler.compile([source], output_dir=tmp, extra_postargs=[flag, "-Werror"])
            except CompileError:
                return False
        return True


extensions = [
    Extension(f"fastrnn.{name}{build}", [f"fastrnn/{name}{build}.pyx"],
              include_dirs=["fastrnn", numpy.get_include()],
              define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")])
    for name in ("_forward", "_backward", "_layernorm", "_projection")
    for build in SIMD_BUILDS
]
extensions += [
    Extension(f"fastrnn._quant{build}", [f"fastrnn/_quant{build}.pyx"],
              include_dirs=["fastrnn", numpy.get_include()],
              define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")])
    for build in QUANT_BUILDS
]
# the kernels' shared worker thread (no arithmetic: built once)
extensions.append(Extension("fastrnn._worker", ["fastrnn/_worker.pyx"], include_dirs=["fastrnn"]))

# a build: setuptools runs this file as __main__ (tests/test_build.py imports it)
if __name__ == "__main__":
    generate_from_templates()
    setup(
        ext_modules=cythonize(extensions, compiler_directives=directives),
        cmdclass={"build_ext": BuildExt},
    )
