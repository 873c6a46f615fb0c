"""tests/zygote.py, the fork server run_cmd and tests/launch.py start engine/train.py and `-m engine.<cli>` children
from, against real processes: a probe (tests/zygote_probe.py) run both ways sees the same argv, cwd, environment,
sys.path, stdio and signal dispositions at its start, writes the same bytes, ends with the same codes and
messages, and the zygote's child starts with torch imported but nothing of engine/."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests import zygote

from .helpers import ROOT, child_env

PROBE = os.path.join(ROOT, "tests", "zygote_probe.py")
needs_zygote = pytest.mark.skipif(not zygote.enabled(), reason=f"{zygote.SWITCH}=0: no zygote in this session")
ALLOW = dict(allow_modules=("tests.zygote_probe",), allow_scripts=(PROBE,))


def _cmd(python, unbuffered, how, mode):
    head = [python] + (["-u"] if unbuffered else [])
    target = {"module": ["-m", "tests.zygote_probe"], "script": ["tests/zygote_probe.py"],
              "abs_script": [PROBE]}[how]
    return head + target + [mode]


def _both(cmd, env=None, timeout=120, cwd=ROOT, allow=ALLOW):
    """(real, zygote) subprocess.run results of ``cmd``; the zygote's is checked to have come from a server."""
    e = child_env(env)
    assert zygote.warm(cmd, e, cwd)
    real = subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    zy = zygote.run(cmd, cwd=cwd, env=e, timeout=timeout, **allow)
    return real, zy


def _start(r):
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@needs_zygote
@pytest.mark.parametrize("python", ["python", sys.executable])
@pytest.mark.parametrize("how", ["module", "script", "abs_script"])
@pytest.mark.parametrize("unbuffered", [False, True])
def test_a_zygote_child_starts_as_a_real_process_would(python, how, unbuffered):
    env = {} if unbuffered else {"PYTHONUNBUFFERED": ""}
    cmd = _cmd(python, unbuffered, how, "start")
    real, zy = _both(cmd, env)
    a, b = _start(real), _start(zy)
    assert not a["torch_preloaded"] and b["torch_preloaded"]  # the zygote's child did come from the server
    assert a["engine_loaded"] == b["engine_loaded"] == []
    added = {k for info in zygote.SERVERS.infos.values() for k in info["env_added"]}
    assert set(added) <= {"TORCHINDUCTOR_CACHE_DIR"}  # what `import torch` sets, as it would in the real child
    for k in added:
        b["env"].pop(k)
    for k in a:
        if k != "torch_preloaded":
            assert a[k] == b[k], k
    assert real.stderr == zy.stderr == ""


@needs_zygote
def test_signals_the_requester_ignores_stay_ignored_as_across_exec():
    """exec keeps SIG_IGN: under nohup (SIGHUP) or as a background job of a shell (SIGINT, SIGQUIT) a real child
    starts with them ignored, and CPython leaves an ignored SIGINT ignored. (CI runs the suite under nohup: the
    zygote's children reset SIGHUP to its default, where real ones kept it ignored.)"""
    import signal

    names = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1)
    before = {s: signal.getsignal(s) for s in names}
    try:
        for s in names:
            signal.signal(s, signal.SIG_IGN)
        real, zy = _both(_cmd(sys.executable, True, "module", "start"))
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    a, b = _start(real)["signals"], _start(zy)["signals"]
    assert a == b and a["SIGHUP"] == a["SIGINT"] == a["SIGUSR1"] == str(signal.SIG_IGN), (a, b)


@needs_zygote
@pytest.mark.parametrize("how", ["module", "abs_script"])
def test_a_child_run_from_another_folder_starts_as_a_real_process_would(tmp_path, how):
    """A child run from another folder (tests/test_readme_chain.py's plain clone): cwd, sys.path (that folder or the
    script's first, then the interpreter's own), __file__ and the rest as a real process started there."""
    import shutil

    shutil.copy(PROBE, tmp_path / "zprobe.py")
    cmd = [sys.executable, "-m", "zprobe", "start"] if how == "module" else [sys.executable, PROBE, "start"]
    real, zy = _both(cmd, cwd=str(tmp_path), allow=dict(allow_modules=("zprobe",), allow_scripts=(PROBE,)))
    a, b = _start(real), _start(zy)
    assert not a["torch_preloaded"] and b["torch_preloaded"]
    for k in {k for info in zygote.SERVERS.infos.values() for k in info["env_added"]}:
        b["env"].pop(k, None)  # what `import torch` sets, as it would in the real child
    a.pop("torch_preloaded"), b.pop("torch_preloaded")
    assert a == b and a["cwd"] == str(tmp_path) and a["path0"] == (str(tmp_path) if how == "module"
                                                                     else os.path.dirname(PROBE))


