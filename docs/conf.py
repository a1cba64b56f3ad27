"""Sphinx configuration of fastrnn's documentation.

Build with ``sphinx-build -W --keep-going -b html docs docs/_build/html``
(warnings are errors) after ``pip install ".[docs]"``. The API reference is
read from the docstrings (numpydoc) of the installed, built package.
"""
from sphinx.util import inspect as _sphinx_inspect

import fastrnn

project = "fastrnn"
author = "fastrnn contributors"
copyright = "fastrnn contributors"
release = fastrnn.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
]

# numpydoc: each class's methods are listed by autodoc's :members:, so numpydoc
# need not add member tables (which would want autosummary stub pages)
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

autodoc_member_order = "bysource"
# signatures carry the type annotations; the descriptions stay in the docstrings
autodoc_typehints = "signature"
# numpy's input aliases by name, not expanded into their long unions
autodoc_type_aliases = {"ArrayLike": "ArrayLike", "DTypeLike": "DTypeLike"}


def _alias_name(self):
    return self.name


# Sphinx writes an alias inside a union (ArrayLike | None) as
# "TypeAliasForwardRef('ArrayLike')"; its name alone is what the source says
_sphinx_inspect.TypeAliasForwardRef.__repr__ = _alias_name
autodoc_preserve_defaults = True

exclude_patterns = ["_build"]
templates_path = []
html_static_path = ["_static"]
html_title = f"fastrnn {release}"
try:
    import furo  # noqa: F401
    html_theme = "furo"
except ImportError:
    html_theme = "alabaster"
