"""The documentation builds without a warning, and the package is typed.

The Sphinx site (docs/) is built into a temporary folder with warnings as
errors, as ``sphinx-build -W --keep-going -b html docs docs/_build/html``
builds it, when Sphinx and numpydoc are installed (the 'docs' extra; skipped
otherwise). The build runs in a subprocess from the temporary folder, so it
documents the installed package, not the unbuilt sources. Every public name
must have its entry in the API reference.
"""
import importlib.resources
import importlib.util
import pathlib
import subprocess
import sys

import pytest

import fastrnn

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SUBMODULES = ("optim", "losses", "metrics", "callbacks", "batching", "dask", "sklearn",
              "datasets")


def test_py_typed_ships_with_the_package():
    assert importlib.resources.files("fastrnn").joinpath("py.typed").is_file()


def test_py_typed_is_package_data():
    pyproject = ROOT / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not in the source tree")
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib
    config = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["fastrnn"]
    assert "docs" in config["project"]["optional-dependencies"]


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory):
    if not (DOCS / "conf.py").is_file():
        pytest.skip("not in the source tree")
    for name in ("sphinx", "numpydoc"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"needs {name}: pip install '.[docs]'")
    tmp = tmp_path_factory.mktemp("docs")
    out = tmp / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp / "doctrees"), str(DOCS), str(out)],
        cwd=tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return out


def test_docs_build_without_warnings(built_docs):
    assert (built_docs / "index.html").is_file()
    for page in ("inference", "training", "streaming", "deploy", "speed"):
        assert (built_docs / "guide" / f"{page}.html").is_file()


def test_every_public_name_is_documented(built_docs):
    html = "".join(p.read_text(encoding="utf-8") for p in (built_docs / "api").glob("*.html"))
    for name in fastrnn.__all__:
        if name == "__version__":
            continue
        obj = getattr(fastrnn, name)
        if isinstance(obj, type(fastrnn)):
            assert f'id="module-fastrnn.{name}"' in html, name
        else:
            module = obj.__module__.removeprefix("fastrnn.")
            assert (f'id="fastrnn.{name}"' in html
                    or f'id="fastrnn.{module}.{name}"' in html), name
    for name in SUBMODULES:
        assert f'id="module-fastrnn.{name}"' in html, name


def test_equations_render_with_mathjax(built_docs):
    page = (built_docs / "api" / "layers.html").read_text(encoding="utf-8")
    assert "mathjax" in page.lower()
    assert page.count('class="math') >= 3
