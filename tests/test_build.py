"""setup.py's generation of kernel sources from their Tempita templates
(fastrnn/*.tp): written once, left alone while unchanged, written anew when
the template changes, and never overwriting a hand edit. Needs the source
tree's setup.py and Cython (the 'wheel' extra); skipped without them."""
import importlib.util
import os
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parent.parent / "setup.py"


@pytest.fixture(scope="module")
def setup_module():
    if not SETUP.is_file():
        pytest.skip("no setup.py: not a source tree")
    pytest.importorskip("Cython", reason="needs Cython: pip install '.[wheel]'")
    spec = importlib.util.spec_from_file_location("fastrnn_setup", SETUP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)   # not __main__: defines, builds nothing
    return module


# FLOATS: setup.py's float types
TEMPLATE = '''{{for c, s in FLOATS}}
cdef struct Buffers_{{s}}:
    {{c}}* data
{{endfor}}
'''


def test_written_then_left_alone_then_rewritten(setup_module, tmp_path):
    (tmp_path / "_k.pyx.tp").write_text(TEMPLATE)
    setup_module.generate_from_templates(str(tmp_path))
    target = tmp_path / "_k.pyx"
    text = target.read_text()
    assert text.startswith("# Generated from _k.pyx.tp by setup.py")
    assert "cdef struct Buffers_f32:\n    float* data" in text
    assert "cdef struct Buffers_f64:\n    double* data" in text
    os.utime(target, (1, 1))
    setup_module.generate_from_templates(str(tmp_path))   # unchanged: not touched
    assert target.stat().st_mtime == 1
    (tmp_path / "_k.pyx.tp").write_text(TEMPLATE.replace("data", "values"))
    setup_module.generate_from_templates(str(tmp_path))
    assert "float* values" in target.read_text() and "data" not in target.read_text()


def test_a_hand_edit_stops_the_build_and_is_kept(setup_module, tmp_path):
    (tmp_path / "_k.pyx.tp").write_text(TEMPLATE)
    setup_module.generate_from_templates(str(tmp_path))
    target = tmp_path / "_k.pyx"
    edited = target.read_text() + "# a fix made here by mistake\n"
    target.write_text(edited)
    (tmp_path / "_k.pyx.tp").write_text(TEMPLATE.replace("data", "values"))
    with pytest.raises(SystemExit, match=r"_k\.pyx was edited after setup\.py wrote it"):
        setup_module.generate_from_templates(str(tmp_path))
    assert target.read_text() == edited


def test_an_earlier_rendering_is_replaced(setup_module, tmp_path):
    """A generated file from another Cython's Tempita (its text matches its
    own hash) is not an edit: written anew without a word."""
    (tmp_path / "_k.pyx.tp").write_text(TEMPLATE)
    body = "cdef struct Buffers_f32:\n  float* data\n"
    target = tmp_path / "_k.pyx"
    target.write_text(setup_module._generated_header(str(tmp_path / "_k.pyx.tp"), body) + body)
    setup_module.generate_from_templates(str(tmp_path))
    assert "    double* data" in target.read_text()


def test_every_module_of_the_micro_kernel_sets_up_numpys_c_api():
    """_microkernel.pxd's aligned_float32 allocates through numpy's C API,
    whose table is NULL until the module calls cnp.import_array(): every
    source that cimports the .pxd must call it (a crash otherwise)."""
    package = SETUP.parent / "fastrnn"
    # the templates, and the .pyx files written by hand (not those setup.py renders)
    sources = sorted(package.glob("*.pyx.tp")) + [
        s for s in sorted(package.glob("*.pyx")) if not (package / (s.name + ".tp")).exists()]
    users = [s for s in sources if "from fastrnn._microkernel cimport" in s.read_text()]
    assert users, "no module cimports _microkernel.pxd"
    missing = [s.name for s in users if "\ncnp.import_array()" not in s.read_text()]
    assert not missing, f"these cimport _microkernel.pxd without cnp.import_array(): {missing}"
