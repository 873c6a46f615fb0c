"""Whole-file writes that a crash or a reader never sees half done.

A file is written under a temporary name beside it (``<path>.tmp<pid>``, so two processes never share one), flushed
to disk with ``fsync``, then renamed over ``path`` with ``os.replace``; the folder is synced after the rename so the
new name itself survives a power cut. Readers see the old file or the new one, whole. If writing fails (a full disk,
a value JSON cannot hold) the temporary file is removed and ``path`` is left as it was; a process killed outright
(SIGKILL, power) can leave its ``<path>.tmp<pid>`` behind, never a half-written ``path``.

Every file the engine writes in place (the checkpoint markers and ``latest``, ``run.json``, ``config.yaml``,
``metrics.csv`` when it is rewritten, score files, ``engine.pick``'s result) goes through here (metrics.csv's
appended rows are synced with :func:`sync_file` before a checkpoint is marked complete); files inside a folder that is itself
renamed into place (adapters, exports) need not; such a folder, and a checkpoint's DeepSpeed files, are synced
with :func:`sync_tree` before the rename or the marker that publishes them.
"""
import contextlib
import json
import os


@contextlib.contextmanager
def atomic_open(path, mode="w", newline=None):
    """``open(path, mode)`` for a whole new file, which appears at ``path`` only when the block ends without an
    exception. ``mode`` is "w" or "wb"."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files (mode 'w' or 'wb'), not {mode!r}")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    sync_folder(os.path.dirname(os.path.abspath(path)))


def sync_file(path):
    """fsync the file at ``path`` (best effort, as :func:`sync_folder`): rows appended to metrics.csv, before the
    checkpoint that covers them is marked complete."""
    _fsync_path(path)


def sync_folder(folder):
    """fsync a folder, so that a rename into it survives a power cut (best effort: some filesystems refuse)."""
    _fsync_path(folder)


def _fsync_path(path):
    """fsync a file or folder by path, best effort: one that cannot be opened for reading (a folder on some network
    filesystems) or synced is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sync_tree(folder, only=None):
    """fsync every file under ``folder`` (those ``only(name)`` accepts), then the folders: what a marker written
    after it (a checkpoint's COMPLETE) promises is on disk, not only in the page cache, when the power goes."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            if only is None or only(name):
                _fsync_path(os.path.join(root, name))
        sync_folder(root)


def _umask():
    """The process's umask, read from /proc where Linux says it (setting it to read it, the only portable way,
    would for an instant give any file another thread creates the mode 0666)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)  # the strictest mask for the instant it is set
    os.umask(mask)
    return mask


def share_safetensors(folder):
    """Give every ``*.safetensors`` under ``folder`` the mode a plain ``open()`` would: 0o666 less the umask.
    safetensors 0.8 writes its files 0600 whatever the umask, so a shared cache or an export handed to another
    account could not be read. Called before a folder is renamed into place or marked complete."""
    mask = _umask()
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".safetensors"):
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


def write_text(path, text):
    """``text`` as the whole of ``path``, atomically."""
    with atomic_open(path) as f:
        f.write(text)


def write_json(path, obj, indent=2):
    """``obj`` as indented JSON (and a final newline) at ``path``, atomically. The JSON is made before anything is
    written, so a value it cannot hold raises with ``path`` untouched."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def pid_alive(pid):
    """Whether process ``pid`` may still run on this host, for a temp file or folder named by its writer's pid:
    ``os.kill(pid, 0)`` raises ProcessLookupError only when no such process exists (another user's raises
    PermissionError: alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
