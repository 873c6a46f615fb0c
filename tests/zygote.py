"""A fork server ("zygote") for the tests' CLI children: the ~5 s of ``import torch, transformers`` paid once.

Most of the suite's wall time went to children of the form ``python [-u] engine/train.py ...`` or
``python -m engine.<cli> ...`` (tests/helpers.py run_cmd, which also sends ``-m benchmarks.<x>``, and the ranks
tests/launch.py spawns), each importing torch, transformers, peft and a modelling module before doing a second of
work. A server started from the pytest process imports those libraries (``PRELOAD``; never deepspeed, which prints
at import, nor anything from engine/, llm2vec_kernels/ or benchmarks/, the subject of the tests, which every child
imports fresh) and runs no torch op; then, for each request (argv, environment, cwd and the requester's
stdin/stdout/stderr, passed as file descriptors over a unix socket) it forks a child that makes itself what
``python [-u] script`` / ``python -m module`` would be at its first line -- signal dispositions, fds 0/1/2, cwd,
os.environ, sys.argv, sys.orig_argv, sys.executable, sys.path,
a fresh ``__main__``, stdio buffering as -u / PYTHONUNBUFFERED asks -- runs the target, and ends as CPython ends
(SystemExit codes and messages, an uncaught exception's traceback through sys.excepthook and exit 1, a
KeyboardInterrupt by SIGINT, then threading._shutdown, atexit, flushing stdio).

What the child's environment would be is asked of the real interpreter: the client runs the same argv[0]
(``python`` here is a pyenv shim, which adds PYENV_* and a PATH entry) with ``-I -S -c`` and the request's env and
cwd, and takes that process's os.environ (locale coercion included), sys.executable and sys.orig_argv[0]. A server
takes a request only when that environment agrees with the one it started with in every variable a preloaded
library may read at import (``GUARDED_PREFIXES``, and each variable its imports looked up); otherwise another
server (one per such environment, a few at most, started by the pytest process) or a real subprocess runs it.

Routing is opt-in by command (``route``): anything else -- other scripts, ``-c``, tests.launch itself, pip,
DeepSpeed's launcher -- is a real subprocess, as is everything when ``LLM2VEC_TEST_ZYGOTE=0`` or when no server can
be had (one warning). tests/test_zygote.py holds a child's equivalence with a real process.

Known differences from a real process: the child's parent is the server (os.getppid), it shares the server's
string-hash seed (a real child draws its own unless PYTHONHASHSEED is set -- a request that sets it goes to a
server started with it, or to a real process), sys.flags are the server's (no -u), the preloaded modules are in
sys.modules from the start, and at the end objects still alive are not finalised as interpreter teardown would
(the child leaves by os._exit after atexit and flushing stdio; __main__'s namespace is cleared first).
"""
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWITCH = "LLM2VEC_TEST_ZYGOTE"  # "0": real subprocesses everywhere
DIR_VAR = "LLM2VEC_TEST_ZYGOTE_DIR"  # the servers' folder, given to tests/launch.py (which pops it) for its ranks

PRELOAD = ("torch", "numpy", "yaml", "safetensors.torch", "transformers", "transformers.modeling_utils",
           "transformers.models.llama.modeling_llama", "transformers.models.mistral.modeling_mistral",
           "transformers.models.qwen2.modeling_qwen2", "transformers.models.qwen3.modeling_qwen3",
           "transformers.models.gemma.modeling_gemma", "transformers.models.gemma2.modeling_gemma2", "peft")

# Environment variables a preloaded library (or the interpreter, or a C library under them) may read while being
# imported: a request whose environment differs from the server's in any of them does not go to that server, since
# its child would see libraries set up for another environment. The server adds every name its imports looked up
# through os.environ (served in its ready file); these prefixes cover what C code reads with getenv (OpenMP, BLAS,
# the dynamic loader, glibc's locale and malloc) and families read lazily by name. PYTHONUNBUFFERED is the one
# PYTHON* variable left out: the child applies it itself.
GUARDED_PREFIXES = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TORCH", "PYTORCH", "OMP_", "MKL_", "KMP_", "CUDA",
                    "TRITON", "PYTHON", "LD_", "TOKENIZERS", "SAFETENSORS", "PEFT", "ACCELERATE", "OPENBLAS",
                    "GOTO", "NUMEXPR", "NUMPY", "NPY_", "XDG_", "LC_", "LANG", "MALLOC_", "GLIBC_", "TMPDIR", "TEMP",
                    "TMP", "HOME", "TQDM_", "FSSPEC", "INDUCTOR", "AOT", "TORCHINDUCTOR", "SYMPY", "MPMATH")
