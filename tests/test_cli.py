"""The ``fastrnn`` command line: help, version, usage errors and every
subcommand's own ``--help``. Nothing here trains a model or runs a benchmark:
the heavy entry points are replaced by a function that fails the test."""
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import fastrnn
from fastrnn import __main__ as cli_module
from fastrnn import bench
from fastrnn._kernels import SIMD
from fastrnn.__main__ import cli
from fastrnn.examples import adding_problem, char_lm, layer_norm, regularisation, sunspots

COMMANDS = ["demo", "sunspots", "adding", "charlm", "layernorm", "regularise", "timing", "bench"]


def _heavy(*args, **kwargs):
    raise AssertionError("the command line ran heavy work (training, timing or a benchmark)")


@pytest.fixture(autouse=True)
def no_heavy_work(monkeypatch):
    for module in (sunspots, adding_problem, char_lm, layer_norm, regularisation):
        monkeypatch.setattr(module, "main", _heavy)
    monkeypatch.setattr(bench, "run_case", _heavy)
    monkeypatch.setattr(bench, "available", lambda name: False)  # no peer imports
    monkeypatch.setattr(cli_module, "median_ms", _heavy)


def run(argv, capsys):
    """Exit status, stdout and stderr of ``fastrnn *argv`` in this process."""
    try:
        status = cli(argv)
    except SystemExit as exit:
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def _commands_listed(text):
    """Each command on its own line of the command list, with a description."""
    return all(re.search(rf"^  {name}\s+\w", text, re.M) for name in COMMANDS)


# --- the top level -----------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_is_a_usage_text(capsys, flag):
    status, out, err = run([flag], capsys)
    assert status == 0 and err == ""
    assert out.startswith("usage: fastrnn ")
    assert _commands_listed(out)
    assert re.search(r"^  -h, --help\s+\w", out, re.M)
    assert re.search(r"^  --version\s+\w", out, re.M)
    assert "``" not in out                    # no raw reStructuredText
    assert "exits with status 2" in out       # the no-command behaviour is documented


def test_no_command_prints_the_help_and_exits_2(capsys):
    status, out, err = run([], capsys)
    assert status == 2 and out == ""
    assert err.startswith("usage: fastrnn ") and _commands_listed(err)


def test_unknown_command(capsys):
    status, out, err = run(["xyz"], capsys)
    assert status == 2 and out == ""
    assert err.startswith("fastrnn: unknown command 'xyz'\n")
    assert _commands_listed(err)


def test_unknown_top_level_option(capsys):
    status, out, err = run(["--nosuch"], capsys)
    assert status == 2 and out == ""
    assert err.startswith("fastrnn: unknown option '--nosuch'\n")


def test_version(capsys):
    status, out, err = run(["--version"], capsys)
    assert status == 0 and err == ""
    assert out == f"fastrnn {fastrnn.__version__} ({SIMD} kernels)\n"


# --- every subcommand --------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_its_own_help(capsys, command, flag):
    status, out, err = run([command, flag], capsys)
    assert status == 0 and err == ""
    assert out.startswith("usage: ")
    assert "-h, --help" in out


@pytest.mark.parametrize("command", ["timing", "bench", "sunspots", "adding", "charlm",
                                     "layernorm", "regularise", "demo"])
def test_help_names_the_command(capsys, command):
    _, out, _ = run([command, "--help"], capsys)
    assert out.startswith(f"usage: fastrnn {command} ")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_rejects_an_unknown_option(capsys, command):
    status, out, err = run([command, "--nosuch"], capsys)
    assert status == 2 and out == ""
    assert "unrecognized arguments: --nosuch" in err


