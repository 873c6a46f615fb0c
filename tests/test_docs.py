"""docs/*.md and README.md against the tree: what a contributor or a user is told to open or extend exists under
that name, and the hand-written lists of families are the family table's."""
import glob
import os
import re

import pytest

from .helpers import ROOT

DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))) + [os.path.join(ROOT, "README.md")]
CODE = re.compile(r"`([^`]+)`")


def _tests_defined():
    names = set()
    for path in glob.glob(os.path.join(ROOT, "tests", "*.py")):
        with open(path) as f:
            names.update(re.findall(r"^def (test_\w+)", f.read(), re.M))
    return names


@pytest.mark.parametrize("doc", DOCS, ids=os.path.basename)
def test_the_docs_name_files_and_tests_that_exist(doc):
    with open(doc) as f:
        spans = CODE.findall(f.read())
    words = [w for s in spans for w in s.split()]  # a command's paths too (`python -m pytest tests/x.py ...`)
    paths = [w.rstrip(",;:)").rstrip("/").split("::")[0] for w in words if "/" in w and not re.search(r"[<{…*]", w)
             and re.match(r"^(\.ci|benchmarks|configs|data|docs|engine|llm2vec_kernels|tests)(/|$)", w)]
    tests = [s for s in spans if re.fullmatch(r"test_\w+", s)]
    tests += [t for s in spans for t in re.findall(r"::(test_\w+)", s)]  # tests/x.py::test_y
    assert paths, "the doc names no file of the tree: the pattern above no longer reads it"
    missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, f"{os.path.basename(doc)} names files that do not exist: {missing}"
    unknown = sorted(set(tests) - _tests_defined())
    assert not unknown, f"{os.path.basename(doc)} names tests that do not exist: {unknown}"


def test_the_hand_written_family_lists_are_the_table():
    """The README's first paragraph and the family guide list the supported model types by hand: they must be
    engine.bidirectional.SUPPORTED_ARCHITECTURES' keys, no more and no fewer."""
    from engine.bidirectional import SUPPORTED_ARCHITECTURES

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = " ".join(f.read().split())
    with open(os.path.join(ROOT, "docs", "adding-a-model-family.md"), encoding="utf-8") as f:
        guide = " ".join(f.read().split())
    lists = {"README.md": re.search(r"\(model types (.*?); SmolLM is a Llama\)", readme),
             "docs/adding-a-model-family.md": re.search(r"a transformers `model_type` \((.*?) today\)", guide)}
    for where, listing in lists.items():
        assert listing, f"{where}: the family list is no longer where this test reads it"
        assert set(re.findall(r"`(\w+)`", listing.group(1))) == set(SUPPORTED_ARCHITECTURES), (where, listing.group(1))
