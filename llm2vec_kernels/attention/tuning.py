"""Opt-in autotuning of the attention launch configs: timing, and the per-GPU JSON cache.

``set_autotune(True)`` (or LLM2VEC_ATTN_AUTOTUNE=1) makes the first call per shape bucket time the candidates of
llm2vec_kernels/attention/configs.py on the real inputs and keep the fastest; the choice persists in
``tune_cache_path()`` per GPU name.
"""
import json
import os
import tempfile
import warnings

import torch
import triton

from . import configs
from .configs import _arch

_AUTOTUNE = {"on": os.environ.get("LLM2VEC_ATTN_AUTOTUNE", "0") not in ("", "0")}
_TUNED = {}  # bucket key -> (chosen config, {config: ms})
_DISK = {"loaded": None}  # path -> {bucket string: config} once read


def tune_cache_path():
    """Where tuned choices persist across runs: LLM2VEC_ATTN_TUNE_CACHE, else attention_tuned.json under
    LLM2VEC_ENGINE_CACHE (default ~/.cache/llm2vec-engine). Set LLM2VEC_ATTN_TUNE_CACHE="" to keep them in memory."""
    path = os.environ.get("LLM2VEC_ATTN_TUNE_CACHE")
    if path is not None:
        return path or None
    root = os.environ.get("LLM2VEC_ENGINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llm2vec-engine")
    return os.path.join(root, "attention_tuned.json")


def _bucket_id(key, device_name):
    return "|".join([device_name] + [str(x) for x in key])


def _read_tune_cache(path):
    try:
        with open(path) as f:
            data = json.load(f)
        # launch configs are 4-lists; dispatch buckets ("...|backend|...") hold a backend name
        return {k: (v if isinstance(v, str) else tuple(v)) for k, v in data.items()
                if (isinstance(v, str) and "|backend|" in k) or (isinstance(v, list) and len(v) == 4)}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # unreadable or corrupt: tune again, and say so once
        warnings.warn(f"ignoring the attention tune cache {path}: {exc}")
        return {}


def _write_tune_cache(path, bucket, cfg):
    # Merge with what other processes (ranks) wrote meanwhile, then replace the file atomically.
    data = {k: (v if isinstance(v, str) else list(v)) for k, v in _read_tune_cache(path).items()}
    data[bucket] = cfg if isinstance(cfg, str) else list(cfg)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"could not write the attention tune cache {path}: {exc}")


def set_autotune(enabled: bool) -> None:
    """Turn opt-in autotuning on or off for this process (already tuned buckets are kept)."""
    _AUTOTUNE["on"] = bool(enabled)


def tuned_configs():
    """{bucket: {"best": config, "ms": {config: median ms}}} for every bucket tuned so far (for benchmark logs);
    a dispatch bucket's config is a backend name."""
    name = lambda c: c if isinstance(c, str) else "x".join(map(str, c))  # noqa: E731
    return {"/".join(map(str, k)): {"best": v[0] if isinstance(v[0], str) else list(v[0]),
                                    "ms": {name(c): round(ms, 4) for c, ms in v[1].items()}}
            for k, v in _TUNED.items()}


def _tuned(kind, make_key, default, q, launch, enabled=None):
    """The config to launch ``kind`` with: ``default`` unless autotuning is on (``enabled``, else the process
    setting) for a CUDA tensor; then the fastest candidate for this bucket, timed once by calling
    ``launch(config)`` (which must be idempotent: it overwrites its outputs). ``make_key()`` builds the bucket
    key, only when tuning, so the untuned hot path never does."""
    if not ((_AUTOTUNE["on"] if enabled is None else enabled) and q.is_cuda):
        return default
    key = make_key()
    if key in _TUNED:
        return _TUNED[key][0]
    arch, dtype, block_d, dropout = key[1], key[2], key[3], key[4]
    cands = configs.tune_candidates(kind, block_d, dtype, dropout, arch)
    if default not in cands:
        cands = [default] + cands
    return _pick(key, default, cands, q, launch)


def _tuned_choice(key, default, cands, q, launch):
    """The backend for a dispatch bucket (llm2vec_kernels/attention/dispatch.py), timed once like a launch config:
    ``launch(name)`` runs that backend; ``default`` is the fixed rule's choice."""
    if key in _TUNED:
        return _TUNED[key][0]
    if default not in cands:
        cands = [default] + list(cands)
    return _pick(key, default, cands, q, launch)


def _pick(key, default, cands, q, launch):
    """The cached choice for ``key`` (this process, then the disk cache for this GPU, if it is still a candidate),
    else the fastest of ``cands``, each timed as the median of 3 calls after one untimed call (compiles)."""
    path = tune_cache_path()
    bucket = _bucket_id(key, torch.cuda.get_device_name(q.device))
    if path:
        if _DISK["loaded"] is None or _DISK["loaded"][0] != path:
            _DISK["loaded"] = (path, _read_tune_cache(path))
        if _DISK["loaded"][1].get(bucket) in cands:
            _TUNED[key] = (_DISK["loaded"][1][bucket], {})
            return _TUNED[key][0]
    timings = {}
    for cfg in cands:
        try:
            launch(cfg)  # compiles
            times = []
            for _ in range(3):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                launch(cfg)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            timings[cfg] = sorted(times)[1]
        except Exception:  # out of shared memory / registers on this device: not a candidate here
            continue
    best = min(timings, key=timings.get) if timings else default
    _TUNED[key] = (best, timings)
    if path and timings:
        _write_tune_cache(path, bucket, best)
        _DISK["loaded"][1][bucket] = best
    return best


def _tune_key(kind, q, lay, dropout_p, causal, softcap=False):
    """A callable that builds ``kind``'s bucket key; _tuned calls it only when autotuning. Soft-capped launches
    (more work per score) get buckets of their own; the others keep their keys."""
    def key():
        bucket = min(max(triton.next_power_of_2(max(lay.max_seqlen, 1)), 64), 16384)
        return (kind, _arch(q), q.dtype, lay.block_d, dropout_p > 0, bool(causal), lay.varlen, lay.group, bucket) \
            + (("softcap",) if softcap else ())
    return key