# --- fastrnn bench -----------------------------------------------------------------
def test_bench_help_describes_every_option_and_lists_the_cases(capsys):
    _, out, _ = run(["bench", "--help"], capsys)
    assert "python -m fastrnn.bench" not in out
    for option in ("--threads", "--dtype", "--quick", "--cases", "--repeats", "--rounds"):
        # the option's line carries a description (after the metavar, if any)
        assert re.search(rf"^  {option}(?: \S+)?\s{{2,}}\w", out, re.M), option
    for case in bench.CASES:
        line = next((ln for ln in out.splitlines() if ln.split()[:1] == [case.name]), None)
        assert line is not None, case.name
        for part in (case.cell, f"T={case.T}", f"B={case.B}", f"D={case.D}", f"H={case.H}"):
            assert part in line.split(), (case.name, part)


@pytest.mark.parametrize("cases", ["nosuch", "b32-h128,nosuch"])
def test_bench_unknown_case_is_an_error(capsys, cases):
    status, out, err = run(["bench", "--cases", cases], capsys)
    assert status == 2 and out == ""
    assert "unknown case 'nosuch'" in err
    assert all(case.name in err for case in bench.CASES)


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--threads", "65"],
                                  ["--threads", "99999999999999999999"],   # (was a traceback)
                                  ["--repeats", "0"], ["--rounds", "0"],
                                  ["--rounds", "two"], ["--cases", ""],
                                  # (10**30 ran for ever, 10**400 ended in a traceback)
                                  ["--repeats", str(10**30)], ["--repeats", str(10**400)],
                                  ["--rounds", str(10**30)],
                                  ["--quick", "--cases", "b32-h128"],
                                  ["--dtype", "float16"]])
def test_bench_rejects_bad_options(capsys, argv):
    status, out, err = run(["bench"] + argv, capsys)
    assert status == 2 and out == ""
    assert err.startswith("usage: fastrnn bench ")


# --- the installed console script ------------------------------------------------------
def _console_script():
    script = Path(sys.executable).with_name("fastrnn")
    if not script.exists():
        pytest.skip("the fastrnn console script is not installed beside this Python")
    return str(script)


