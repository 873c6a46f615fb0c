"""Multi-device encode (engine.multi_device) fails loudly: a worker that cannot load the model, or dies mid-chunk,
or a script without the ``__main__`` guard raises one clear error instead of encoding without that device or waiting
for ever; and no more workers start than there are chunks. Every test runs under a deadline, so a regression fails
instead of hanging the suite."""
import os
import signal
import subprocess
import sys
import time
import types
from contextlib import contextmanager

import pytest
import torch
from transformers import LlamaModel

from engine import Encoder
from engine.config import ModelConfig
from engine.modeling import load_tokenizer

from .helpers import ROOT, run_cmd, tiny_llama_config

DEADLINE_S = 120  # a worker imports torch and transformers: about 10 s on two busy cores
TEXTS = ["A man is playing a guitar.", "Dogs.", "Three children are playing football in a large green park today.",
         "The stock market fell sharply on Monday after the announcement.", "Hi"]


class DiesInForward(LlamaModel):
    """A decoder whose forward kills its process, as the OOM killer or a segfault would mid-chunk (spawned workers
    unpickle it from this module)."""

    def forward(self, *args, **kwargs):
        os._exit(3)


class LoadsSlowly(LlamaModel):
    """A decoder whose move to the meta device takes a minute (a worker stuck while loading)."""

    def to(self, *args, **kwargs):
        if "meta" in map(str, args):
            time.sleep(60)
        return super().to(*args, **kwargs)


class DiesLoadingOnMeta(LlamaModel):
    """A decoder whose move to the meta device kills its process a moment later (the OOM killer while a worker
    loads its copy), after the other worker has loaded and waits for the go."""

    def to(self, *args, **kwargs):
        if "meta" in map(str, args):
            import time

            time.sleep(2)
            os._exit(137)
        return super().to(*args, **kwargs)


