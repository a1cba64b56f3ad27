"""The wheel: built from a clean copy of the repository, installed where no
compiler can run, and used from there.

``test_kernel_builds`` runs the check below (``SMOKE``) against the fastrnn
this interpreter imports (the source tree's build, an installed package, or the
wheel under cibuildwheel), once per kernel build present and once as chosen
for this CPU: each build the CPU can run loads, and its forward and backward
passes of every layer kind match the float64 reference.

``test_wheel`` builds the sdist and the wheel of the committed tree (HEAD, via
``git archive``) with ``python -m build --no-isolation``, checks what each
carries, installs the wheel into a new virtual environment with ``CC=false
CXX=false`` and no package index (numpy, scipy and threadpoolctl are linked in
from this environment, so the new one sees them and nothing else), and runs
``fastrnn --version``, the same check of every kernel build and ``fastrnn
demo`` there. It takes about a minute on 2 cores and needs the ``wheel`` extra
(``pip install ".[wheel]"``: the build frontend and the build requirements);
without it the test is skipped, and ``-m "not wheel"`` leaves it out.
"""
import email.parser
import importlib.machinery
import importlib.metadata
import io
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent

# Run in a fresh interpreter with the tests folder as its argument (and the
# folder to import fastrnn from, if not the environment's): imports fastrnn,
# checks each layer kind against tests/reference.py (forward in
# float64 and float32; the gradient of the input by central differences in
# float64), and prints what it ran as one line of JSON.
SMOKE = r'''
import json
import sys

import numpy as np

sys.path.insert(0, sys.argv[1])
import reference  # noqa: E402

if len(sys.argv) > 2:
    sys.path.insert(0, sys.argv[2])

import fastrnn  # noqa: E402
from fastrnn import _kernels  # noqa: E402

T, B, D, H = 6, 3, 4, 5
LENGTHS = [6, 2, 5]
LAYERS = {
    "rnn_tanh": lambda dtype: fastrnn.RNN(D, H, bidirectional=True, dtype=dtype, seed=1),
    "rnn_relu": lambda dtype: fastrnn.RNN(D, H, nonlinearity="relu", bidirectional=True,
                                          dtype=dtype, seed=2),
    "gru": lambda dtype: fastrnn.GRU(D, H, bidirectional=True, dtype=dtype, seed=3),
    "gru_reset_before": lambda dtype: fastrnn.GRU(D, H, bidirectional=True, dtype=dtype,
                                                  seed=4, reset_after=False),
    "lstm": lambda dtype: fastrnn.LSTM(D, H, bidirectional=True, dtype=dtype, seed=5),
}


def max_error(got, ref):
    scale = max(1.0, float(np.abs(ref).max()))
    return float(np.abs(np.asarray(got, np.float64) - ref).max()) / scale


rng = np.random.default_rng(0)
errors = {}
for dtype, tol in (("float64", 1e-12), ("float32", 1e-5)):
    for kind, make in LAYERS.items():
        layer = make(dtype)
        x = rng.standard_normal((T, B, D)).astype(dtype)
        h0 = (0.5 * rng.standard_normal((2, B, H))).astype(dtype)
        c0 = (0.5 * rng.standard_normal((2, B, H))).astype(dtype)
        hx = (h0, c0) if kind == "lstm" else h0
        out, state = layer(x, hx, lengths=LENGTHS)
        ref_out, ref_h, ref_c = reference.layer_forward(
            kind, layer.state_dict(), x, h0, c0 if kind == "lstm" else None,
            bidirectional=True, lengths=LENGTHS)
        got = [out] + (list(state) if kind == "lstm" else [state])
        ref = [ref_out, ref_h] + ([ref_c] if kind == "lstm" else [])
        for g, r in zip(got, ref):
            assert g.dtype == np.dtype(dtype), (kind, dtype, g.dtype)
            err = max_error(g, r)
            assert err <= tol, f"{kind} {dtype}: forward error {err:.3g} > {tol:g}"
            errors[f"{kind} {dtype}"] = max(err, errors.get(f"{kind} {dtype}", 0.0))
        if dtype == "float64":
            dout = rng.standard_normal(out.shape)
            _, backprop = layer.forward_train(x, hx, lengths=LENGTHS)
            dx = backprop(dout)[0]
            numeric = reference.numeric_grad(
                lambda: float(np.sum(layer(x, hx, lengths=LENGTHS)[0] * dout)), x)
            err = max_error(dx, numeric)
            assert err <= 1e-6, f"{kind}: input gradient error {err:.3g} > 1e-6"
print(json.dumps({"file": fastrnn.__file__, "version": fastrnn.__version__,
                  "simd": _kernels.SIMD, "worst_forward_error": max(errors.values())}))
'''


def kernel_builds(names):
    """The kernel builds among the file names of a package folder or a wheel:
    'baseline' and the <build> of each _forward_<build> extension module."""
    suffixes = sorted(importlib.machinery.EXTENSION_SUFFIXES, key=len, reverse=True)
    builds = {"baseline"}
    for name in names:
        base = name.rsplit("/", 1)[-1]
        suffix = next((s for s in suffixes if base.endswith(s)), None)
        if suffix and base.startswith("_forward_"):
            builds.add(base[len("_forward_"):-len(suffix)])
    return sorted(builds)


