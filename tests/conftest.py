import os
import sys

# Triton decides between compiling and interpreting when a kernel is decorated, so the interpreter
# must be switched on before anything imports `llm2vec_kernels`. On a CUDA machine (GPU tests) leave it off.
if os.environ.get("LLM2VEC_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No model hub is reachable here or in CI: a test that reaches for one fails at once instead of retrying for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The item cache (engine.token_cache) of this test session, children included: tests never fill the user's cache
# nor reuse an entry a previous session left.
if "LLM2VEC_ENGINE_TOKEN_CACHE" not in os.environ:
    import tempfile

    os.environ["LLM2VEC_ENGINE_TOKEN_CACHE"] = tempfile.mkdtemp(prefix="llm2vec-test-token-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers.utils.logging  # noqa: E402

# transformers gives its log handler the sys.stderr of the moment it is first asked for a logger. Inside a test that
# is the test's captured stream, closed when the test ends: a later test's transformers warning then fails as a
# "--- Logging error ---" traceback on stderr (order-dependent: tests/test_cli_errors.py). Ask now, at collection,
# when sys.stderr is the session's.
transformers.utils.logging.get_logger("transformers")


@pytest.fixture(scope="session")
def gemma2_gpu_run_rehearsal(tmp_path_factory):
    """benchmarks/gpu_run.sh's CPU rehearsal on Gemma2's structure (GPU_RUN_ARCH=gemma2-9b; GPU_RUN_SKIP leaves the
    GPU tests out), run once for the session: (its $OUT, the TMPDIR it ran under, the finished process). Its steps
    include the attention benchmark's tiny CPU run (`bench_attention --tiny --plot`), whose rows
    test_attention.py checks; test_bench_train_step.py checks the run itself."""
    from tests.helpers import ROOT, run_cmd

    base = tmp_path_factory.mktemp("gpu_run_gemma2")
    out, scratch = base / "out", base / "tmp"
    scratch.mkdir()
    r = run_cmd(["bash", os.path.join(ROOT, "benchmarks", "gpu_run.sh")],
                env={"GPU_RUN_CPU": "1", "GPU_RUN_ARCH": "gemma2-9b", "OUT": str(out), "GPU_RUN_SKIP": "pytest_gpu",
                     "TMPDIR": str(scratch)},
                timeout=400)
    return out, scratch, r


def _compile_job(item):
    marker = item.get_closest_marker("compile_check")
    return marker.args[0] if marker else None


def pytest_collection_modifyitems(config, items):
    # The compile checks run last: their subprocesses run in the background from the start (pytest_collection_finish)
    items.sort(key=lambda item: _compile_job(item) is not None)  # stable: the order is otherwise unchanged
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") == "0":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with LLM2VEC_TEST_GPU=1 on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session):
    """Start the selected compile checks' subprocesses (tests.compile_variants.COMPILE_JOBS) in the background, at
    the lowest CPU priority, two at a time; the longest (attention) first. Not on a GPU machine, which skips them."""
    if os.environ.get("LLM2VEC_TEST_GPU", "0") == "1" or session.config.getoption("collectonly"):
        return
    from tests.compile_variants import JOBS, job_codes

    names = {_compile_job(item) for item in session.items} - {None}
    codes = [code for name in sorted(names, key=lambda n: n != "attention") for code in job_codes(name)]
    if codes:
        JOBS.background(codes)


def pytest_sessionfinish(session, exitstatus):
    if "tests.zygote" in sys.modules:
        sys.modules["tests.zygote"].stop()
    if "tests.compile_variants" in sys.modules:
        sys.modules["tests.compile_variants"].JOBS.stop()
