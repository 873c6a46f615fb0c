"""llm2vec_kernels.gpu_check: the registry of per-op GPU checks, its CLI, and the new checks' harness on CPU."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import llm2vec_kernels.gpu_check as G
from llm2vec_kernels._backend import interpreter_enabled
from llm2vec_kernels.glu import glu_reference
from llm2vec_kernels.gpu_check.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ["attention", "masked_ce", "contrastive", "lora", "rms_norm", "rope", "glu"]
needs_interpreter = pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (CPU tests)")


def test_registry_lists_every_op_with_its_own_module():
    assert list(G.CHECKS) == OPS
    reg = G.registry()
    assert list(reg) == OPS
    for name, fn in reg.items():
        assert fn.__module__ == f"llm2vec_kernels.gpu_check.{name}" and fn.__name__ == "gpu_check"
    with pytest.raises(KeyError, match="unknown gpu check"):
        G.check_function("softmax")


@pytest.mark.parametrize("name", OPS)
def test_each_check_refuses_cleanly_without_cuda(name, monkeypatch):
    mod = importlib.import_module(f"llm2vec_kernels.gpu_check.{name}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(G.NeedsCuda, match=f"gpu_check {name} needs CUDA"):
        mod.gpu_check()


def test_cli_without_cuda_records_each_refusal_and_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "c.json"
    assert main(["--json", str(out), "rope", "lora"]) == 2
    cap = capsys.readouterr()
    assert cap.err.strip().splitlines() == ["llm2vec_kernels.gpu_check: the GPU checks need CUDA (no CUDA device here)"]
    assert "Traceback" not in cap.out + cap.err
    data = json.loads(out.read_text())
    assert list(data) == ["rope", "lora"] and all(v["error"].startswith("NeedsCuda") for v in data.values())


def test_cli_bad_input_one_line_exit_2(capsys):
    assert main(["softmax"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown check(s) softmax" in err[0]


def test_cli_runs_a_registered_check_and_reports_failures(monkeypatch, tmp_path, capsys):
    fake = {"glu": [{"op": "glu", "case": "a", "ok": True, "max_err": float("nan")}],
            "rope": [{"op": "rope", "case": "b", "ok": False, "max_err": 1.0}]}
    monkeypatch.setattr("llm2vec_kernels.gpu_check.__main__.check_function", lambda n: lambda: fake[n])
    out = tmp_path / "c.json"
    assert main(["--json", str(out), "glu"]) == 0
    assert main(["--json", str(out), "glu", "rope"]) == 1
    text = capsys.readouterr().out
    assert "gpu_check glu: 1/1 ok" in text and "gpu_check rope: 0/1 ok" in text and "FAIL" in text
    assert json.loads(out.read_text())["glu"][0]["max_err"] == "nan"  # non-finite floats as strings


def test_module_entry_lists_the_checks():
    r = subprocess.run([sys.executable, "-m", "llm2vec_kernels.gpu_check", "--list"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0 and r.stdout.split() == OPS, r.stderr


@needs_interpreter
def test_new_checks_pass_at_tiny_shapes_in_the_interpreter():
    from llm2vec_kernels.gpu_check import glu, rms_norm, rope

    f16 = torch.float16
    rows = rms_norm.gpu_check(cases=[("llama", 37, 96, False, True, f16), ("gemma", 5, 64, True, False, f16)],
                              device="cpu")
    assert [(r["case"], r["tensor"]) for r in rows] == [("llama", "y"), ("llama", "dx"), ("llama", "dweight"),
                                                        ("gemma", "y"), ("gemma", "dx")]
    rows += rope.gpu_check(cases=[("strided", 2, 4, 2, 13, 32, f16, True), ("mqa", 1, 3, 1, 5, 16, f16, False)],
                           device="cpu")
    rows += glu.gpu_check(cases=[("silu", 7, 33, "silu", f16), ("gelu", 3, 40, "gelu_tanh", f16)], device="cpu")
    assert len(rows) == 5 + 8 + 6
    assert all(r["ok"] and r["max_err"] <= r["tol"] and r["ref_max"] > 0 for r in rows), rows


def test_accuracy_rows_flag_a_wrong_kernel():
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(16, 64, generator=g).half(), torch.randn(16, 64, generator=g).half()
    rows = G.accuracy_rows("glu", "off by 2%", ["y", "dgate", "dup"], lambda a, b: glu_reference(a, b) * 1.02,
                           glu_reference, [gate, up], [True, True])
    assert [r["ok"] for r in rows] == [False, False, False]
    rows = G.accuracy_rows("glu", "itself", ["y", "dgate", "dup"], glu_reference, glu_reference, [gate, up],
                           [True, True])
    assert all(r["ok"] for r in rows)

    def off_on_small(a, b):  # within 1 ulp of max |y| everywhere, but 0.05 off on every |y| < 0.3
        y = glu_reference(a, b)
        return torch.where(y.abs() < 0.3, y + 0.05 * torch.sign(y), y)

    gate, up = torch.randn(64, 4096, generator=g).half() * 4, torch.randn(64, 4096, generator=g).half()
    row = G.accuracy_rows("glu", "off on small", ["y"], off_on_small, glu_reference, [gate, up], [True, False])[0]
    assert row["max_err"] <= row["tol"] and row["rms_err"] > row["rms_tol"] and not row["ok"], row


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["rms_norm", "rope", "glu"])
def test_gpu_check_fused_ops(name):
    rows = G.check_function(name)()
    bad = [r for r in rows if not r["ok"]]
    assert rows and not bad, bad


def test_cases_past_the_budget_are_named_not_run_never_passed(monkeypatch, tmp_path, capsys):
    """The attention check stops starting cases at its time budget. The cases it left were only printed, and the
    CLI and the GPU run's summary read "20/20 ok": a wrong kernel on a late case (D=96, fp16, the soft-cap) passed.
    Each is now a row that says it was skipped; the CLI and the summary name them NOT RUN."""
    import torch

    from benchmarks import summarize
    from llm2vec_kernels.gpu_check import attention as GC

    cases = [("tiny-a", torch.float32, (2, 9), 2, 1, 16, {}), ("tiny-b", torch.float32, (2, 9), 2, 1, 16, {})]
    clock = iter([0.0, 0.0, 31.0])  # t0, before the first case, before the second: past the 30 s budget
    monkeypatch.setattr(GC.time, "time", lambda: next(clock))
    rows = GC.gpu_check(budget_s=30.0, cases=cases, device="cpu")
    monkeypatch.undo()
    assert [r["case"] for r in rows if r.get("skipped")] == ["tiny-b-float32"] and all(
        r["ok"] for r in rows if not r.get("skipped"))
    monkeypatch.setattr("llm2vec_kernels.gpu_check.__main__.check_function", lambda n: lambda: rows)
    out = tmp_path / "correctness.json"
    assert main(["--json", str(out), "attention"]) == 0  # nothing failed; the gap is said
    text = capsys.readouterr().out
    assert "gpu_check attention: 4/4 ok, 1 case(s) NOT RUN (budget 30s spent): tiny-b-float32" in text, text
    lines = summarize.correctness(str(out))
    assert lines == ["- gpu_check attention: 4/4 ok; NOT RUN (budget 30s spent): tiny-b-float32"], lines
    t = summarize.Table()
    summarize.correctness_target(t, str(out), None)
    budget_row = ("bf16 correctness", "every case of every kernel's gpu_check", "1 case(s) not run", "NOT RUN",
                  "time budget: attention:tiny-b-float32")
    assert budget_row in t.lines
    # the other ops' checks never ran in this file: each is a NOT RUN row of its own (summarize.gpu_checks)
    absent = [line for line in t.lines if line != budget_row]
    assert {line[1] for line in absent} == {f"gpu_check {op} against its reference" for op in summarize.gpu_checks()
                                            if op != "attention"}
    assert all(line[2:] == ("not run", "NOT RUN", "absent from correctness.json") for line in absent)


def test_cli_usage_errors_and_an_unwritable_json_are_one_line(capsys):
    """A usage error printed argparse's usage block; an unwritable --json failed with a traceback after the checks."""
    for argv, says in ((["--per-op-s", "x"], "argument --per-op-s: invalid int value"),
                       (["--json", "/proc/llm2vec-c.json", "glu"], "--json /proc/llm2vec-c.json: its folder /proc "
                                                                    "cannot be written"),
                       (["--json", "", "glu"], "--json an empty path")):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and says in err[0], (argv, err)
