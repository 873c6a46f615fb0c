"""What every command line of the engine shares: a bad input ends with one line on stderr and exit code 2.

``ArgumentParser`` reports a bad flag or choice as ``error: ...`` on one line (argparse prints the usage block
first); ``fail`` prints one line and returns 2, for ``return fail(...)`` at the end of a ``main``.
"""
import argparse
import errno
import os
import shutil
import sys
import tempfile

BAD_INPUT = 2


def error_line(message, kind="error"):
    """``kind: message`` on one line (the message's own line breaks and runs of spaces folded). ``kind`` is
    "error", or "config error" where engine/train.py reads the run config itself (its keys and values, the model
    names, the output folder) before any work; what the run then meets (data, checkpoints, the model) is "error"."""
    return f"{kind}: " + " ".join(str(message).split())


def fail(message):
    """Print :func:`error_line` on stderr; returns the bad-input exit code."""
    print(error_line(message), file=sys.stderr)
    return BAD_INPUT


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")
        sys.exit(BAD_INPUT)


def _int_at_least(text, least, what):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} is {what}")
    return value


def int_at_least(least):
    """An argparse type: an integer >= ``least`` (e.g. a sequence length's floor)."""
    def parse(text):
        return _int_at_least(text, least, f"not an integer >= {least}")

    parse.__name__ = f"integer >= {least}"
    return parse


def positive_int(text):
    """An argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "not a positive integer")


def nonnegative_int(text):
    """An argparse type: an integer >= 0 (warm-up counts)."""
    return _int_at_least(text, 0, "negative")


def _number(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_float(text):
    """An argparse type: a finite number > 0."""
    value = _number(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive finite number")
    return value


def probability(text):
    """An argparse type: a number in [0, 1) (a dropout probability; 1 would drop everything)."""
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return value


def unwritable(path):
    """Why a file cannot be written at ``path`` (empty, a folder there, its folder missing or not writable), else
    None: for an output flag, checked before the work whose result it would hold. Writability is tried, not read
    off the mode bits (root passes those for /proc and read-only mounts): a temporary file is created in the folder
    and removed."""
    if not path:
        return "an empty path"
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{path} is a folder"
    if not os.path.isdir(folder):
        return f"{path}: its folder {folder} does not exist"
    why = folder_takes_no_file(folder)
    return f"{path}: its folder {why}" if why else None


def folder_takes_no_file(folder):
    """Why ``folder`` (an existing folder) takes no new file, else None: a temporary file is created and removed."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
    except OSError as e:
        return f"{folder} cannot be written ({e.strerror or e})"
    os.close(fd)
    os.remove(probe)
    return None


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


DISK_FULL_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
# what torch.save / DeepSpeed report when a write comes up short (no errno reaches Python)
SHORT_WRITE_MARKS = ("unexpected pos", "file write failed", "failed writing", "No space left")


def _free_bytes(path):
    probe = os.path.abspath(path or ".")
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return probe, shutil.disk_usage(probe).free


def disk_full_message(exc, output_dir, low=16 << 20):
    """One line if ``exc`` (or an exception it chains) is a full disk, else None: the path written (the file when
    the error names it, else ``output_dir``) and the bytes free there. A short write without an errno (torch.save's
    "unexpected pos") counts when the output folder's file system has under ``low`` bytes free."""
    e = exc
    while e is not None:
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            path = e.filename or output_dir
            where, free = _free_bytes(path)
            return f"error: no space left on the device writing {path} ({free:,} bytes free on {where})"
        if "No space left on device" in str(e) or "(os error 28)" in str(e):  # e.g. safetensors' own error type
            where, free = _free_bytes(output_dir)
            return f"error: no space left on the device writing under {output_dir} ({free:,} bytes free on {where})"
        if isinstance(e, RuntimeError) and any(m in str(e) for m in SHORT_WRITE_MARKS):
            where, free = _free_bytes(output_dir)
            if free < low:
                return (f"error: no space left on the device writing under {output_dir} ({free:,} bytes free on "
                        f"{where}); the last complete checkpoint is kept")
        e = e.__cause__ or e.__context__
    return None
