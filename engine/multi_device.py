"""``Encoder.encode(..., device=["cuda:0", "cuda:1", ...])``: one worker process per device over chunks.

The parent sorts nothing: it cuts the inputs into chunks, the workers (spawned, each holding a copy of the
model on its device) encode them, and the parent writes every chunk's rows back at its input positions, so
the result is in input order whatever the worker speeds. Counts (truncated, empty) are summed.

``min(devices, chunks)`` workers start (each loads the model: a device with no chunk to encode gets none), and
none encodes before all have loaded it. A worker that cannot start (a bad device index, out of memory while
loading, an import error) or that dies mid-chunk (the OOM killer, a crash, a script without the ``__main__``
guard) breaks the pool: encode raises one RuntimeError, naming the device that failed and why when the worker
could say so, instead of encoding without that device or waiting for ever. So does a model state that cannot be
sent to the workers (weights larger than /dev/shm, an unpicklable tokenizer attribute), before any worker starts;
and no worker outlives a call that failed.
"""
import multiprocessing
import os
import queue
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, as_completed, wait
from concurrent.futures.process import BrokenProcessPool

import torch

_WORKER = {}
_POLL_S = 0.05  # how often a loaded worker looks for the go flag, and the parent for the workers' state
_WORKER_POLL_S = 1.0  # how often a worker waiting for its state checks that the parent is still alive
_START_TIMEOUT_S = 1800  # the longest the parent waits for every worker to load its model (then it fails the call)
_MAIN_GUARD = ('a script that encodes on several devices must run its code under `if __name__ == "__main__":`, '
               'since each spawned worker imports the script again')


