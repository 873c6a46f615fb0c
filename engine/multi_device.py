"""``Encoder.encode(..., device=["cuda:0", "cuda:1", ...])``: one worker process per device over chunks.

The parent sorts nothing: it cuts the inputs into chunks, the workers (spawned, each holding a copy of the
model on its device) encode them, and the parent writes every chunk's rows back at its input positions, so
the result is in input order whatever the worker speeds. Counts (truncated, empty) are summed.
"""
import os

import torch

_WORKER = {}


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


def _init(state, device_queue):
    import llm2vec_kernels

    from .bidirectional import register

    register()  # the bidirectional attention lives in a registry that a fresh process does not have yet
    llm2vec_kernels.set_default_impl("attention", state["attention"])
    device = torch.device(device_queue.get())
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
    q = ctx.Queue()
    for d in devices:
        q.put(str(d))
    model = encoder.model
    home = next(model.parameters()).device
    if home.type != "cpu":
        model = model.to("cpu")  # ship CPU weights (in place); each worker moves its copy to its own device
    try:
        return _encode_in_pool(ctx, model, encoder, texts, jobs, devices, q, stats, show_progress_bar)
    finally:
        if home.type != "cpu":  # the encoder's model back where it was: later single-device calls run there
            model.to(home)


def _encode_in_pool(ctx, model, encoder, texts, jobs, devices, q, stats, show_progress_bar):
    state = {"model": model, "tokenizer": encoder.tokenizer, "attention": getattr(encoder, "attention", "auto"),
             "cpu_workers": sum(torch.device(d).type == "cpu" for d in devices)}
    out = None
    bar = None
    if show_progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc=f"encode x{len(devices)}", unit="text")
    with ctx.Pool(len(devices), initializer=_init, initargs=(state, q)) as pool:
        for start, emb, st in pool.imap_unordered(_work, jobs):
            if out is None:
                out = torch.empty(len(texts), emb.shape[-1], dtype=torch.float32)
            out[start:start + emb.shape[0]] = emb
            for k, v in st.items():
                stats[k] = stats.get(k, 0) + v
            if bar is not None:
                bar.update(emb.shape[0])
    if bar is not None:
        bar.close()
    return out
