"""What every command line of the engine shares: a bad input ends with one line on stderr and exit code 2.

``ArgumentParser`` reports a bad flag or choice as ``error: ...`` on one line (argparse prints the usage block
first); ``fail`` prints one line and returns 2, for ``return fail(...)`` at the end of a ``main``.
"""
import argparse
import os
import sys

BAD_INPUT = 2


def fail(message):
    """Print ``error: message`` as one line on stderr; returns the bad-input exit code."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    return BAD_INPUT


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")
        sys.exit(BAD_INPUT)


def positive_int(text):
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def missing_folders(path):
    """``path`` and those of its parents that do not exist yet, deepest first: what creating it will add, to be
    removed again (while empty) when the command fails."""
    missing, p = [], os.path.abspath(path)
    while not os.path.lexists(p) and os.path.dirname(p) != p:
        missing.append(p)
        p = os.path.dirname(p)
    return missing


def remove_empty(folders):
    """Remove the folders, deepest first, as long as they are empty (a failed command leaves no empty folder)."""
    for f in folders:
        try:
            os.rmdir(f)
        except OSError:
            return