def share_cpu_cores(processes):
    """Give this process ``cores // processes`` intra-op threads, for ``processes`` CPU processes on one host.

    torch's default is one thread per core in every process: several CPU processes then run more OpenMP threads
    than cores, and those spin-wait on each other at every parallel region (two DeepSpeed CPU ranks on two cores:
    112 s a SmolLM2-135M step instead of about 4 s). An explicit OMP_NUM_THREADS is left alone, and the thread
    count is never raised. Returns (cores, threads) when it lowered the count, else None."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // max(1, processes))
    if threads >= torch.get_num_threads():
        return None
    torch.set_num_threads(threads)
    return cores, threads


def _init(device_queue, states, failures, flags):
    """Worker start: take a (slot, device) and one copy of the state (model, tokenizer, settings, pickled by the
    parent) from the queues, load the model there, mark ``flags[slot]``, then wait until the parent raises
    ``flags[-1]``, which it does once every worker has loaded: no chunk is encoded unless all the devices came up
    (whatever the timing, one bad device fails the call). A failure is put on ``failures`` as (device,
    "Type: message") before it propagates, so the parent can say which device failed and why.

    The flags are plain shared bytes, polled: a multiprocessing Barrier or Event would make the parent wait in
    ``notify`` for a waiter's wake-up that a worker killed while waiting (the pool terminates the others when one
    dies) never sends. A worker whose parent is gone (killed while it waited, or before it sent the state) exits
    instead of keeping its model or waiting on the queues for ever."""
    from multiprocessing.reduction import ForkingPickler

    parent = multiprocessing.parent_process()
    slot, device = _get(device_queue, parent)
    try:
        _load(ForkingPickler.loads(_get(states, parent)), torch.device(device))
    except BaseException as e:
        failures.put((device, f"{type(e).__name__}: {e}"))
        raise
    flags[slot] = 1
    while not flags[-1]:
        if parent is not None and not parent.is_alive():
            os._exit(1)
        time.sleep(_POLL_S)


def _get(q, parent):
    """The next item of ``q``, polled: a worker whose parent died exits (a bare ``get`` would wait for ever)."""
    while True:
        try:
            return q.get(timeout=_WORKER_POLL_S)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                os._exit(1)


def _load(state, device):
    import llm2vec_kernels

    from .bidirectional import register

    register()  # the bidirectional attention lives in a registry that a fresh process does not have yet
    llm2vec_kernels.set_default_impl("attention", state["attention"])
    if device.type == "cpu":
        share_cpu_cores(state["cpu_workers"])
    model = state["model"].to(device).eval()
    _WORKER.update(model=model, tokenizer=state["tokenizer"], device=device)


def _work(job):
    from .encoding import encode_texts

    start, texts, instrs, kw = job
    stats = {}
    emb = encode_texts(_WORKER["model"], _WORKER["tokenizer"], texts, instruction=instrs, device=_WORKER["device"],
                       stats=stats, **kw)
    return start, emb, stats


def encode_multi_device(encoder, texts, instrs, devices, kw, stats, show_progress_bar=False, chunk_size=None):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    chunk_size = chunk_size or max(kw.get("batch_size", 32) * 4, -(-len(texts) // (4 * len(devices))))
    jobs = [(s, texts[s:s + chunk_size], instrs[s:s + chunk_size], kw) for s in range(0, len(texts), chunk_size)]
    devices = [str(d) for d in devices[:len(jobs)]]  # no worker (and no model copy) for a device without a chunk
    model = encoder.model
    home = next(model.parameters()).device
    if home.type != "cpu":
        model = model.to("cpu")  # ship CPU weights (in place); each worker moves its copy to its own device
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the parent's cached blocks would stay reserved on its home GPU
    try:
        return _encode_in_pool(ctx, model, encoder, texts, jobs, devices, stats, show_progress_bar)
    finally:
        if home.type != "cpu":  # the encoder's model back where it was: later single-device calls run there
            model.to(home)


def _encode_in_pool(ctx, model, encoder, texts, jobs, devices, stats, show_progress_bar):
    """The chunks' rows at their input positions, from one worker per device (``len(devices) <= len(jobs)``).

    The state travels through a queue, not as the pool's initargs: spawn writes a new process's arguments into a
    pipe whose reading end the parent itself keeps open until the write is done, so a child that dies before
    reading them all (a script without the ``__main__`` guard dies while re-importing itself) would block the
    parent in ``submit`` for ever once they exceed the pipe's 64 KiB. It is pickled here, before any worker starts
    (one copy per worker: each copy's shared-memory handles can be taken once): a state that cannot be sent (a
    /dev/shm too small for the weights, an unpicklable tokenizer attribute) raises one error at once, where the
    queue's own pickling in its feeder thread would only print it and leave the workers waiting for ever. The
    workers never outlive a failed call: they are killed on every error path (a chunk that raised, a worker that
    died, a start-up past ``_START_TIMEOUT_S``, an interrupt)."""
    import llm2vec_kernels

    attention = getattr(encoder, "attention", None) or llm2vec_kernels.get_default_impl("attention")
    state = {"model": model, "tokenizer": encoder.tokenizer, "attention": attention,
             "cpu_workers": sum(torch.device(d).type == "cpu" for d in devices)}
    payloads = [_serialise_state(state, devices) for _ in devices]
    device_queue, states, failures = ctx.Queue(), ctx.Queue(), ctx.Queue()
    flags = ctx.RawArray("b", len(devices) + 1)  # a worker's model loaded (one per slot), then go (the last)
    states.cancel_join_thread()  # a copy that no worker took must not hold this process at exit
    for slot, (d, payload) in enumerate(zip(devices, payloads)):
        device_queue.put((slot, d))
        states.put(payload)
    del payloads
    bar = None
    if show_progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc=f"encode x{len(devices)}", unit="text")
    pool = ProcessPoolExecutor(len(devices), mp_context=ctx, initializer=_init,
                               initargs=(device_queue, states, failures, flags))
    done = False
    try:
        futures = [pool.submit(_work, job) for job in jobs]
        # every worker loaded, or the pool broke (only that completes a chunk before the go flag)
        give_up = time.monotonic() + _START_TIMEOUT_S
        while not all(flags[:len(devices)]) and not wait(futures, _POLL_S, FIRST_COMPLETED)[0]:
            if time.monotonic() > give_up:
                waiting = [d for slot, d in enumerate(devices) if not flags[slot]]
                raise RuntimeError(f"encode on devices {devices}: the workers for {waiting} had not loaded the model "
                                   f"after {_START_TIMEOUT_S} s; gave up")
        flags[-1] = 1
        out = _gather(futures, len(texts), stats, bar)
        done = True
        return out
    except BrokenProcessPool as e:
        raise RuntimeError(_broken_pool_message(devices, _drain(failures))) from e
    finally:
        if not done:  # no queued chunk starts, and no worker outlives the call (one may still be loading or encoding)
            for p in list((getattr(pool, "_processes", None) or {}).values()):
                p.kill()
        pool.shutdown(wait=True, cancel_futures=True)
        if not done:
            _release(_drain(states))  # the copies no worker took: their shared weights are freed
        if bar is not None:
            bar.close()


def _serialise_state(state, devices):
    """``state`` pickled for one worker (the model's CPU weights move to shared memory, sent as handles), or one
    RuntimeError saying why it cannot be sent."""
    from multiprocessing.reduction import ForkingPickler

    try:
        return bytes(ForkingPickler.dumps(state))  # a memoryview does not pickle onto the queue
    except Exception as e:
        head = f"encode on devices {devices}: cannot send the model to the worker processes"
        msg = str(e)
        if "No space left on device" in msg or "shared memory" in msg or "shm" in msg:
            size = sum(t.numel() * t.element_size() for t in state["model"].state_dict().values())
            raise RuntimeError(f"{head}: its {size / 2**30:.2f} GiB of weights do not fit in shared memory "
                               f"(/dev/shm) ({type(e).__name__}: {msg.splitlines()[0] if msg else ''}); give the "
                               f"container more (docker run --shm-size=<more than {size / 2**30:.1f}g> or "
                               f"--ipc=host), or encode on one device") from e
        raise RuntimeError(f"{head}: the state (model, tokenizer, settings) cannot be pickled "
                           f"({type(e).__name__}: {msg})") from e


def _release(payloads):
    """Unpickle (and drop) the copies that no worker took, so their shared-memory handles are closed."""
    from multiprocessing.reduction import ForkingPickler

    for payload in payloads:
        try:
            ForkingPickler.loads(payload)
        except Exception:
            pass


def _gather(futures, n, stats, bar):
    """Write each chunk's rows at its start as it completes, sum its counts into ``stats``. A worker that raised
    re-raises here; a dead one raises BrokenProcessPool. Takes the futures out of the caller's list: a finished
    future holds its chunk's rows (in shared memory) for as long as anything refers to it, so the list kept every
    chunk alive until the call returned, twice the output at the end and half of it in /dev/shm."""
    pending = set(futures)
    futures.clear()
    done = as_completed(pending)  # its own set, from which it drops each future it yields
    del pending
    out = None
    for future in done:
        start, emb, st = future.result()
        if out is None:
            out = torch.empty(n, emb.shape[-1], dtype=torch.float32)
        out[start:start + emb.shape[0]] = emb
        for k, v in st.items():
            stats[k] = stats.get(k, 0) + v
        if bar is not None:
            bar.update(emb.shape[0])
    return out


def _drain(q, wait=0.5):
    """What is left on ``q``, waiting up to ``wait`` seconds for each next item (one a dead worker sent last)."""
    got = []
    while True:
        try:
            got.append(q.get(timeout=wait))
        except queue.Empty:
            return got


def _broken_pool_message(devices, failed):
    """``failed``: the (device, error) pairs of the workers that could not start; none when a worker was killed."""
    head = f"encode on devices {devices}: "
    if failed:
        return head + "; ".join(f"the worker for {d} failed to start ({err})" for d, err in failed)
    return head + ("a worker process died (killed, e.g. by the OOM killer, or crashed) before returning its chunk; "
                   + _MAIN_GUARD)