UNGUARDED = ("PYTHONUNBUFFERED",)
MAX_SERVERS = 4
START_TIMEOUT_S = 120

_PROBE = ("import json, os, sys; sys.stdout.write(json.dumps([dict(os.environ), sys.executable, sys.orig_argv[0], "
          "os.getcwd()]))")


def enabled():
    return os.environ.get(SWITCH, "1") != "0"


def _warn(msg):
    sys.stderr.write(f"tests/zygote.py: {msg}; using real subprocesses\n")


# ----------------------------------------------------------------------------------------------------- routing
TRAIN = os.path.join(ROOT, "engine", "train.py")


def route(args, cwd=None, allow_modules=("engine.",), allow_scripts=(TRAIN,)):
    """("script", path, unbuffered, rest) / ("module", name, unbuffered, rest) when ``args`` is a command the
    zygote may run -- [python | sys.executable, optional -u, engine/train.py (this repository's) | -m engine.<x>,
    args...] -- else None."""
    args = [os.fspath(a) for a in args]
    if len(args) < 2 or args[0] not in ("python", sys.executable):
        return None
    # any cwd: the child chdirs to it and puts it (-m) or the script's folder first on sys.path, as a real process;
    # the rest of sys.path is the server's, which does not depend on its cwd (tests/test_zygote.py from tmp_path)
    cwd = os.fspath(cwd) if cwd is not None else os.getcwd()
    i, unbuffered = 1, False
    if args[1] == "-u":
        i, unbuffered = 2, True
    if i >= len(args):
        return None
    if args[i] == "-m":
        if i + 1 >= len(args):
            return None
        mod = args[i + 1]
        if not mod.startswith(tuple(allow_modules)):
            return None
        return ("module", mod, unbuffered, args[i + 2:])
    if args[i].startswith("-"):
        return None
    script = os.path.join(cwd, args[i])
    if os.path.realpath(script) not in {os.path.realpath(p) for p in allow_scripts}:
        return None
    return ("script", args[i], unbuffered, args[i + 1:])


