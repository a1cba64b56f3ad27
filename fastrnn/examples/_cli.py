"""Argument types of the examples' command lines: a bad value is an argparse
error naming the option (exit status 2), never a traceback from deep inside
the run."""
import argparse
import os
import shutil


def int_at_least(minimum, maximum=None):
    """An int >= minimum (and <= maximum: an example's sizes are bounded so
    that a mistyped one is an error here, not a MemoryError deep in the run)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            expected = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"expected an integer {expected}, got {text!r}")
        return value
    return parse


epochs = int_at_least(1, 100_000)   # a mistyped 10**30 trained for ever
seed = int_at_least(0)   # numpy's generators take seeds >= 0


def float_in(low, high, closed_low):
    """A float in [low, high) (closed_low) or (low, high)."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
        if not ((low <= value if closed_low else low < value) and value < high):
            bracket = "[" if closed_low else "("
            raise argparse.ArgumentTypeError(
                f"expected a number in {bracket}{low}, {high}), got {text!r}")
        return value
    return parse


def seed_list(text):
    """Comma-separated seeds (integers >= 0)."""
    try:
        seeds = tuple(seed(part.strip()) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= 0, got {text!r}") from None
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:   # a seed run twice would count twice in the mean over seeds
        raise argparse.ArgumentTypeError(
            f"expected distinct seeds, got {text!r} (repeats {', '.join(map(str, repeated))})")
    return seeds


# the file formats matplotlib's savefig writes, by the name's extension
PLOT_FORMATS = ("eps", "jpeg", "jpg", "pdf", "pgf", "png", "ps", "raw", "rgba", "svg", "svgz",
                "tif", "tiff", "webp")


def _pgf_tex_program():
    """The TeX program matplotlib's PGF backend runs, or None without
    matplotlib (whose absence the plot's own check reports)."""
    try:
        import matplotlib
    except ImportError:
        return None
    return matplotlib.rcParams["pgf.texsystem"]


def writable_path(text):
    """A plot's file path ('' for none): a format matplotlib writes, named by
    its extension, in a directory where the file can be created, checked
    before the run rather than when its result is saved (by creating the
    file, removed again if it was not there)."""
    if not text:
        return text
    directory = os.path.dirname(text) or "."
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"the directory {directory!r} does not exist")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file path")
    extension = os.path.splitext(text)[1][1:].lower()
    if extension not in PLOT_FORMATS:
        raise argparse.ArgumentTypeError(
            f"expected a file name ending in one of .{', .'.join(PLOT_FORMATS)}, got {text!r}")
    if extension == "pgf":   # (matplotlib's PGF output runs a TeX program)
        tex = _pgf_tex_program()
        if tex is not None and shutil.which(tex) is None:
            raise argparse.ArgumentTypeError(f"a .pgf plot needs {tex} (matplotlib's "
                                             f"pgf.texsystem), which is not installed here")
    # the file the plot will be written to: through a symbolic link, its
    # target (the probe of a dangling link had removed the link itself)
    target = os.path.realpath(text)
    existed = os.path.exists(target)
    if existed and not os.path.isfile(target):
        # (opening a FIFO to probe it waited for a reader for ever; a device
        # such as /dev/full failed only when the plot was saved, after the run)
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular file")
    try:
        with open(target, "ab"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {exc.strerror}") from None
    if not existed:
        os.remove(target)
    return text
