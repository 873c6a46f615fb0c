"""docs/*.md against the tree: what a contributor is told to open or extend exists under that name."""
import glob
import os
import re

import pytest

from .helpers import ROOT

DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
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
    paths = [w.rstrip("/") for w in words if "/" in w and not re.search(r"[<{…*]", w)
             and re.match(r"^(\.ci|benchmarks|configs|data|docs|engine|llm2vec_kernels|tests)(/|$)", w)]
    tests = [s for s in spans if re.fullmatch(r"test_\w+", s)]
    assert paths, "the doc names no file of the tree: the pattern above no longer reads it"
    missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, f"{os.path.basename(doc)} names files that do not exist: {missing}"
    unknown = sorted(set(tests) - _tests_defined())
    assert not unknown, f"{os.path.basename(doc)} names tests that do not exist: {unknown}"
