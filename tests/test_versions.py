"""Versions that hold (issue 23): setup.py's bounds are what the export needs, and the installed stack meets them."""
import ast
import importlib.metadata
import os

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from .helpers import ROOT, inside_repo


def _setup_keywords(*names):
    """{keyword: value} of setup.py's setup() call for ``names`` (read as literals, not executed)."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        call = next(n for n in ast.walk(ast.parse(f.read())) if isinstance(n, ast.Call) and
                    getattr(n.func, "id", "") == "setup")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in names}


def _requirements():
    """{name: Requirement} of setup.py's install_requires and every extra."""
    kw = _setup_keywords("install_requires", "extras_require")
    reqs = {}
    for spec in kw["install_requires"] + [s for extra in kw["extras_require"].values() for s in extra]:
        r = Requirement(spec)
        assert str(reqs.get(r.name, r).specifier) == str(r.specifier), f"{r.name} bounded two ways in setup.py"
        reqs[r.name] = r
    return reqs


def test_transformers_floor_is_the_export_floor_and_installed():
    from engine.export import TRANSFORMERS_FLOOR

    spec = _requirements()["transformers"].specifier
    floors = [s.version for s in spec if s.operator == ">="]
    assert floors == [TRANSFORMERS_FLOOR], spec
    assert not spec.contains("5.1.0") and not spec.contains("4.57.6")  # those load an export causally
    assert spec.contains(importlib.metadata.version("transformers"), prereleases=True)


@pytest.mark.parametrize("name", ["sentence-transformers", "mteb"])
def test_sentence_transformers_and_mteb_are_bounded_and_installed(name):
    spec = _requirements()[name].specifier
    assert any(s.operator == ">=" for s in spec) and any(s.operator == "<" for s in spec), spec  # a floor and a ceiling
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{name} is not installed")
    assert spec.contains(installed, prereleases=True), (name, installed, str(spec))
    major = Version(installed).major
    assert not spec.contains(f"{major + 1}.0.0")


def test_an_export_is_bidirectional_under_the_installed_transformers(tmp_path):
    pytest.importorskip("sentence_transformers")
    from transformers import AutoModel, AutoTokenizer

    from engine.config import ModelConfig
    from engine.export import export
    from engine.modeling import load_tokenizer

    from .test_encoder import _save_adapter, _save_base

    tok = load_tokenizer(ModelConfig(name_or_path="smollm2-135m"))
    base = _save_base(str(tmp_path / "base"), tok)
    _save_adapter(base, str(tmp_path / "adapter"), str(tmp_path / "base"), seed=1)
    export(str(tmp_path / "adapter"), str(tmp_path / "exp"))
    model = AutoModel.from_pretrained(str(tmp_path / "exp")).eval()
    assert AutoTokenizer.from_pretrained(str(tmp_path / "exp"))("a b")["input_ids"]  # the tokenizer loads
    ids = torch.tensor([[11, 222, 3333, 444, 55, 6]])
    changed = ids.clone()
    changed[0, -1] = 7777
    with torch.no_grad():
        h, h2 = (model(input_ids=x).last_hidden_state[0] for x in (ids, changed))
    delta = (h[:-1] - h2[:-1]).abs().amax(dim=-1)
    assert bool((delta > 1e-4).all()), delta  # every earlier position sees the last token: not causal


def _top_level_names(dist):
    """The top-level import names a distribution installs (its top_level.txt, else its files' first parts)."""
    text = dist.read_text("top_level.txt")
    if text:
        return {n.strip() for n in text.split() if n.strip()}
    return {f.parts[0].removesuffix(".py") for f in (dist.files or [])
            if not f.parts[0].endswith((".dist-info", ".egg-info", ".data", ".pth")) and f.parts[0] != ".."}


def test_our_packages_shadow_no_installed_distribution():
    """setup.py's packages are top-level names; none may be one that another installed distribution provides
    (transformers 5.25 requires Hugging Face's `kernels`, which our former `kernels/` shadowed from the repo root,
    and `import transformers.activations` failed)."""
    ours = set(_setup_keywords("packages")["packages"])
    assert ours and all(os.path.isdir(os.path.join(ROOT, p)) for p in ours)
    assert not os.path.exists(os.path.join(ROOT, "kernels")), "a top-level kernels/ shadows Hugging Face's kernels"
    taken = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        if name.replace("_", "-").lower() == "llm2vec-engine":
            continue
        for top in _top_level_names(dist):
            taken.setdefault(top, name)
    clash = {p: taken[p] for p in ours if p in taken}
    assert not clash, f"top-level names also installed by other distributions: {clash}"


def test_transformers_imports_from_the_repo_root():
    """With the repository root first on sys.path (as `python -m engine...` and pytest have it), transformers'
    own imports resolve: nothing here shadows a module it imports, Hugging Face's `kernels` among them."""
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, '.'); import transformers.activations, importlib.util; "
            "s = importlib.util.find_spec('kernels'); "
            "print('none' if s is None else s.origin)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    origin = out.stdout.strip().splitlines()[-1]
    assert origin == "none" or not inside_repo(origin), origin