def clean_env(**extra):
    """The environment of a subprocess: none of this process's Python, pip or
    fastrnn settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "PIP_", "FASTRNN_", "VIRTUAL_ENV"))}
    env.update(extra)
    return env


def check_builds(python, builds, cwd, env, package):
    """Run SMOKE under each kernel build and as chosen for this CPU ('auto'),
    importing fastrnn from folder ``package`` (or the environment's, if None).
    Returns {build: what SMOKE printed, or None where this CPU lacks the
    build's instructions}."""
    results = {}
    for build in ["auto"] + builds:
        where = [] if package is None else [str(pathlib.Path(package).parent)]
        proc = subprocess.run([python, "-c", SMOKE, str(TESTS)] + where, cwd=cwd,
                              capture_output=True, text=True, timeout=600,
                              env={**env, "FASTRNN_SIMD": build})
        if (proc.returncode != 0 and build not in ("auto", "baseline")
                and "this CPU lacks" in proc.stderr):
            results[build] = None
            continue
        assert proc.returncode == 0, f"FASTRNN_SIMD={build}:\n{proc.stdout}\n{proc.stderr}"
        results[build] = json.loads(proc.stdout.strip().splitlines()[-1])
        if package is not None:
            assert pathlib.Path(results[build]["file"]).parent == pathlib.Path(package)
        if build != "auto":
            assert results[build]["simd"] == build
    runnable = [b for b in builds if results[b] is not None]
    assert results["auto"]["simd"] in runnable
    if runnable != ["baseline"]:
        assert results["auto"]["simd"] != "baseline", results
    return results


def test_kernel_builds(tmp_path):
    import fastrnn
    package = pathlib.Path(fastrnn.__file__).parent
    builds = kernel_builds(p.name for p in package.iterdir())
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "avx2" in builds, f"no AVX2 build of the kernels beside {package}"
    check_builds(sys.executable, builds, tmp_path, clean_env(), package)


# --- the wheel ---

def _pyproject():
    try:
        import tomllib
    except ImportError:                     # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _source_tree_or_skip():
    if not (ROOT / "setup.py").is_file() or not (ROOT / "pyproject.toml").is_file():
        pytest.skip("not in a source tree of fastrnn")


def test_wheel_extra_has_the_build_requirements():
    """The 'wheel' extra brings every build requirement (test_wheel builds
    without isolation, in this environment)."""
    _source_tree_or_skip()
    from packaging.requirements import Requirement
    pyproject = _pyproject()
    extra = {str(Requirement(r)) for r in pyproject["project"]["optional-dependencies"]["wheel"]}
    needed = {str(Requirement(r)) for r in pyproject["build-system"]["requires"]}
    assert needed <= extra, f"missing from the 'wheel' extra: {sorted(needed - extra)}"


def _missing_build_requirements():
    from packaging.requirements import Requirement
    missing = []
    for text in _pyproject()["build-system"]["requires"]:
        requirement = Requirement(text)
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            version = None
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            missing.append(text)
    return missing


def _clean_copy(dest):
    """The committed tree (HEAD) in dest, or, outside a git checkout (an
    unpacked sdist), a copy of this tree without build products."""
    prefix = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--show-prefix"],
                            capture_output=True, text=True) if shutil.which("git") else None
    if prefix is not None and prefix.returncode == 0:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "HEAD"],
                                 capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:
                tar.extractall(dest)
        return dest / prefix.stdout.strip()
    src = dest / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
        ".hypothesis", ".asv", "*.so", "*.pyd", "*.o", "*.c"))
    return src


