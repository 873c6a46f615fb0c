import glob
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STS = os.path.join(ROOT, "data", "stsbenchmark")  # shipped with the repo (see data/stsbenchmark/LICENSE.txt)


def count_launches(monkeypatch, module, name):
    """Wrap the Triton kernel ``module.name`` so every launch is recorded; returns the list of launch grids."""
    grids, kernel = [], getattr(module, name)

    class _Counting:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(module, name, _Counting())
    return grids


def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
    base.update(kw)
    return LlamaConfig(**base)


def tmpfs_mount(path, size):
    """Mount a tmpfs of ``size`` (e.g. "300k") at ``path`` (made if absent): a small file system to fill. False
    when it cannot be mounted (not root, no mount permission): the caller skips."""
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def run_cmd(args, env=None, timeout=600, cwd=ROOT):
    e = child_env(env)
    # engine/train.py and `-m engine.<cli>` / `-m benchmarks.<x>` children fork from tests/zygote.py's server, which
    # has torch and transformers imported already (tests/test_zygote.py holds the equivalence); LLM2VEC_TEST_ZYGOTE=0:
    # never.
    from tests import zygote

    if zygote.enabled():
        if "tests.launch" in args:
            e = zygote.prepare_launch(args, e, cwd)  # the light launcher's ranks fork from a server too
        return zygote.run(args, cwd=cwd, env=e, timeout=timeout, allow_modules=RUN_CMD_MODULES,
                          allow_scripts=(zygote.TRAIN, os.path.join(os.fspath(cwd), "engine", "train.py")))
    return subprocess.run(args, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


# the `-m` children run_cmd sends to the zygote: the engine's CLIs, the benchmarks' (whose own workers, started
# with sys.executable, stay real processes) and tests.run_check's check functions
RUN_CMD_MODULES = ("engine.", "benchmarks.", "tests.run_check")


class Child:
    """``subprocess.Popen(args, cwd=cwd, env=env, stdout=<file>, stderr=<file or the same>)`` for a test that
    drives a child itself (signals it, kills it, starts ranks with no launcher): forked from tests/zygote.py's
    server when it is one of run_cmd's commands (engine/train.py, ``-m`` RUN_CMD_MODULES), else a real process;
    tests/test_zygote.py holds a zygote child equal to a real one (argv, env, cwd, stdio, exit codes, signals).
    Its output goes to temporary files, so no pipe fills while the test waits on another process: ``output()``
    reads what it wrote so far, ``communicate(timeout)`` waits for the end and returns (stdout, stderr) as text."""

    def __init__(self, args, cwd=ROOT, env=None, stderr_to_stdout=False):
        import tempfile

        from tests import zygote

        self.args = [os.fspath(a) for a in args]
        env = dict(os.environ if env is None else env)
        self._out = tempfile.TemporaryFile()
        self._err = self._out if stderr_to_stdout else tempfile.TemporaryFile()
        kw = dict(allow_modules=RUN_CMD_MODULES, allow_scripts=(zygote.TRAIN,))
        if zygote.enabled() and zygote.route(self.args, cwd, **kw) is not None:
            zygote.warm(self.args, env, cwd)  # a server for this environment, started now if none has it
        self.proc = zygote.popen(self.args, env=env, cwd=cwd, stdout=self._out.fileno(), stderr=self._err.fileno(),
                                 **kw)
        self.pid = self.proc.pid

    @property
    def returncode(self):
        return self.proc.returncode

    def poll(self):
        return self.proc.poll()

    def wait(self, timeout=None):
        return self.proc.wait(timeout)

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def kill(self):
        self.proc.kill()

    @staticmethod
    def _text(f):
        import locale

        f.seek(0)
        return f.read().decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n")

    def output(self):
        return self._text(self._out)

    def communicate(self, timeout=None):
        self.wait(timeout)
        return self._text(self._out), ("" if self._err is self._out else self._text(self._err))


def run_ranks(cmds, cwds, timeout=300):
    """Start the ranks ``cmds`` ([(argv, env)], tests/launch.py rank_commands) as Children in ``cwds``, with no
    launcher to stop them, and wait for them all: [(returncode, stdout, stderr)]. A rank still running ``timeout``
    s after the start fails the test, every rank killed."""
    import time

    procs = [Child(argv, cwd=cwd, env=env) for (argv, env), cwd in zip(cmds, cwds)]
    t0, results = time.time(), []
    try:
        for p in procs:
            try:
                results.append((p.wait(max(1, timeout - (time.time() - t0))), *p.communicate()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"a rank was still running {timeout} s after the start (waiting in a "
                                     "collective)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def child_env(env=None):
    """The environment run_cmd gives a child: this process's, less what must not leak into one, plus ``env``."""
    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)  # the engine's CPU path uses the torch references
    # An in-process test may have set up a world of one (engine.distributed.init_distributed): a child must not
    # inherit that rendezvous, or it would try to bind the parent's port.
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK",
              "CROSS_SIZE"):
        e.pop(k, None)
    e.update(env or {})
    e.setdefault("PYTHONUNBUFFERED", "1")
    return e


def leaked_shm(cmd):
    """DeepSpeed CPU shm-allreduce segments (/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>) that
    the run started by deepspeed_cmd `cmd` left behind: engine.distributed.init_distributed unlinks them."""
    port = cmd[cmd.index("--master_port") + 1]
    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")


def rewind_run(ref, out, step):
    """Copy the finished run folder ``ref`` to ``out`` as a run killed just after its step-``step`` checkpoint would
    have left it: the later checkpoints and the final adapter gone, ``latest`` naming that step, and no metrics
    row past it. A run resumed in ``out`` must therefore log every later row and write the adapter itself.
    (The checkpoint files are the bytes the killed run would have written: the run is the same up to there.)"""
    import csv
    import shutil

    shutil.copytree(ref, out)
    tag = f"step_{step:07d}"
    ckpt = os.path.join(out, "checkpoints")
    assert os.path.isfile(os.path.join(ckpt, tag, "COMPLETE")), f"{ref} has no complete {tag}"
    for name in os.listdir(ckpt):
        if name.startswith("step_") and int(name[5:]) > step:
            shutil.rmtree(os.path.join(ckpt, name))
    shutil.rmtree(os.path.join(out, "adapter"))
    with open(os.path.join(ckpt, "latest"), "w") as f:
        f.write(tag)
    path = os.path.join(out, "metrics.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, [r for r in reader if int(r["step"]) <= step]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return out


def real_launch_cmd(nproc, port, script, *args):
    """DeepSpeed's launcher, as `deepspeed --num_gpus N` runs it."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(port),
            script, *args]


def light_launch_cmd(nproc, port, script, *args):
    """tests/launch.py: the same ranks, argv and environment without the launcher's ~5 s (test_launch holds it)."""
    return [sys.executable, "-m", "tests.launch", "--num_gpus", str(nproc), "--master_port", str(port), script, *args]


def deepspeed_cmd(nproc, *args, launcher="light"):
    """An ``nproc``-rank engine/train.py run. ``launcher="deepspeed"`` for the runs whose subject is the launch."""
    from engine.distributed import free_port

    make = {"light": light_launch_cmd, "deepspeed": real_launch_cmd}[launcher]
    return make(nproc, free_port(), "engine/train.py", *args)


# Machine epsilon of the dtypes the interpreter tests run (tl.dot on bf16 is wrong in the interpreter).
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10}


def assert_close_to_fp64(out, ref64, torch_out, dtype, what):
    """A kernel's error against the fp64 reference is at most twice torch's own error in ``dtype`` on the same
    computation, plus 4 ulps of the largest reference value; and so is its root-mean-square error, plus 2 ulps of
    the reference's root mean square. The max alone is scaled by the largest value: in fp16 a kernel that added
    0.1 to every small output passed it (the bound was 0.17 where the median output is 0.2); the RMS check is
    scaled by the typical value."""
    diff, tdiff = out.double() - ref64, torch_out.double() - ref64
    err, torch_err = float(diff.abs().max()), float(tdiff.abs().max())
    bound = 2 * torch_err + 4 * EPS[dtype] * float(ref64.abs().max())
    assert err <= bound, (what, err, torch_err, bound)

    def rms(t):
        return float(t.square().mean().sqrt()) if t.numel() else 0.0

    rms_err, torch_rms = rms(diff), rms(tdiff)
    rms_bound = 2 * torch_rms + 2 * EPS[dtype] * rms(ref64)
    assert rms_err <= rms_bound, (what, "rms", rms_err, torch_rms, rms_bound)


def check_bench_tiny(bench, tmp_path):
    """A fused-op benchmark's --tiny run writes one ok row per implementation and shape."""
    from benchmarks.common import read_rows

    out = tmp_path / "bench.csv"
    rows = bench.main(["--tiny", "--out", str(out), "--iters", "1"])
    written = read_rows(str(out))
    assert len(written) == len(rows) > 0 and {r["impl"] for r in written} == set(bench.IMPLS)
    assert all("status=ok" in r["extra"] and float(r["ms"]) > 0 for r in written)


class PlainEngine:
    """The two calls a stage's train_micro_step makes on a DeepSpeed engine: forward, and backward(loss)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, batch):
        return self.module(batch)

    def backward(self, loss):
        loss.backward()


def perturb_lora_b(model, std, generator=None):
    """LoRA B starts at zero (so A gets no gradient): give every B normal(0, std) entries."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=std, generator=generator)
    return model


def update_json(path, **values):
    """Set top-level keys of the JSON file at ``path`` (e.g. a saved config's hub name), in place."""
    import json

    with open(path) as f:
        obj = json.load(f)
    obj.update(values)
    with open(path, "w") as f:
        json.dump(obj, f)
    return obj


def inside_repo(path):
    """Whether ``path`` (a module's origin, say) lies in this repository, links resolved."""
    return os.path.realpath(path).startswith(os.path.realpath(ROOT) + os.sep)


def load_script(path, name):
    """A script that is not in a package (e.g. a data folder's make.py), imported as module ``name``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def data_card(folder, name, licence):
    """The bytes of ``data/<folder>/<name>`` and its data card's text (README.md beside it), after checking what
    every card states: the file's SHA-256 and size, and the licence, with LICENSE.txt beside it."""
    import hashlib

    d = os.path.join(ROOT, "data", folder)
    with open(os.path.join(d, name), "rb") as f:
        raw = f.read()
    with open(os.path.join(d, "README.md"), encoding="utf-8") as f:
        card = f.read()
    assert f"`{hashlib.sha256(raw).hexdigest()}`" in card and f"{len(raw):,} bytes" in card
    assert os.path.isfile(os.path.join(d, "LICENSE.txt")) and licence in card
    return raw, card


def sentence_corpus(folder):
    """The lines of a WikiText sentence corpus (``data/<folder>/sentences.txt``), checked against its card: the
    count, the words, 8-60 words a line, no repeats."""
    raw, card = data_card(folder, "sentences.txt", "CC BY-SA 3.0")
    lines = raw.decode("utf-8").splitlines()
    words = [len(t.split()) for t in lines]
    assert f"{len(lines):,} English sentences" in card and f"{sum(words):,} words" in card
    assert min(words) >= 8 and max(words) <= 60 and len(set(lines)) == len(lines)
    return lines


def record_launch_devices(monkeypatch):
    """Every tensor whose device a launcher enters (llm2vec_kernels._backend.on_device, through on_input_device):
    a launcher that is not wrapped would launch on the current GPU, not its inputs' (a multi-device encode worker)."""
    import contextlib

    from llm2vec_kernels import _backend

    seen = []

    def recording(t):
        seen.append(t)
        return contextlib.nullcontext()

    monkeypatch.setattr(_backend, "on_device", recording)
    return seen


def sigterm_when(proc, ready, timeout=120):
    """Wait for ``ready()`` (True once ``proc`` is where the test wants it), send ``proc`` SIGTERM, and return its
    (stdout, stderr) once it has ended; a process still alive when this returns or raises (a failed ``ready``, an
    ending that outlasts ``timeout``) is killed, so no test leaves one behind."""
    import signal

    try:
        ready()
        proc.send_signal(signal.SIGTERM)
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