def test_console_script_usage_errors_and_version(tmp_path):
    script = _console_script()
    alone = subprocess.run([script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert alone.returncode == 2 and alone.stdout == ""
    assert alone.stderr.startswith("usage: fastrnn ")
    unknown = subprocess.run([script, "xyz"], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path)
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("fastrnn: unknown command 'xyz'")
    version = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path)
    assert version.returncode == 0
    assert version.stdout.startswith(f"fastrnn {fastrnn.__version__} ")


def test_python_m_fastrnn_bench_help_names_itself(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastrnn.bench", "--help"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout.startswith("usage: python -m fastrnn.bench ")


@pytest.mark.parametrize("command,argv,message", [
    ("adding", ["--steps", "1"], "--steps: expected an integer from 2 to 10000, got '1'"),
    ("adding", ["--hidden", "0"], "--hidden: expected an integer from 1 to 4096, got '0'"),
    # sizes that would end in a MemoryError deep in the run
    ("adding", ["--hidden", "100000000"], "--hidden: expected an integer from 1 to 4096"),
    ("adding", ["--steps", "1000000000"], "--steps: expected an integer from 2 to 10000"),
    ("charlm", ["--hidden", "100000000"], "--hidden: expected an integer from 1 to 4096"),
    ("layernorm", ["--hidden", "100000000"], "--hidden: expected an integer from 1 to 4096"),
    ("regularise", ["--train", "1000000000000"], "--train: expected an integer from 1 to "
                                                 "1000000"),
    ("regularise", ["--noise", "1e200"], "--noise: expected a number in [0.0, 1000000.0)"),
    # a plot matplotlib would refuse, or a file that cannot be written, after the run
    ("layernorm", ["--kinds", "LSTM,lstm"], "--kinds: expected distinct kinds, got 'LSTM,lstm'"),
    ("sunspots", ["--plot", "loss.xyz"], "--plot: expected a file name ending in one of .eps"),
    ("sunspots", ["--plot", "noext"], "--plot: expected a file name ending in one of .eps"),
    ("sunspots", ["--plot", "/proc/loss.png"], "--plot: cannot write '/proc/loss.png'"),
    ("adding", ["--epochs", "x"], "--epochs: expected an integer from 1 to 100000, got 'x'"),
    ("adding", ["--seed", "-1"], "--seed: expected an integer >= 0, got '-1'"),
    ("charlm", ["--hidden", "-5"], "--hidden: expected an integer from 1 to 4096, got '-5'"),
    ("charlm", ["--epochs", "0"], "--epochs: expected an integer from 1 to 100000, got '0'"),
    ("sunspots", ["--epochs", "1.5"], "--epochs: expected an integer from 1 to 100000, got '1.5'"),
    ("sunspots", ["--seed", "-2"], "--seed: expected an integer >= 0, got '-2'"),
    ("layernorm", ["--steps", "0"], "--steps: expected an integer from 2 to 10000, got '0'"),
    ("layernorm", ["--epochs", "-1"], "--epochs: expected an integer from 1 to 100000, got '-1'"),
    ("layernorm", ["--seeds", "0,a"], "--seeds: expected comma-separated integers >= 0, "
                                      "got '0,a'"),
    ("regularise", ["--seeds", "0,1,0"], "--seeds: expected distinct seeds, got '0,1,0' "
                                         "(repeats 0)"),
    ("layernorm", ["--kinds", "RNN"], "--kinds: expected LSTM and/or GRU, got 'RNN'"),
    # a mistyped --epochs trained for ever
    ("sunspots", ["--epochs", str(10**30)], "--epochs: expected an integer from 1 to 100000"),
    ("regularise", ["--epochs", "100001"], "--epochs: expected an integer from 1 to 100000"),
])
def test_an_example_refuses_a_bad_option_by_name(command, argv, message, capsys):
    """A usage error (exit status 2) naming the option, before any work."""
    status, out, err = run([command, *argv], capsys)
    assert status == 2 and out == ""
    assert err.startswith(f"usage: fastrnn {command} ")
    assert message in err, err


def test_sizes_that_do_not_fit_in_memory_together_end_in_an_error_not_a_traceback(
        capsys, monkeypatch):
    """Each within its bounds, --steps 10000 --hidden 4096 ask numpy for 39
    GiB at once: the MemoryError ended the command in a traceback; now an
    error naming the cause, exit status 1. (The allocation is simulated: a
    machine with that much memory would run it.)"""
    def too_big(*args, **kwargs):
        raise MemoryError("Unable to allocate 39.1 GiB for an array with shape "
                          "(256, 10000, 4096) and data type float32")
    monkeypatch.setattr(adding_problem, "main", too_big)
    status, out, err = run(["adding", "--steps", "10000", "--hidden", "4096"], capsys)
    assert status == 1 and out == ""
    assert err.startswith("fastrnn adding: error: out of memory (Unable to allocate 39.1 GiB")
    assert "try smaller sizes" in err


def test_a_pgf_plot_without_its_tex_program_is_refused_before_the_run(capsys, monkeypatch):
    """[failed before] --plot loss.pgf passed the check, then matplotlib's PGF
    backend raised at the end of the run for want of xelatex."""
    pytest.importorskip("matplotlib")
    from fastrnn.examples import _cli
    monkeypatch.setattr(_cli.shutil, "which", lambda program: None)
    status, out, err = run(["sunspots", "--plot", "loss.pgf"], capsys)
    assert status == 2 and out == ""
    assert "--plot: a .pgf plot needs xelatex (matplotlib's pgf.texsystem), which is not " \
           "installed here" in err, err


def test_a_bad_fastrnn_simd_says_so_at_import(tmp_path):
    """It said the compiled kernels were missing (and how to build them),
    the real reason only in the chained exception. (Run from elsewhere: in
    the source tree, the unbuilt sources would be imported.)"""
    done = subprocess.run([sys.executable, "-c", "import fastrnn"], capture_output=True,
                          text=True, env={**os.environ, "FASTRNN_SIMD": "bogus"},
                          cwd=tmp_path)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last == ("ImportError: fastrnn: FASTRNN_SIMD must be 'auto', 'baseline', 'avx2' or "
                    "'avx512', got 'bogus'"), done.stderr


def test_a_forced_build_this_installation_lacks_says_so(monkeypatch):
    """[failed before] FASTRNN_INT8=vnni where no vnni module was built (a
    wheel for another CPU family) fell back to the portable build without a
    word; FASTRNN_SIMD=avx512 said the compiled kernels were missing and how
    to build them. Both now name the variable and the build. Unforced, the
    widest build present is taken (int8 fell back to the portable one past
    a missing AMX build, not to the AVX-512 one), and a build that fails to
    load is passed over. With the portable build missing too the sources
    are unbuilt: that error goes on."""
    import importlib

    from fastrnn import _kernels
    from fastrnn import quantized as Q
    real = importlib.import_module
    missing = set()

    def import_module(name, *args):
        if name in missing:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args)
    monkeypatch.setattr(importlib, "import_module", import_module)
    missing.update({"fastrnn._forward_avx512", "fastrnn._quant_vnni", "fastrnn._quant_amx"})
    for variable, build, load in (("FASTRNN_SIMD", "avx512", _kernels._load),
                                  ("FASTRNN_INT8", "vnni", Q._load_int8)):
        if not (_kernels.cpu_supports(build) if variable == "FASTRNN_SIMD"
                else Q._int8_cpu_supports(build)):
            continue   # (refused for the CPU first)
        monkeypatch.setenv(variable, build)
        with pytest.raises(ImportError, match=rf"^fastrnn: {variable}={build}, but this "
                                              rf"installation has no {build} build of the "
                                              rf"kernels"):
            load()
        monkeypatch.delenv(variable)
    monkeypatch.delenv("FASTRNN_INT8", raising=False)
    if _kernels.SIMD == "avx512" and Q._int8_cpu_supports("amx"):
        module, build = Q._load_int8()
        want = "bf16" if Q._int8_cpu_supports("bf16") else "avx512"
        assert build == want and module.__name__ == "fastrnn._quant_" + want
    # unforced, a build present that fails to load (an undefined symbol) is
    # passed over (it made `import fastrnn` fail) for the next one
    if _kernels.SIMD == "avx512":
        missing.add("fastrnn._quant_bf16")     # (amx, vnni: above)

        def broken(name, *args):
            if name == "fastrnn._quant_avx512":
                raise ImportError("_quant_avx512.so: undefined symbol: __foo")
            return import_module(name, *args)
        monkeypatch.setattr(importlib, "import_module", broken)
        assert Q._load_int8()[1] == "avx2"
    missing.add("fastrnn._forward")
    monkeypatch.setenv("FASTRNN_SIMD", "baseline")
    with pytest.raises(ModuleNotFoundError, match="fastrnn._forward"):
        _kernels._load()


def test_an_empty_or_padded_build_variable_is_read_as_written(tmp_path):
    # an env file's "FASTRNN_SIMD=" (set but empty) or " avx2 " made the import
    # fail, where an empty FASTRNN_NUM_THREADS counts as unset
    script = ("import fastrnn, fastrnn.quantized as q; "
              "print(fastrnn._kernels.SIMD, q.INT8_SIMD)")
    auto = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, check=True).stdout
    env = {**os.environ, "FASTRNN_SIMD": "", "FASTRNN_INT8": ""}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout == auto, done.stderr
    env = {**os.environ, "FASTRNN_SIMD": " baseline ", "FASTRNN_INT8": " Baseline"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.split() == ["baseline", "baseline"], done.stderr


def test_a_plot_path_through_a_dangling_link_keeps_the_link(tmp_path):
    """The check that a plot can be written created the file through a
    dangling symbolic link, then removed the link itself (not the file it
    made): the plot became a file of its own and an empty target was left.
    Now it probes the link's target, and both stay as they were."""
    from fastrnn.examples._cli import writable_path
    link, target = tmp_path / "loss.png", tmp_path / "plots" / "run.png"
    target.parent.mkdir()
    os.symlink(target, link)
    assert writable_path(str(link)) == str(link)
    assert os.path.islink(link) and not target.exists()
    plain = tmp_path / "plain.png"
    assert writable_path(str(plain)) == str(plain) and not plain.exists()


def test_a_plot_path_that_is_not_a_regular_file_is_refused_before_the_run(tmp_path, capsys):
    """--plot naming a FIFO hung the check (opening it waited for a reader);
    /dev/full (a device) passed it and failed after the run."""
    fifo = tmp_path / "loss.png"
    os.mkfifo(fifo)
    # (a reader after 10 s lets a check that opens the FIFO go on, to fail
    # below, rather than hang)
    watchdog = threading.Timer(10, lambda: os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)))
    watchdog.start()
    try:
        status, out, err = run(["sunspots", "--plot", str(fifo)], capsys)
    finally:
        watchdog.cancel()
    assert status == 2 and out == ""
    assert f"--plot: {str(fifo)!r} is not a regular file" in err
    if os.path.exists("/dev/full"):
        link = tmp_path / "full.png"
        link.symlink_to("/dev/full")
        status, out, err = run(["sunspots", "--plot", str(link)], capsys)
        assert status == 2 and "is not a regular file" in err