def _link_requirements(wheel, target):
    """Symlink into target the distributions the wheel requires (and theirs),
    as installed in this environment. Returns their names."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    with zipfile.ZipFile(wheel) as zf:
        metadata = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        message = email.parser.Parser().parsestr(zf.read(metadata).decode("utf-8"))
    todo = [Requirement(r) for r in message.get_all("Requires-Dist") or []]
    linked = set()
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name in linked:
            continue
        dist = importlib.metadata.distribution(requirement.name)
        assert requirement.specifier.contains(dist.version, prereleases=True), (
            f"the wheel requires {requirement}, this environment has {dist.version}")
        assert dist.files, f"{requirement.name} lists no files"
        site = pathlib.Path(dist.locate_file(""))
        for top in {pathlib.PurePath(f).parts[0] for f in dist.files}:
            if top not in ("..", "__pycache__") and not (target / top).exists():
                (target / top).symlink_to(site / top)
        linked.add(name)
        todo.extend(Requirement(r) for r in dist.requires or [])
    return sorted(linked)


@pytest.mark.wheel
def test_wheel(tmp_path):
    _source_tree_or_skip()
    # the frontend's distribution, not its name: a source tree built in place
    # has a build/ directory that imports as an empty namespace package
    try:
        importlib.metadata.version("build")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("needs the 'wheel' extra: pip install '.[wheel]'")
    missing = _missing_build_requirements()
    if missing:
        pytest.skip(f"needs the build requirements {missing}: pip install '.[wheel]'")

    src = _clean_copy(tmp_path / "tree")
    expected_sdist = {p.relative_to(src).as_posix() for p in src.rglob("*")
                      if p.is_file() and p.relative_to(src).parts[0] in ("fastrnn", "tests")}
    expected_sdist |= {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in"}
    # the kernel modules: their .pyx, or the Tempita template setup.py writes it from
    pyx = sorted({p.name.split(".")[0] for p in (src / "fastrnn").glob("*.pyx")}
                 | {p.name.split(".")[0] for p in (src / "fastrnn").glob("*.pyx.tp")})
    modules = sorted(p.relative_to(src).as_posix() for p in (src / "fastrnn").rglob("*.py"))
    data = sorted(p.relative_to(src).as_posix() for p in (src / "fastrnn" / "data").iterdir())

    # the sdist, then the wheel from it; build_ext compiles the modules in parallel
    dist = tmp_path / "dist"
    config = tmp_path / "build_ext.cfg"
    config.write_text(f"[build_ext]\nparallel = {max(2, os.cpu_count() or 1)}\n")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir",
                           str(dist), str(src)], capture_output=True, text=True, timeout=1200,
                          env=clean_env(DIST_EXTRA_CONFIG=str(config)))
    build_seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")

    # the sdist: everything a build needs, no build product
    with tarfile.open(sdist) as tar:
        in_sdist = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}
    assert expected_sdist <= in_sdist, f"missing from the sdist: {sorted(expected_sdist - in_sdist)}"
    assert not [n for n in in_sdist if re.search(r"\.(c|so|pyd|o|pyc)$", n)], sorted(in_sdist)

    # the wheel: the modules, every kernel build for this CPU family, the data;
    # no sources (.pyx, .pxd, .h, .c, templates: build inputs only) and no tests
    with zipfile.ZipFile(wheel) as zf:
        in_wheel = set(zf.namelist())
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    extensions = sorted(n.split("/")[-1].split(".")[0] for n in in_wheel if n.endswith(suffixes))
    x86_64 = platform.machine().lower() in ("x86_64", "amd64")
    assert extensions == [m for m in pyx if x86_64 or not re.search(r"_(avx|vnni|bf16|amx)", m)]
    assert set(modules) <= in_wheel, sorted(set(modules) - in_wheel)
    assert set(data) <= in_wheel, sorted(set(data) - in_wheel)
    assert not [n for n in in_wheel if re.search(r"\.(pyx|pxd|h|c|cpp|o|tp)$", n)
                or n.startswith("tests/")], sorted(in_wheel)
    builds = kernel_builds(in_wheel)

    # a new environment, with no compiler and no index: the wheel alone installs
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300,
                   env=clean_env())
    python = str(venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    paths = json.loads(subprocess.run(
        [python, "-c", "import json, sysconfig; print(json.dumps(sysconfig.get_paths()))"],
        check=True, capture_output=True, text=True, env=clean_env()).stdout)
    deps = tmp_path / "deps"
    deps.mkdir()
    linked = _link_requirements(wheel, deps)
    (pathlib.Path(paths["purelib"]) / "fastrnn-test-deps.pth").write_text(f"{deps}\n")
    env = clean_env(CC="false", CXX="false", PIP_CONFIG_FILE=os.devnull)
    start = time.perf_counter()
    proc = subprocess.run([python, "-m", "pip", "install", "--no-index", "--only-binary=:all:",
                           "--find-links", str(dist), "fastrnn"],
                          capture_output=True, text=True, timeout=300, env=env)
    install_seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installed = re.search(r"Successfully installed (.*)", proc.stdout).group(1).split()
    assert installed == [wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1]], proc.stdout

    # used from a folder of its own: the version, every kernel build, the demo
    work = tmp_path / "work"
    work.mkdir()
    scripts = pathlib.Path(paths["scripts"])
    proc = subprocess.run([str(scripts / "fastrnn"), "--version"], cwd=work, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"fastrnn \S+ \((\w+) kernels\)\n", proc.stdout), proc.stdout
    results = check_builds(python, builds, work, env, package=None)
    for info in results.values():
        if info:
            assert pathlib.Path(info["file"]).is_relative_to(paths["purelib"]), info["file"]
    proc = subprocess.run([str(scripts / "fastrnn"), "demo"], cwd=work, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "validation MSE" in proc.stdout, proc.stdout

    print(f"\nbuild (sdist + wheel) {build_seconds:.1f} s; sdist {sdist.stat().st_size / 1e6:.2f} MB, "
          f"wheel {wheel.stat().st_size / 1e6:.2f} MB ({wheel.name}); install {install_seconds:.1f} s "
          f"(dependencies linked: {', '.join(linked)}); kernel builds "
          f"{ {b: (i['simd'] if i else 'not on this CPU') for b, i in results.items()} }")
