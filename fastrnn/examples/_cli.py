"""Argument types of the examples' command lines: a bad value is an argparse
error naming the option (exit status 2), never a traceback from deep inside
the run."""
import argparse
import os


def int_at_least(minimum):
    """An int >= minimum."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    return parse


positive_int = int_at_least(1)
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
        return tuple(seed(part.strip()) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= 0, got {text!r}") from None


def writable_path(text):
    """A file path whose directory exists ('' for none), checked before the
    run rather than when its result is saved."""
    directory = os.path.dirname(text) or "."
    if text and not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"the directory {directory!r} does not exist")
    if text and os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file path")
    return text