def _probe(argv0, env, cwd):
    """What a real ``argv0`` started with ``env`` in ``cwd`` has: (os.environ, sys.executable, sys.orig_argv[0])."""
    try:
        r = subprocess.run([argv0, "-I", "-S", "-c", _PROBE], env=env, cwd=cwd, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    try:
        penv, exe, orig0, _ = json.loads(r.stdout)
    except ValueError:
        return None
    return penv, exe, orig0


def _guarded_names(info, a, b):
    names = set(info["read"])
    for d in (a, b):
        names.update(k for k in d if k.startswith(GUARDED_PREFIXES))
    return names - set(UNGUARDED)


def _matches(info, penv, exe):
    if exe != info["executable"]:
        return False
    senv = info["env"]
    return all(penv.get(k) == senv.get(k) for k in _guarded_names(info, penv, senv))


# ------------------------------------------------------------------------------------------------------ servers
class _Servers:
    """The servers this process knows: in the pytest process the ones it starts (keyed by environment); in a
    child given DIR_VAR (tests/launch.py), the ones the folder holds."""

    def __init__(self):
        self.dir = None
        self.owner = False
        self.procs = []  # (Popen, sock path) started here
        self.infos = {}  # sock path -> ready info
        self.broken = False
        self.warned = False
        self.seen = {}

    def attach(self, folder):
        """Use the servers another process started in ``folder`` (tests/launch.py); start none."""
        if self.dir is None:
            self.dir = folder

    def _ensure_dir(self):
        if self.dir is None:
            import atexit
            import tempfile

            self.dir = tempfile.mkdtemp(prefix="llm2vec-zygote-")
            self.owner = True
            atexit.register(self.stop)
        return self.dir

    def load(self):
        d = self._ensure_dir()
        try:
            names = sorted(n for n in os.listdir(d) if n.endswith(".json"))
        except OSError:
            return self.infos
        for n in names:
            sock = os.path.join(d, n[:-5] + ".sock")
            if sock not in self.infos:
                try:
                    with open(os.path.join(d, n)) as f:
                        self.infos[sock] = json.load(f)
                except (OSError, ValueError):
                    pass
        return self.infos

    def find(self, penv, exe):
        for sock, info in self.load().items():
            if info.get("dead"):
                continue
            if _matches(info, penv, exe):
                return sock
        return None

    def start(self, argv0, env, cwd):
        """Start a server as ``argv0`` would run in ``env`` (the pytest process only); its socket or None."""
        self._ensure_dir()
        if not self.owner or self.broken or len(self.procs) >= MAX_SERVERS:
            return None
        n = len(self.procs)
        sock = os.path.join(self.dir, f"s{n}.sock")
        log = open(os.path.join(self.dir, f"s{n}.log"), "wb")
        try:
            proc = subprocess.Popen([argv0, "-m", "tests.zygote", "serve", sock, str(os.getpid())], env=env, cwd=cwd,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        except OSError:
            self.broken = True
            return None
        finally:
            log.close()
        self.procs.append((proc, sock))
        ready = sock[:-5] + ".json"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not os.path.exists(ready):
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                self.broken = True
                with open(os.path.join(self.dir, f"s{n}.log"), "rb") as f:
                    tail = f.read()[-2000:].decode(errors="replace")
                _warn(f"the server did not start ({tail.strip()!r})")
                self.warned = True
                return None
            time.sleep(0.05)
        self.load()
        return sock

    def stop(self):
        for proc, sock in self.procs:
            if proc.poll() is None:
                try:
                    _send_msg(_connect(sock, 5), {"stop": True}, [])
                except OSError:
                    proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs = []
        if self.owner and self.dir:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


SERVERS = _Servers()


def stop():
    SERVERS.stop()


def _signature(env, exe):
    infos = [i for i in SERVERS.infos.values()]
    read = set(infos[0]["read"]) if infos else set()
    names = (read | {k for k in env if k.startswith(GUARDED_PREFIXES)}) - set(UNGUARDED)
    return exe, tuple(sorted((k, env.get(k)) for k in names))


def _server_for(argv0, env, cwd, penv, exe, start=True, eager=False):
    sock = SERVERS.find(penv, exe)
    if sock is not None or not start or not SERVERS.owner:
        return sock
    sig = _signature(penv, exe)
    SERVERS.seen[sig] = SERVERS.seen.get(sig, 0) + 1
    if SERVERS.procs and not eager and SERVERS.seen[sig] < 2:
        return None  # a one-off environment is not worth a server's start
    if SERVERS.start(argv0, env, cwd) is None:
        return None
    return SERVERS.find(penv, exe)


def warm(args, env, cwd=ROOT):
    """Start (in the pytest process) a server for the environment ``args`` would run in, if none has it; whether one
    has it now."""
    if not enabled():
        return False
    args = [os.fspath(a) for a in args]
    probed = _probe(args[0], env, cwd)
    return probed is not None and _server_for(args[0], env, cwd, probed[0], probed[1], eager=True) is not None


def prepare_launch(args, env, cwd):
    """For a tests.launch command about to run as a real child: make sure a server for its ranks' environment
    exists (the pytest process starts it) and return the env to give the launcher (DIR_VAR added)."""
    if not enabled() or SERVERS.broken:
        return env
    try:
        from tests.launch import rank_commands

        a = [os.fspath(x) for x in args]
        i = a.index("tests.launch")
        rest = a[i + 1:]
        nproc = int(rest[rest.index("--num_gpus") + 1])
        port = int(rest[rest.index("--master_port") + 1])
        script_i = next(j for j in range(len(rest)) if not rest[j].startswith("--") and
                        (j == 0 or rest[j - 1] not in ("--num_gpus", "--master_port")))
        cmds = rank_commands(nproc, port, rest[script_i], rest[script_i + 1:], env)
    except (ValueError, StopIteration, IndexError, ImportError):
        return env
    cmd, renv = cmds[0]
    if route(cmd, cwd) is None:
        return env
    probed = _probe(cmd[0], renv, cwd)
    if probed is None:
        return env
    penv, exe, _ = probed
    if _server_for(cmd[0], renv, cwd, penv, exe, eager=True) is None:
        return env
    return dict(env, **{DIR_VAR: SERVERS.dir})


# ------------------------------------------------------------------------------------------------------- client
def _connect(path, timeout=10):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    s.settimeout(None)
    return s


def _send_msg(sock, obj, fds):
    data = json.dumps(obj).encode()
    payload = struct.pack("!I", len(data)) + data
    n = socket.send_fds(sock, [payload], fds)
    if n < len(payload):
        sock.sendall(payload[n:])
    return sock


def _recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


class ZygoteProcess:
    """A zygote child, as much of subprocess.Popen as the tests use: pid, returncode, poll, wait, send_signal,
    terminate, kill (the last three by os.kill; returncode -N when signal N ended it)."""

    def __init__(self, args, sock, pid):
        self.args, self._sock, self.pid, self.returncode = args, sock, pid, None

    def _take(self, block, timeout=None):
        if self.returncode is not None:
            return self.returncode
        if not block:
            timeout = 0
        r, _, _ = select.select([self._sock], [], [], timeout)
        if not r:
            return None
        try:
            tag = _recv_exact(self._sock, 1)
            if tag != b"S":
                raise EOFError
            (status,) = struct.unpack("!i", _recv_exact(self._sock, 4))
            self.returncode = os.waitstatus_to_exitcode(status)
        except (EOFError, OSError):
            # The server went away before the child ended: wait for the pid to be gone; its code is lost.
            while _alive(self.pid):
                time.sleep(0.05)
            _warn(f"the zygote server went away while child {self.pid} ran; its exit code is unknown")
            self.returncode = 1
        self._sock.close()
        return self.returncode

    def poll(self):
        return self._take(block=False)

    def wait(self, timeout=None):
        if timeout is None:
            return self._take(block=True)
        code = self._take(block=True, timeout=max(0.0, timeout))
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return code

    def send_signal(self, sig):
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _spawn(args, env, cwd, fds, allow_modules=("engine.",), allow_scripts=(TRAIN,)):
    """A ZygoteProcess running ``args`` with ``fds`` as its 0/1/2, or None: not a zygote command, or no server."""
    if not enabled() or SERVERS.broken:
        return None
    cwd = os.fspath(cwd) if cwd is not None else os.getcwd()
    r = route(args, cwd, allow_modules, allow_scripts)
    if r is None:
        return None
    args = [os.fspath(a) for a in args]
    probed = _probe(args[0], env, cwd)
    if probed is None:
        return None
    penv, exe, orig0 = probed
    sock_path = _server_for(args[0], env, cwd, penv, exe)
    if sock_path is None:
        return None
    kind, target, unbuffered, rest = r
    umask = os.umask(0)
    os.umask(umask)
    req = {"kind": kind, "target": target, "rest": rest, "env": penv, "cwd": cwd, "executable": exe,
           "orig_argv": [orig0] + args[1:], "unbuffered": unbuffered or bool(penv.get("PYTHONUNBUFFERED")),
           "umask": umask, "pgid": os.getpgid(0), "sid": os.getsid(0), "ignored": _ignored_signals()}
    try:
        sock = _connect(sock_path)
        _send_msg(sock, req, fds)
        tag = _recv_exact(sock, 1)
        if tag == b"P":
            (pid,) = struct.unpack("!q", _recv_exact(sock, 8))
            return ZygoteProcess(args, sock, pid)
        sock.close()  # "R": refused (its environment check); run it for real
        return None
    except (OSError, EOFError):
        SERVERS.infos.get(sock_path, {})["dead"] = True
        if not SERVERS.warned:
            SERVERS.warned = True
            _warn(f"the server at {sock_path} is unusable")
        return None


def popen(args, env=None, cwd=None, stdin=0, stdout=1, stderr=2, allow_modules=("engine.",), allow_scripts=(TRAIN,)):
    """subprocess.Popen(args, env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr) with the three as file
    descriptors (the caller's own by default), or a ZygoteProcess doing the same."""
    env = dict(os.environ if env is None else env)
    p = _spawn(args, env, cwd, [stdin, stdout, stderr], allow_modules, allow_scripts)
    if p is not None:
        return p
    return subprocess.Popen(args, env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr)


def run(args, cwd=None, env=None, timeout=None, allow_modules=("engine.",), allow_scripts=(TRAIN,)):
    """subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout), through the zygote
    when ``args`` is one of its commands."""
    env = dict(os.environ if env is None else env)
    if not enabled() or route(args, cwd if cwd is not None else os.getcwd(), allow_modules, allow_scripts) is None:
        return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        p = _spawn(args, env, cwd, [0, out_w, err_w], allow_modules, allow_scripts)
    finally:
        os.close(out_w)
        os.close(err_w)
    if p is None:
        os.close(out_r)
        os.close(err_r)
        return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    bufs = {out_r: [], err_r: []}
    deadline = None if timeout is None else time.monotonic() + timeout
    timed_out = False
    try:
        open_fds = [out_r, err_r]
        while open_fds:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                timed_out = True
                break
            ready, _, _ = select.select(open_fds, [], [], wait)
            for fd in ready:
                chunk = os.read(fd, 65536)
                if chunk:
                    bufs[fd].append(chunk)
                else:
                    open_fds.remove(fd)
        if not timed_out:
            try:
                p.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
        if timed_out:
            p.kill()
            p.wait()
            out, err = b"".join(bufs[out_r]), b"".join(bufs[err_r])
            raise subprocess.TimeoutExpired(p.args, timeout, output=out or None, stderr=err or None)
    finally:
        os.close(out_r)
        os.close(err_r)
        if p.returncode is None:
            p.kill()
            p.wait()
    import locale

    enc = locale.getpreferredencoding(False)

    def text(chunks):
        return b"".join(chunks).decode(enc).replace("\r\n", "\n").replace("\r", "\n")

    return subprocess.CompletedProcess(p.args, p.returncode, text(bufs[out_r]), text(bufs[err_r]))


# ------------------------------------------------------------------------------------------------------- server
def _serve(sock_path, parent_pid):
    import builtins

    env0 = dict(os.environ)
    path0 = list(sys.path[1:])
    # Which names the imports look up, by call site. A site that read every name present is a scan (tqdm, fsspec
    # collect their own prefix's variables so: GUARDED_PREFIXES holds those prefixes), not a lookup by name.
    sites = {}
    environ_cls = type(os.environ)
    getitem = environ_cls.__getitem__

    def recording_getitem(self, key):
        f = sys._getframe(1)
        while f is not None and (f.f_code.co_filename.startswith("<frozen") or f.f_code.co_filename == os.__file__):
            f = f.f_back
        site = (f.f_code.co_filename, f.f_lineno) if f is not None else None
        sites.setdefault(site, set()).add(key)
        return getitem(self, key)

    environ_cls.__getitem__ = recording_getitem
    try:
        import importlib

        for name in PRELOAD:
            importlib.import_module(name)
    finally:
        environ_cls.__getitem__ = getitem
    read = set()
    scans = []
    for site, names in sites.items():
        if set(env0) <= names and len(names) > 8:
            scans.append(site)
        else:
            read |= names
    env_added = {k: v for k, v in os.environ.items() if env0.get(k) != v}  # what the imports set (TORCHINDUCTOR_*)
    bad = [m for m in sys.modules if m.split(".")[0] in ("engine", "llm2vec_kernels", "deepspeed")]
    if bad:
        raise SystemExit(f"tests/zygote.py: the preload imported {bad[:5]}")

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    listener.bind(sock_path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    children = {}  # pid -> connection
    info = {"env": env0, "read": sorted(read), "scans": sorted(map(str, scans)), "executable": sys.executable,
            "pid": os.getpid(),
            "sid": os.getsid(0), "env_added": env_added}
    ready = sock_path[:-5] + ".json"
    with open(ready + ".tmp", "w") as f:
        json.dump(info, f)
    os.replace(ready + ".tmp", ready)

    def reap():
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(b"S" + struct.pack("!i", status))
                except OSError:
                    pass
                conn.close()

    while True:
        if os.getppid() != parent_pid:
            break
        try:
            r, _, _ = select.select([listener, wake_r], [], [], 0.5)
        except InterruptedError:
            r = []
        if wake_r in r:
            try:
                while os.read(wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        reap()
        if listener not in r:
            continue
        conn, _ = listener.accept()
        try:
            conn.settimeout(30)
            msg, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
            if len(msg) < 4:
                raise EOFError
            (n,) = struct.unpack("!I", msg[:4])
            data = msg[4:]
            while len(data) < n:
                chunk = conn.recv(n - len(data))
                if not chunk:
                    raise EOFError
                data += chunk
            req = json.loads(data)
            conn.settimeout(None)
        except (OSError, EOFError, ValueError):
            conn.close()
            continue
        if req.get("stop"):
            conn.close()
            break
        ok = (len(fds) == 3 and req["sid"] == info["sid"] and _matches(info, req["env"], req["executable"]))
        if not ok:
            try:
                conn.sendall(b"R")
            except OSError:
                pass
            conn.close()
            for fd in fds:
                os.close(fd)
            continue
        pid = os.fork()
        if pid == 0:
            try:
                code = _child(req, fds, [listener, conn, *children.values()], [wake_r, wake_w], path0, env_added,
                              builtins)
            except BaseException:  # a bug here: say so where the requester reads, and fail
                try:
                    import traceback

                    os.write(2, ("tests/zygote.py child setup failed:\n" + traceback.format_exc()).encode())
                finally:
                    os._exit(70)
            os._exit(code)
        for fd in fds:
            os.close(fd)
        try:
            conn.sendall(b"P" + struct.pack("!q", pid))
            children[pid] = conn
        except OSError:
            conn.close()
        reap()
    listener.close()
    try:
        os.unlink(sock_path)
    except OSError:
        pass


def _ignored_signals():
    """The signals this process ignores that a child it starts keeps ignored: exec keeps SIG_IGN (nohup's SIGHUP, a
    background job's SIGINT and SIGQUIT), and subprocess puts SIGPIPE and SIGXFSZ back to SIG_DFL. Read from the
    kernel (/proc/self/status SigIgn), which is what exec inherits: ``signal.getsignal`` is Python's record, and C
    code can change a disposition under it (``import mteb`` installs a C handler for SIGINT over an inherited
    SIG_IGN: Python still says SIG_IGN, and a real child starts with SIGINT at its default)."""
    skip = (signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE, signal.SIGXFSZ)
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            mask = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
        ignored = lambda s: bool(mask >> (int(s) - 1) & 1)  # noqa: E731
    except (OSError, StopIteration, ValueError):  # no procfs: Python's record
        ignored = lambda s: signal.getsignal(s) == signal.SIG_IGN  # noqa: E731
    return [int(s) for s in signal.valid_signals() if s not in skip and ignored(s)]


def _reset_signals(ignored=()):
    """The dispositions a fresh CPython started by the requester has: what the requester ignores stays ignored
    (``ignored``, :func:`_ignored_signals`; CPython keeps an ignored SIGINT), SIGINT raises KeyboardInterrupt,
    SIGPIPE and SIGXFSZ are ignored, the rest default."""
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        if sig in ignored:
            handler = signal.SIG_IGN
        elif sig == signal.SIGINT:
            handler = signal.default_int_handler
        elif sig in (signal.SIGPIPE, signal.SIGXFSZ):
            handler = signal.SIG_IGN
        else:
            handler = signal.SIG_DFL
        try:
            signal.signal(sig, handler)
        except (OSError, ValueError, RuntimeError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _stdio(unbuffered, old):
    """sys.stdin/stdout/stderr as CPython makes them at start (create_stdio)."""
    import io

    made = []
    for fd, mode, prev in ((0, "r", old[0]), (1, "w", old[1]), (2, "w", old[2])):
        write = mode == "w"
        buffering = 0 if (unbuffered and write) else -1
        try:
            buf = io.open(fd, mode + "b", buffering=buffering, closefd=False)
        except OSError:
            made.append(None)
            continue
        raw = buf.raw if buffering else buf
        isatty = raw.isatty()
        line_buffering = (not unbuffered) and (isatty or fd == 2)
        errors = "backslashreplace" if fd == 2 else prev.errors
        stream = io.TextIOWrapper(buf, encoding=prev.encoding, errors=errors, newline="\n",
                                  line_buffering=line_buffering, write_through=unbuffered)
        stream.mode = mode
        made.append(stream)
    return made


def _child(req, fds, socks, pipes, path0, env_added, builtins):
    import types

    for s in socks:
        s.close()
    for fd in pipes:
        os.close(fd)
    _reset_signals(set(req.get("ignored", ())))
    for i, fd in enumerate(fds):
        if fd != i:
            os.dup2(fd, i)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    try:
        os.setpgid(0, req["pgid"])
    except OSError:
        pass
    os.umask(req["umask"])
    os.chdir(req["cwd"])
    env = dict(req["env"])
    os.environ.clear()
    os.environ.update(env)
    for k, v in env_added.items():  # set by a preloaded import (as the real child's own import would set it)
        os.environ.setdefault(k, v)

    old = (sys.stdin, sys.stdout, sys.stderr)
    new = _stdio(req["unbuffered"], old)
    sys.stdin, sys.stdout, sys.stderr = new
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = new
    import logging

    for lg in [logging.getLogger()] + [v for v in logging.Logger.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger)]:
        for h in lg.handlers:
            stream = getattr(h, "stream", None)
            if stream is old[1] and new[1] is not None:
                h.stream = new[1]
            elif stream is old[2] and new[2] is not None:
                h.stream = new[2]

    if "numpy.random" in sys.modules:  # a real process draws its legacy global seed afresh
        sys.modules["numpy.random"].seed()
    for name in [m for m in sys.modules if m == "tests" or m.startswith("tests.")]:
        del sys.modules[name]

    sys.executable = req["executable"]
    sys.orig_argv = list(req["orig_argv"])
    main = types.ModuleType("__main__")
    main.__dict__["__annotations__"] = {}
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main
    code, interrupted = 0, False
    try:
        if req["kind"] == "script":
            given = req["target"]
            path = given if os.path.isabs(given) else os.path.join(os.getcwd(), given)
            sys.argv = [given] + list(req["rest"])
            sys.path[:] = [os.path.dirname(os.path.realpath(path))] + path0
            from importlib.machinery import SourceFileLoader

            main.__dict__.update(__file__=path, __cached__=None, __loader__=SourceFileLoader("__main__", path))
            with open(path, "rb") as f:
                source = f.read()
            compiled = compile(source, path, "exec", dont_inherit=True)
            exec(compiled, main.__dict__)
        else:
            import runpy

            sys.argv = ["-m"] + list(req["rest"])
            sys.path[:] = [os.getcwd()] + path0
            runpy._run_module_as_main(req["target"], alter_argv=True)
    except SystemExit as e:
        code = _system_exit_code(e)
    except BaseException as e:  # noqa: B902 -- as the interpreter: print it and exit 1
        interrupted = isinstance(e, KeyboardInterrupt)
        tb = e.__traceback__.tb_next  # from the target's first frame (runpy's, for -m), as the interpreter prints
        e.__traceback__ = tb
        try:
            sys.last_type, sys.last_value, sys.last_traceback = type(e), e, tb
            sys.excepthook(type(e), e, tb)
        except BaseException:
            pass
        code = 1
    return _finish(code, interrupted, main)


def _system_exit_code(e):
    c = e.code
    if c is None:
        return 0
    if isinstance(c, int):
        return c
    try:
        err = sys.stderr
        if err is None:
            os.write(2, (str(c) + "\n").encode(errors="backslashreplace"))
        else:
            err.write(str(c) + "\n")
            err.flush()
    except BaseException:
        pass
    return 1


def _finish(code, interrupted, main):
    import threading

    try:
        threading._shutdown()
    except BaseException:
        pass
    import atexit

    atexit._run_exitfuncs()
    try:
        main.__dict__.clear()
    except BaseException:
        pass
    for name in ("last_type", "last_value", "last_traceback"):
        if hasattr(sys, name):
            delattr(sys, name)
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except BaseException:
            if stream is sys.stdout:
                code = 120
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code & 0xFF


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        _serve(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: python -m tests.zygote serve SOCKET PARENT_PID")