@contextmanager
def deadline(seconds=DEADLINE_S):
    """SIGALRM raises in the main thread, which waits on the pool's results: a hung encode fails the test."""
    def expire(signum, frame):
        raise TimeoutError(f"multi-device encode still waiting after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(name_or_path="smollm2-135m"))


def _encoder(tok, cls=LlamaModel):
    torch.manual_seed(0)
    model = LlamaModel(tiny_llama_config(vocab_size=len(tok), hidden_size=48, num_attention_heads=4,
                                         num_key_value_heads=2))
    model.__class__ = cls
    return Encoder(model, tok, device="cpu")


@pytest.mark.slow
def test_a_device_that_cannot_load_the_model_fails_the_encode(tok):
    """cuda:99 fails in its worker's start (no CUDA here; no such GPU elsewhere): the old pool replaced that worker
    with one waiting on an empty device queue and let the CPU worker encode everything."""
    enc = _encoder(tok)
    with deadline(), pytest.raises(RuntimeError, match=r"the worker for cuda:99 failed to start \(\w+"):
        enc.encode(TEXTS * 2, batch_size=1, device=["cpu", "cuda:99"])  # 3 chunks of 4: both workers start
    out = enc.encode(TEXTS, convert_to_tensor=True)  # the encoder still works, on its own device
    assert out.shape == (len(TEXTS), 48) and enc.device == torch.device("cpu")


@pytest.mark.slow
def test_a_worker_that_dies_mid_chunk_fails_the_encode(tok):
    """The old pool lost the dead worker's chunk and waited for its result for ever."""
    enc = _encoder(tok, DiesInForward)
    with deadline(), pytest.raises(RuntimeError, match="a worker process died .*__main__"):
        enc.encode(TEXTS * 2, batch_size=1, device=["cpu", "cpu"])


@pytest.mark.slow
def test_a_worker_killed_while_loading_fails_the_encode(tok):
    """The other worker already waits for the go: the pool terminates it, and the parent must not wait for it to
    acknowledge anything (with a multiprocessing Barrier it waited for ever in the barrier's notify)."""
    enc = _encoder(tok, DiesLoadingOnMeta)
    with deadline(), pytest.raises(RuntimeError, match="a worker process died"):
        enc.encode(TEXTS * 2, batch_size=1, device=["cpu", "meta"])


@pytest.mark.slow
def test_no_more_workers_than_chunks(tok, monkeypatch):
    """Each worker loads the model: one chunk on three devices starts one process (the old pool started three)."""
    from multiprocessing.context import SpawnProcess

    started, start = [], SpawnProcess.start
    monkeypatch.setattr(SpawnProcess, "start", lambda self: (started.append(self), start(self))[1])
    enc = _encoder(tok)
    ref = enc.encode(TEXTS, convert_to_tensor=True)
    with deadline():
        out = enc.encode(TEXTS, device=["cpu", "cpu", "cpu"], convert_to_tensor=True)  # 5 texts: one chunk
    assert len(started) == 1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_model_with_fused_ops_reaches_the_workers(tok):
    """engine.fused_ops patches a loaded model in place (its norms' and MLPs' forwards, its family's RoPE function).
    The patched forwards were bound methods, which pickle as getattr(module, "_norm_forward"), a name the module
    lacks: the worker could not load the model. On transformers 5.2 each attention module also keeps the unpatched
    RoPE function (rotary_fn), which pickle refused once the patch held its name."""
    from engine.fused_ops import apply_fused_ops

    enc = _encoder(tok)
    counts = apply_fused_ops(enc.model, "auto")  # auto on CPU: the kernels would run on CUDA, torch here
    assert counts["rms_norm"] and counts["glu"] and counts["rope"], counts
    ref = enc.encode(TEXTS, convert_to_tensor=True)
    with deadline():
        out = enc.encode(TEXTS, device=["cpu", "cpu"], convert_to_tensor=True)  # 5 texts: one chunk, one worker
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


_UNGUARDED_SCRIPT = """
import torch
from transformers import LlamaModel
from engine import Encoder
from engine.config import ModelConfig
from engine.modeling import load_tokenizer
from tests.helpers import tiny_llama_config
tok = load_tokenizer(ModelConfig(name_or_path="smollm2-135m"))
model = LlamaModel(tiny_llama_config(vocab_size=len(tok), hidden_size=48, num_attention_heads=4, num_key_value_heads=2))
Encoder(model, tok, device="cpu").encode(["a few words"] * 8, batch_size=1, device=["cpu", "cpu"])
print("encoded")
"""


@pytest.mark.slow
def test_a_script_without_the_main_guard_fails_with_a_hint(tmp_path):
    """Spawned workers re-run an unguarded script, whose own encode cannot start processes while bootstrapping: the
    workers die at start. The old pool restarted them endlessly."""
    script = tmp_path / "unguarded.py"
    script.write_text(_UNGUARDED_SCRIPT)
    try:
        r = run_cmd(["python", str(script)], env={"PYTHONPATH": ROOT}, timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"an unguarded multi-device script still ran after {DEADLINE_S} s")
    assert r.returncode != 0 and "encoded" not in r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: encode on devices ['cpu', 'cpu']: a worker process died") and "__main__" in last


def test_the_parent_frees_its_cached_gpu_memory_before_the_workers_start(monkeypatch):
    """The weights go to the CPU for shipping: the blocks they left in the parent's CUDA cache are released (else
    they stay reserved on its home GPU, where a worker loads its own copy)."""
    import types

    from engine import multi_device

    events = []

    class Model:  # a model on a GPU, as far as encode_multi_device can tell
        def parameters(self):
            yield types.SimpleNamespace(device=torch.device("cuda", 0))

        def to(self, device):
            events.append(f"to {device}")
            return self

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))
    monkeypatch.setattr(multi_device, "_encode_in_pool", lambda *a: events.append(f"pool on {a[5]}"))
    enc = types.SimpleNamespace(model=Model(), tokenizer=None, device=torch.device("cuda", 0))
    multi_device.encode_multi_device(enc, ["a"], [""], ["cuda:0", "cuda:1"], {}, {})
    assert events == ["to cpu", "empty_cache", "pool on ['cuda:0']", "to cuda:0"]  # one text: one chunk, one worker


_UNPICKLABLE_SCRIPT = """
import threading, time
import psutil
from transformers import LlamaModel
from engine import Encoder
from engine.config import ModelConfig
from engine.modeling import load_tokenizer
from tests.helpers import tiny_llama_config
if __name__ == "__main__":
    tok = load_tokenizer(ModelConfig(name_or_path="smollm2-135m"))
    model = LlamaModel(tiny_llama_config(vocab_size=len(tok), hidden_size=48, num_attention_heads=4,
                                         num_key_value_heads=2))
    enc = Encoder(model, tok, device="cpu")
    enc.tokenizer.lock = threading.Lock()  # state that cannot be pickled
    t = time.monotonic()
    try:
        enc.encode(["a few words"] * 100, batch_size=8, device=["cpu", "cpu"])
        print("encoded")
    except Exception as e:
        print(f"{type(e).__name__}: {e}")
    print(f"seconds {time.monotonic() - t:.1f}")
    print("children", [p.pid for p in psutil.Process().children(recursive=True)])
"""