@needs_zygote
def test_a_disposition_c_code_changed_under_python_is_the_one_a_child_inherits():
    """exec inherits the kernel's dispositions, not Python's record of them: C code that replaces an ignored SIGINT
    (``import mteb`` does, with a handler of its own) leaves ``signal.getsignal`` saying SIG_IGN while a real child
    starts with SIGINT at its default. The zygote read Python's record and started its children with SIGINT ignored
    (found when the suite ran as a background job, where SIGINT starts ignored, after the MTEB tests)."""
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
    names = (signal.SIGINT, signal.SIGUSR1)
    before = {s: signal.getsignal(s) for s in names}
    try:
        for s in names:
            signal.signal(s, signal.SIG_IGN)
            libc.signal(int(s), 0)  # SIG_DFL underneath: Python still records SIG_IGN
            assert signal.getsignal(s) == signal.SIG_IGN
        real, zy = _both(_cmd(sys.executable, True, "module", "start"))
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    a, b = _start(real)["signals"], _start(zy)["signals"]
    assert a == b and a["SIGINT"] == str(signal.default_int_handler) and a["SIGUSR1"] == str(signal.SIG_DFL), (a, b)


@needs_zygote
@pytest.mark.parametrize("mode,code", [("exit0", 0), ("exit3", 3), ("exitmsg", 1), ("raise", 1), ("atexit", 0),
                                       ("grandchild", 0), ("interleave", 0)])
@pytest.mark.parametrize("how", ["module", "script"])
def test_a_zygote_child_writes_and_ends_as_a_real_process_would(mode, code, how):
    real, zy = _both(_cmd(sys.executable, True, how, mode))
    assert (real.returncode, real.stdout, real.stderr) == (zy.returncode, zy.stdout, zy.stderr)
    assert real.returncode == code
    if mode == "raise":
        assert "Traceback (most recent call last)" in zy.stderr and zy.stderr.endswith("ValueError: boom\n")
    if mode == "exitmsg":
        assert zy.stderr == "a message\n"


@needs_zygote
@pytest.mark.parametrize("unbuffered", [True, False])
def test_both_streams_on_one_file_interleave_the_same(tmp_path, unbuffered):
    """stdout and stderr on one file: -u's write-through order, and without it stdout's block buffering."""
    cmd = _cmd(sys.executable, unbuffered, "module", "interleave" if unbuffered else "buffered")
    env = child_env({} if unbuffered else {"PYTHONUNBUFFERED": ""})
    assert zygote.warm(cmd, env)
    got = {}
    for name in ("real", "zygote"):
        path = tmp_path / name
        with open(path, "wb") as f:
            if name == "real":
                p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=f)
            else:
                with open(os.devnull, "rb") as null:
                    p = zygote.popen(cmd, env=env, cwd=ROOT, stdin=null.fileno(), stdout=f.fileno(),
                                     stderr=f.fileno(), **ALLOW)
                assert isinstance(p, zygote.ZygoteProcess)
            assert p.wait(60) == 0
        got[name] = path.read_bytes()
    assert got["real"] == got["zygote"]
    assert got["real"].startswith(b"out0\nerr0\n" if unbuffered else b"err0\n")


def _sleeping(p, out_fd):
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(out_fd, 1)
        assert chunk, "the probe ended before it slept"
        line += chunk
    assert line == b"sleeping\n"