def test_a_plot_that_cannot_be_written_after_the_run_is_an_error_not_a_traceback(
        tmp_path, capsys, monkeypatch):
    """A failure to write the plot once the run is done (a full disk, a
    directory removed meanwhile) ended in matplotlib's traceback. Only the
    plot's own failure is reported so."""
    def full_disk(history, path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(sunspots, "main", lambda epochs, plot, seed: (None, 0.0, 0.0))
    monkeypatch.setattr(sunspots, "_save_plot", full_disk)
    path = str(tmp_path / "loss.png")
    status, out, err = run(["sunspots", "--epochs", "1", "--plot", path], capsys)
    assert (status, out) == (1, "")
    assert err == (f"fastrnn sunspots: error: cannot write the loss plot {path!r}: "
                   f"No space left on device\n")

    def pipe_closed(epochs, plot, seed):    # (an OSError of the run, not of the plot)
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(sunspots, "main", pipe_closed)
    with pytest.raises(BrokenPipeError):
        cli(["sunspots", "--epochs", "1", "--plot", path])


@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT")
def test_ctrl_c_ends_the_command_by_sigint_with_one_line_and_no_traceback(tmp_path):
    """Ctrl-C printed a 37-line KeyboardInterrupt traceback. The command now
    says it was interrupted and ends by SIGINT itself, as Python does (so
    that a shell loop around it stops too: a status of 130 would not)."""
    command = subprocess.Popen(
        [sys.executable, "-m", "fastrnn", "adding", "--epochs", "1000"], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert command.stdout.readline().startswith("adding problem")   # training begun
        command.send_signal(signal.SIGINT)
        out, err = command.communicate(timeout=60)
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()
    assert command.returncode == -signal.SIGINT
    assert err == "fastrnn: interrupted\n"


def test_output_cut_short_by_a_closed_pipe_ends_the_command_quietly(tmp_path):
    """`fastrnn bench | head -1`: the reader gone, printing raised
    BrokenPipeError, a traceback (and another at exit, flushing stdout)."""
    code = ("import sys\n"
            "from fastrnn import __main__ as main\n"
            "def cli():\n"
            "    while True:\n"
            "        print('a line of a long table' * 10)\n"
            "main.cli = cli\n"
            "sys.exit(main.run_command())\n")
    reader = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader.stdout.read(100)
    reader.stdout.close()            # as head does after its first line
    err = reader.stderr.read()
    assert reader.wait(timeout=60) == 1
    assert err == b""