@pytest.mark.slow
def test_a_state_the_workers_cannot_receive_fails_at_once_and_leaves_no_process(tmp_path):
    """The queue pickled the state in its feeder thread, which printed the error and dropped it: the workers waited
    for it for ever, the parent for them, and the workers outlived it. It is pickled before any worker starts."""
    script = tmp_path / "unpicklable.py"
    script.write_text(_UNPICKLABLE_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and any worker it left
        proc.communicate()
        pytest.fail(f"an encode whose state cannot be pickled still waited after {DEADLINE_S} s")
    lines = out.strip().splitlines()
    assert lines[0] == ("RuntimeError: encode on devices ['cpu', 'cpu']: cannot send the model to the worker "
                        "processes: the state (model, tokenizer, settings) cannot be pickled (TypeError: cannot "
                        "pickle '_thread.lock' object)"), out + err
    assert float(lines[1].split()[1]) < 5 and lines[2] == "children []", out
    assert "Traceback" not in err, err


def test_a_state_too_big_for_shared_memory_names_the_size_and_the_remedy(tok, monkeypatch):
    """A /dev/shm too small for the weights (Docker's 64 MB default) failed in the queue's feeder thread, unseen;
    it is one error, before any worker starts, naming the size and Docker's remedy."""
    from multiprocessing.reduction import ForkingPickler

    from engine import multi_device

    def no_space(obj, protocol=None):
        raise RuntimeError("unable to allocate shared memory(shm) for file </torch_1_2_0>: No space left on "
                           "device (28)")

    def no_pool(*args, **kwargs):
        raise AssertionError("a worker pool started for a state that cannot be sent")

    monkeypatch.setattr(ForkingPickler, "dumps", no_space)
    monkeypatch.setattr(multi_device, "ProcessPoolExecutor", no_pool)
    enc = _encoder(tok)
    size = sum(t.numel() * t.element_size() for t in enc.model.state_dict().values()) / 2**30
    with pytest.raises(RuntimeError, match=rf"its {size:.2f} GiB of weights do not fit in shared memory .*No space "
                                           rf"left on device.*--shm-size=<more than {size:.1f}g> or --ipc=host"):
        enc.encode(TEXTS * 2, batch_size=1, device=["cpu", "cpu"])


def test_a_worker_waiting_for_its_state_exits_when_the_parent_is_gone(monkeypatch):
    """A worker waited in a bare ``states.get()``: with the parent gone, for ever. It polls, and exits."""
    import queue

    from engine import multi_device

    def exit_(code):
        raise SystemExit(code)

    monkeypatch.setattr(multi_device.os, "_exit", exit_)
    monkeypatch.setattr(multi_device, "_WORKER_POLL_S", 0.01)
    with pytest.raises(SystemExit):
        multi_device._get(queue.Queue(), types.SimpleNamespace(is_alive=lambda: False))
    q = queue.Queue()
    q.put("state")
    assert multi_device._get(q, types.SimpleNamespace(is_alive=lambda: True)) == "state"


@pytest.mark.slow
def test_a_worker_that_never_loads_fails_the_encode_by_a_deadline_and_is_killed(tok, monkeypatch):
    """The parent waited for every worker's "loaded" without a deadline; past it the call fails, and no worker
    (the one still loading, the one waiting for the go) outlives it."""
    import multiprocessing

    from engine import multi_device

    monkeypatch.setattr(multi_device, "_START_TIMEOUT_S", 2)
    enc = _encoder(tok, LoadsSlowly)
    t = time.monotonic()
    with deadline(), pytest.raises(RuntimeError, match=r"for \[.*'meta'\] had not loaded the model after 2 s"):
        enc.encode(TEXTS * 2, batch_size=1, device=["cpu", "meta"])
    assert time.monotonic() - t < 50 and multiprocessing.active_children() == []


def test_a_gathered_chunks_rows_are_freed_once_copied():
    """The futures list kept every finished chunk's rows (a shared-memory tensor each) until the encode returned:
    twice the output at the end, half of it in /dev/shm (1M texts of a 7B: about 16 GB more). Each chunk's rows are
    now dropped once copied: when the k-th chunk is counted, no earlier chunk's rows live."""
    import gc
    import weakref
    from concurrent.futures import Future

    from engine.multi_device import _gather

    def chunks(n, width):
        futures, refs = [], []
        for i in range(n):
            emb = torch.full((2, width), float(i))
            refs.append(weakref.ref(emb))
            f = Future()
            f.set_result((2 * i, emb, {"truncated": 1}))
            futures.append(f)
        return futures, refs

    futures, refs = chunks(5, 3)
    alive = []

    class Bar:
        def update(self, k):
            gc.collect()
            alive.append(sum(r() is not None for r in refs))

    stats = {}
    out = _gather(futures, 10, stats, Bar())
    assert out.tolist() == [[float(i)] * 3 for i in range(5) for _ in range(2)] and stats == {"truncated": 5}
    assert alive == [5, 4, 3, 2, 1]  # the chunk being counted and those not gathered yet: none counted before it
    gc.collect()
    assert not any(r() is not None for r in refs)
