"""Build the Cython kernels. Metadata lives in pyproject.toml."""
import os

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

extensions = [
    Extension("fastrnn._forward", ["fastrnn/_forward.pyx"], include_dirs=["fastrnn"]),
    Extension("fastrnn._backward", ["fastrnn/_backward.pyx"], include_dirs=["fastrnn"]),
]

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives),
)