@needs_zygote
def test_sigterm_from_outside_ends_both_with_minus_15():
    cmd = _cmd(sys.executable, True, "module", "sleep")
    env = child_env()
    assert zygote.warm(cmd, env)
    for name in ("real", "zygote"):
        r, w = os.pipe()
        try:
            if name == "real":
                p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=w)
            else:
                p = zygote.popen(cmd, env=env, cwd=ROOT, stdout=w, **ALLOW)
                assert isinstance(p, zygote.ZygoteProcess)
            os.close(w)
            _sleeping(p, r)
            assert p.poll() is None
            with pytest.raises(subprocess.TimeoutExpired):
                p.wait(0.2)
            p.terminate()
            assert p.wait(30) == -signal.SIGTERM and p.returncode == -15, name
        finally:
            os.close(r)


def _pid_gone(pid, within=10.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not zygote._alive(pid):
            return True
        time.sleep(0.05)
    return False


@needs_zygote
def test_a_timeout_raises_and_leaves_no_child():
    cmd = _cmd(sys.executable, True, "module", "sleep") + ["--pid"]
    env = child_env()
    assert zygote.warm(cmd, env)
    for limit, run in ((2, lambda: subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=2)),
                       (3, lambda: zygote.run(cmd, cwd=ROOT, env=env, timeout=3, **ALLOW))):
        t = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired) as e:
            run()
        assert limit <= time.monotonic() - t < 30
        out = e.value.output
        pid = int(re.search(rb"pid (\d+)", out).group(1))
        assert _pid_gone(pid)


@needs_zygote
def test_a_differing_guarded_variable_runs_a_real_process(monkeypatch):
    cmd = _cmd(sys.executable, True, "module", "start")
    base = child_env()
    assert zygote.warm(cmd, base)
    assert _start(zygote.run(cmd, cwd=ROOT, env=base, timeout=120, **ALLOW))["torch_preloaded"]
    for name, value in (("HF_HOME", "/nonexistent/hf"), ("OMP_NUM_THREADS", "1"), ("PYTHONHASHSEED", "7")):
        # the client finds no server for it ...
        got = _start(zygote.run(cmd, cwd=ROOT, env=dict(base, **{name: value}), timeout=120, **ALLOW))
        assert not got["torch_preloaded"] and got["env"][name] == value
        # ... and a server asked anyway refuses it
        sock = zygote.SERVERS.find(*zygote._probe(sys.executable, base, ROOT)[:2])
        monkeypatch.setattr(zygote.SERVERS, "find", lambda penv, exe: sock)
        got = _start(zygote.run(cmd, cwd=ROOT, env=dict(base, **{name: value}), timeout=120, **ALLOW))
        assert not got["torch_preloaded"] and got["env"][name] == value
        monkeypatch.undo()


def test_the_switch_and_other_commands_run_real_processes(monkeypatch):
    assert zygote.route([sys.executable, "-c", "pass"]) is None
    assert zygote.route([sys.executable, "-m", "tests.launch", "--num_gpus", "2"]) is None
    assert zygote.route([sys.executable, "-m", "deepspeed.launcher.runner"]) is None
    assert zygote.route([sys.executable, "benchmarks/bench_train_step.py"]) is None
    assert zygote.route(["python", "engine/train.py", "--config", "x"], cwd=ROOT)[:2] == ("script", "engine/train.py")
    assert zygote.route([sys.executable, "-u", os.path.join(ROOT, "engine", "train.py")], cwd="/")[:3] == (
        "script", os.path.join(ROOT, "engine", "train.py"), True)  # any cwd (test_a_child_run_from_another_folder...)
    assert zygote.route([sys.executable, "-u", os.path.join("/", "elsewhere", "engine", "train.py")], cwd="/") is None
    assert zygote.route([sys.executable, "-m", "engine.export"], cwd=ROOT)[:2] == ("module", "engine.export")
    from tests.helpers import RUN_CMD_MODULES  # run_cmd's: the benchmarks' CLIs too

    assert zygote.route([sys.executable, "-m", "benchmarks.bench_step_ops"], cwd=ROOT) is None
    assert zygote.route([sys.executable, "-m", "benchmarks.bench_step_ops"], cwd=ROOT,
                        allow_modules=RUN_CMD_MODULES)[:2] == ("module", "benchmarks.bench_step_ops")
    cmd = _cmd(sys.executable, True, "module", "start")
    monkeypatch.setenv(zygote.SWITCH, "0")
    assert not _start(zygote.run(cmd, cwd=ROOT, env=child_env(), timeout=120, **ALLOW))["torch_preloaded"]
