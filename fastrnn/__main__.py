"""The ``fastrnn`` command (also ``python -m fastrnn`` outside the source tree).

``fastrnn --help`` lists the commands; ``fastrnn <command> --help`` shows a
command's options. :func:`cli` returns the exit status (0 done, 2 a usage
error) rather than exiting, so it can be called from Python.
"""
import argparse
import os
import platform
import signal
import sys
import time

import numpy as np

import fastrnn

# (name, one-line description, module and function that runs it with the rest of argv;
# module None: this one)
COMMANDS = [
    ("demo", "example 1 with its default options (the same as 'sunspots')",
     "fastrnn.examples.sunspots", "demo_cli"),
    ("sunspots", "example 1: a Keras sunspot model (two SimpleRNN(50)) in fastrnn",
     "fastrnn.examples.sunspots", "cli"),
    ("adding", "example 2: the adding problem, RNN vs GRU vs LSTM",
     "fastrnn.examples.adding_problem", "cli"),
    ("charlm", "example 3: a character-level GRU language model on Hamlet",
     "fastrnn.examples.char_lm", "cli"),
    ("layernorm", "example 4: the adding problem, LSTM with and without layer_norm",
     "fastrnn.examples.layer_norm", "cli"),
    ("regularise", "example 5: an overfitting LSTM with and without dropouts, zoneout, "
     "DropConnect", "fastrnn.examples.regularisation", "cli"),
    ("timing", "time a forward pass of each layer on random data (a few seconds)",
     None, "timing"),
    ("bench", "compare fastrnn with PyTorch, ONNX Runtime and TensorFlow",
     "fastrnn.bench", "main"),
]

USAGE = "usage: fastrnn [-h] [--version] <command> [options]"


def help_text():
    width = max(len(name) for name, *_ in COMMANDS) + 2
    commands = "\n".join(f"  {name:<{width}}{description}" for name, description, *_ in COMMANDS)
    return f"""{USAGE}

Fast CPU RNN, GRU and LSTM layers with PyTorch semantics: the examples, a
timing of the layers, and the benchmark against the peer libraries.

commands:
{commands}

options:
  -h, --help  show this help and exit
  --version   show fastrnn's version and the kernel build in use, and exit

'fastrnn <command> --help' shows a command's options. With no command,
fastrnn prints this help to stderr and exits with status 2, as for an
unknown command or option: a usage error, so a script whose command is
missing fails instead of passing without doing anything.
"""


def version_text():
    from fastrnn._kernels import SIMD
    return f"fastrnn {fastrnn.__version__} ({SIMD} kernels)"


def median_ms(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def timing(argv=None):
    T, B, D, H = 100, 32, 64, 128
    parser = argparse.ArgumentParser(
        prog="fastrnn timing",
        description=f"Median time of a forward pass of RNN, GRU, LSTM and a 2-layer "
                    f"bidirectional LSTM over T={T} steps, batch B={B}, input D={D}, "
                    f"hidden H={H}, float32, on random data (20 calls each), and of one "
                    f"batch-1 LSTMCell(16, 32) step (2000 calls). For the comparison "
                    f"with other libraries see 'fastrnn bench'.")
    parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, D)).astype(np.float32)
    print(f"{version_text()} on {platform.machine()}, Python {platform.python_version()}")
    print(f"forward of one layer over T={T} steps, batch B={B}, input D={D}, hidden H={H}, "
          f"float32")
    for layer in (fastrnn.RNN(D, H, seed=0), fastrnn.GRU(D, H, seed=0),
                  fastrnn.LSTM(D, H, seed=0),
                  fastrnn.LSTM(D, H, num_layers=2, bidirectional=True, seed=0)):
        ms = median_ms(lambda: layer(x), repeats=20)
        print(f"  {repr(layer):<50} {ms:8.3f} ms")
    cell = fastrnn.LSTMCell(16, 32, seed=0)
    frame = rng.standard_normal(16).astype(np.float32)
    state = cell(frame)
    us = 1e3 * median_ms(lambda: cell(frame, state), repeats=2000)
    print(f"  {repr(cell) + ', one step, batch 1':<50} {us:8.1f} us")


def _exit_status(code):
    """The status a ``SystemExit(code)`` would give the shell."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def cli(argv=None):
    """Run ``fastrnn`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    import importlib

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(help_text(), end="", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help"):
        print(help_text(), end="")
        return 0
    if name == "--version":
        print(version_text())
        return 0
    commands = {command: (module, function) for command, _, module, function in COMMANDS}
    if name not in commands:
        kind = "option" if name.startswith("-") else "command"
        print(f"fastrnn: unknown {kind} '{name}'\n\n{help_text()}", end="", file=sys.stderr)
        return 2
    module, function = commands[name]
    run = getattr(importlib.import_module(module), function) if module else globals()[function]
    try:
        return _exit_status(run(rest))
    except SystemExit as exit:  # a command's argparse: --help (0) or a usage error (2)
        return _exit_status(exit.code)
    except MemoryError as exc:
        # options each within their bounds can ask together for more than the
        # machine has (adding --steps 10000 --hidden 4096: 39 GiB at once)
        print(f"fastrnn {name}: error: out of memory ({exc or 'MemoryError'}); these options "
              f"need more memory than this machine has: try smaller sizes", file=sys.stderr)
        return 1


def run_command():
    """The ``fastrnn`` command: :func:`cli` with ``sys.argv``, its status the
    process's. Ctrl-C ends it with one line, not a traceback, and by SIGINT
    itself, as Python ends (so a shell loop around it stops too); output cut
    short by a closed pipe (``fastrnn bench | head``) ends it quietly."""
    try:
        return cli()
    except KeyboardInterrupt:
        print("fastrnn: interrupted", file=sys.stderr)
        if os.name == "posix":
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        return 130
    except BrokenPipeError:
        # the reader is gone: no more output, and none at exit (Python's
        # flush of stdout would raise again)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(run_command())
