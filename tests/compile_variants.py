"""Compile kernel variants for sm_90 and sm_80 in subprocesses and check their resources.

Each kernel's compile check is a named job of :data:`COMPILE_JOBS`: one fresh process per architecture with the
interpreter off (Triton decides between interpreting and compiling at import time), printing one ``VARIANT {...}``
JSON line per variant (the attention job prints one JSON report). The fused elementwise ops' tests (rms_norm, rope,
glu) define ``VARIANTS``, a list of (label, kernel name in the kernels module, signature, constexprs, divisible args,
num_warps), and call ``check_all_compile(job name, test_module_name)``.
"""
import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}

# The compile checks' subprocesses, by name: what ``@pytest.mark.compile_check(name)`` tests ask for. They need
# nothing from the tests that run before them, so tests/conftest.py starts them in the background when the session
# begins (at the lowest CPU priority, two at a time: on this 2-core CI machine they take the core the mostly
# single-threaded suite leaves idle) and runs the marked tests last; each test then reads its job's output.
_ELEMENTWISE = "import tests.compile_variants as c; c.compile_main({test!r}, {kernels!r}, {{arch}})"
_REPORT = "import {test} as t, tests.compile_variants as c; c.print_rows(t._compile_report({{arch}}))"
COMPILE_JOBS = {  # a code template run once per arch, or a list of the codes to run
    "attention": ["import tests.test_attention as t; t._compile_all()"],
    "masked_ce": "import tests.test_masked_ce as t; t._compile_all_main({arch})",
    "contrastive": _REPORT.format(test="tests.test_contrastive"),
    "lora": _REPORT.format(test="tests.test_lora"),
    "lora_sass": ["import tests.lora_dropout_sass as m, tests.compile_variants as c; c.print_rows(m.main(90))"],
    "glu": _ELEMENTWISE.format(test="tests.test_glu", kernels="llm2vec_kernels.glu"),
    "rms_norm": _ELEMENTWISE.format(test="tests.test_rms_norm", kernels="llm2vec_kernels.rms_norm"),
    "rope": _ELEMENTWISE.format(test="tests.test_rope", kernels="llm2vec_kernels.rope"),
}


def job_codes(name):
    """The codes of a named compile job: one process per architecture (sm_90, sm_80) unless it lists its own."""
    job = COMPILE_JOBS[name]
    return job if isinstance(job, list) else [job.format(arch=arch) for arch in (90, 80)]


class _Jobs:
    """Subprocesses keyed by their code, started at most once; output in files (a pipe left unread would block)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.procs = {}
        self.queue = []
        self.runner = None

    def _start(self, code, nice):
        env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=REPO)
        out, err = (tempfile.TemporaryFile(mode="w+") for _ in range(2))
        argv = [sys.executable, "-c", ("import os; os.nice(19); " if nice else "") + code]  # no preexec_fn: threads
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=err)
        self.procs[code] = (proc, out, err)

    def background(self, codes, at_once=2):
        """Start ``codes`` in the background, ``at_once`` at a time, at the lowest priority."""
        with self.lock:
            self.queue += [c for c in codes if c not in self.procs and c not in self.queue]
            if self.runner is None:
                self.runner = threading.Thread(target=self._run_queue, args=(at_once,), daemon=True)
                self.runner.start()

    def _run_queue(self, at_once):
        while True:
            with self.lock:
                if not self.queue:
                    self.runner = None
                    return
                if sum(p.poll() is None for p, _, _ in self.procs.values()) < at_once:
                    self._start(self.queue.pop(0), nice=True)
                    continue
            time.sleep(0.2)  # whichever running process ends first frees the slot

    def start(self, code):
        """Start ``code`` now, at normal priority, unless it was started already (a test is waiting for it)."""
        with self.lock:
            if code in self.queue:
                self.queue.remove(code)
            if code not in self.procs:
                self._start(code, nice=False)

    def result(self, code, timeout):
        """(returncode, stdout, stderr) of ``code``'s process, started now if it was not started yet."""
        self.start(code)
        with self.lock:
            proc, out, err = self.procs[code]
        proc.wait(timeout=timeout)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read()

    def stop(self):
        with self.lock:
            self.queue.clear()
            for proc, _, _ in self.procs.values():
                if proc.poll() is None:
                    proc.kill()


JOBS = _Jobs()


def compile_main(test_module, kernels_module, arch):
    """Subprocess entry: compile every variant of ``test_module.VARIANTS`` for one arch, one JSON line each."""
    import tests.triton_compile as tc

    variants = importlib.import_module(test_module).VARIANTS
    mod = importlib.import_module(kernels_module)
    for label, fn_name, sig, constexprs, div, num_warps in variants:
        row = dict(label=label, kernel=fn_name, arch=arch, num_warps=num_warps)
        try:
            res = tc.compile_for_gpu(getattr(mod, fn_name), sig, constexprs, arch=arch, num_warps=num_warps,
                                     num_stages=1, divisible=div)
            row.update(ok=True, registers=res.registers, spills=res.spills, shared=res.shared_bytes)
        except Exception as exc:  # reported, then asserted on in the parent
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:400]}")
        print("VARIANT " + json.dumps(row), flush=True)


def job_rows(name):
    """The ``VARIANT`` rows of the named compile job (:data:`COMPILE_JOBS`), from its background run if the session
    started one; its processes not started yet are all started before the first is awaited (in parallel)."""
    codes = job_codes(name)
    for code in codes:
        JOBS.start(code)
    rows = []
    for code in codes:
        rc, stdout, stderr = JOBS.result(code, timeout=1800)
        assert rc == 0, stderr[-3000:]
        rows += [json.loads(line[8:]) for line in stdout.splitlines() if line.startswith("VARIANT ")]
    return rows


def print_rows(report):
    """For the compile reports that return a list of rows: one ``VARIANT`` line each (see job_rows)."""
    for row in report:
        print("VARIANT " + json.dumps(row), flush=True)


def check_all_compile(name, test_module):
    """The elementwise ops' check: every variant of ``test_module.VARIANTS`` compiles for both arches, spill-free,
    within shared memory (job ``name`` of :data:`COMPILE_JOBS`)."""
    n = len(importlib.import_module(test_module).VARIANTS)
    rows = job_rows(name)
    assert len(rows) == 2 * n, rows
    for r in rows:
        print(r)  # shown with -s: registers / spills / shared per variant
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    for r in rows:
        assert r["spills"] == 0, r
        assert r["shared"] <= SMEM_LIMIT[r["arch"]], r
    return rows
