"""engine.evaluate: which part of a multilingual mteb task is scored, checks of mteb:STSBenchmarkLocal's pairs,
options a task does not use, cosines that are not finite. No model loads (the Encoder is a stand-in), no mteb data
is fetched (task metadata only)."""
import json
import types

import pytest

from .test_cli_errors import _evaluate, _sts, _StubEncoder, stub_model  # noqa: F401  (fixture)


def test_a_nan_cosine_fails_every_sts_run_not_only_bootstrap(capsys, tmp_path, stub_model):  # noqa: F811
    """Without --bootstrap / --compare a NaN cosine printed "spearman": null with exit 0 and no word."""
    model, set_cosines = stub_model
    data = _sts(tmp_path / "five.csv", [0.0, 1.5, 2.0, 3.5, 5.0])
    set_cosines([0.1, float("nan"), 0.3, 0.4, float("inf")])
    rc, line = _evaluate(capsys, "--model", model, "--data", data, "--scores", str(tmp_path / "s.tsv"))
    assert rc == 1 and "cosine is not finite for 2 of 5 pairs (the first: pair 1)" in line
    assert (tmp_path / "s.tsv").read_text().count("\tnan\n") == 1  # kept, for a look at what went wrong


@pytest.mark.parametrize("golds,extra,message", [
    ([1.0, 3.0], [], "2 pair(s), but a rank correlation needs at least 3"),
    ([0.0, 1.5, 2.0, 3.5, 5.0], ["--max-pairs", "1"], "(its first 1, --max-pairs): 1 pair(s), but a rank"),
    ([2.5] * 4, [], "every one of its 4 pairs has the gold score 2.5"),
])
def test_local_mteb_sts_checks_its_pairs_before_the_model_loads(capsys, tmp_path, stub_model,  # noqa: F811
                                                                golds, extra, message):
    """mteb:STSBenchmarkLocal ran the model on these and printed a null score, exit 0; --task sts refused them."""
    pytest.importorskip("mteb")
    model, _ = stub_model
    rc, line = _evaluate(capsys, "--model", model, "--task", "mteb:STSBenchmarkLocal", "--data",
                         _sts(tmp_path / "pairs.csv", golds), *extra)
    assert rc == 2 and message in line and _StubEncoder.loads == 0, line


@pytest.mark.parametrize("args,message", [
    (["--task", "sts", "--max-pairs", "10"], "--max-pairs applies to --task mteb:STSBenchmarkLocal only"),
    (["--task", "mteb:STSBenchmark", "--max-pairs", "10"], "--max-pairs applies to --task mteb:STSBenchmarkLocal"),
    (["--task", "mteb:STSBenchmark", "--data", "DATA"], "--data applies to --task sts and --task mteb:STSBenchm"),
    (["--task", "sts", "--languages", "all"], "--languages applies to mteb hub tasks"),
    (["--task", "mteb:STSBenchmarkLocal", "--languages", "deu"], "--languages applies to mteb hub tasks"),
])
def test_an_option_the_task_does_not_use_is_refused(capsys, tmp_path, stub_model, args, message):  # noqa: F811
    """--max-pairs with sts or a hub task, and --data with a hub task, used to be ignored without a word."""
    model, _ = stub_model
    data = _sts(tmp_path / "five.csv", [0.0, 1.5, 2.0, 3.5, 5.0])
    args = [data if a == "DATA" else a for a in args]
    if args[1] == "sts":
        args += ["--data", data]
    rc, line = _evaluate(capsys, "--model", model, *args)
    assert rc == 2 and message in line and _StubEncoder.loads == 0, line


def test_local_task_name_matches_the_wrapper():
    pytest.importorskip("mteb")
    from engine.evaluate import LOCAL_TASK
    from engine.mteb_model import LOCAL_STS_NAME

    assert LOCAL_TASK == "mteb:" + LOCAL_STS_NAME


def test_multilingual_tasks_are_scored_in_english_as_mteb_eng_v1_defines_them():
    """get_tasks(tasks=[name]) kept every subset and split: MassiveIntentClassification's score was the mean of
    51 languages and two splits, not the English test figure the LLM2Vec paper reports."""
    pytest.importorskip("mteb")
    from engine.evaluate import select_mteb_task, task_coverage

    def cover(name, languages=None):
        return task_coverage(*select_mteb_task(name, languages))

    c = cover("MassiveIntentClassification")
    assert (c["subsets"], c["splits"], c["languages"]) == (["en"], ["test"], ["eng-Latn"])
    assert c["defined_by"] == "MTEB(eng, v1)" and c["subsets_left_out"] == 50 and c["splits_left_out"] == ["validation"]
    assert cover("MassiveIntentClassification", ["eng"]) == c  # --languages eng: the same as the default
    assert (cover("STS17")["subsets"], cover("STS22")["subsets"]) == (["en-en"], ["en"])
    assert (cover("AmazonCounterfactualClassification")["subsets"], cover("MSMARCO")["splits"]) == (["en"], ["dev"])
    every = cover("MassiveIntentClassification", "all")
    assert len(every["subsets"]) == 51 and every["splits"] == ["validation", "test"] and every["subsets_left_out"] == 0
    # outside the benchmark: the subsets in English alone, every eval split
    other = cover("STSBenchmarkMultilingualSTS")
    assert other["subsets"] == ["en"] and other["splits"] == ["dev", "test"] and other["defined_by"] is None
    # a list: the subsets entirely in those languages (STS22's de-en counts only when both are asked for)
    assert sorted(cover("STS22", ["eng", "deu"])["subsets"]) == ["de", "de-en", "en"]
    with pytest.raises(ValueError, match="'en' is not an ISO 639-3 language code"):
        select_mteb_task("STS22", ["en"])
    with pytest.raises(ValueError, match="mteb:GermanSTSBenchmark has no subset in eng alone .*--languages all"):
        select_mteb_task("GermanSTSBenchmark")
    with pytest.raises(ValueError, match="unknown mteb task 'NoSuchTask'"):
        select_mteb_task("NoSuchTask")


def test_the_cli_scores_the_english_subset_and_says_what_it_covers(capsys, stub_model, monkeypatch):  # noqa: F811
    """mteb.evaluate receives the task cut to English ("en", test); the JSON names the languages, subsets and
    splits the score averages, and stderr how many were left out. (mteb's evaluation and the data are stand-ins.)"""
    mteb = pytest.importorskip("mteb")
    import engine.mteb_model
    from mteb.abstasks.abstask import AbsTask

    model, _ = stub_model
    seen = {}
    monkeypatch.setattr(AbsTask, "load_data", lambda self, *a, **k: None)
    monkeypatch.setattr(engine.mteb_model, "EngineMTEBModel", lambda enc, **kw: seen.update(kw))

    def evaluate(model, tasks, **kw):
        seen["tasks"] = [(t.metadata.name, list(t.hf_subsets), list(t.eval_splits)) for t in tasks]
        r = types.SimpleNamespace(task_name=tasks[0].metadata.name, get_score=lambda: 0.5, scores={"test": []})
        return types.SimpleNamespace(task_results=[r])

    monkeypatch.setattr(mteb, "evaluate", evaluate)
    from engine.evaluate import main

    assert main(["--model", model, "--task", "mteb:MassiveIntentClassification"]) == 0
    out, err = capsys.readouterr()
    assert seen["tasks"] == [("MassiveIntentClassification", ["en"], ["test"])]
    res = json.loads(out)
    r = res["results"][0]
    assert res["languages"] == "eng" and r["main_score"] == 0.5 and r["defined_by"] == "MTEB(eng, v1)"
    assert (r["languages"], r["subsets"], r["splits"]) == (["eng-Latn"], ["en"], ["test"])
    assert "left out: 50 subset(s), split(s) validation (--languages all scores every one)" in err
    assert main(["--model", model, "--task", "mteb:MassiveIntentClassification", "--languages", "all"]) == 0
    out, err = capsys.readouterr()
    assert len(seen["tasks"][0][1]) == 51 and json.loads(out)["languages"] == "all" and "left out" not in err
    rc, line = _evaluate(capsys, "--model", model, "--task", "mteb:GermanSTSBenchmark")
    assert rc == 2 and "has no subset in eng alone" in line
    rc, line = _evaluate(capsys, "--model", model, "--task", "mteb:STS22", "--languages", "english")
    assert rc == 2 and "'english' is not an ISO 639-3 language code" in line and _StubEncoder.loads == 2


def test_an_aggregate_task_loads_the_data_of_the_tasks_it_is_made_of(monkeypatch):
    """CQADupstackRetrieval has no data of its own (its dataset path is a placeholder): loading it failed, and
    evaluate said the hub could not be reached even online."""
    pytest.importorskip("mteb")
    from mteb.abstasks.abstask import AbsTask

    from engine.evaluate import _mteb_tasks

    from mteb.abstasks.retrieval import AbsTaskRetrieval

    loaded = []
    for cls in (AbsTask, AbsTaskRetrieval):  # retrieval tasks load their data their own way
        monkeypatch.setattr(cls, "load_data", lambda self, *a, **k: loaded.append(self.metadata.name))
    tasks, coverage = _mteb_tasks("CQADupstackRetrieval", None, None)
    subtasks = [t.metadata.name for t in tasks[0].metadata.tasks]
    assert len(subtasks) == 12 and loaded == subtasks
    assert coverage["CQADupstackRetrieval"]["subtasks"] == subtasks


def test_local_mteb_sts_reads_its_file_once(tmp_path, monkeypatch):
    """The pairs checked before the model loads are the pairs scored: the file was read twice (check, then task)."""
    pytest.importorskip("mteb")
    import engine.data
    from engine.evaluate import _mteb_tasks

    data = _sts(tmp_path / "five.csv", [0.0, 1.5, 2.0, 3.5, 5.0])
    reads, read_sts = [], engine.data.read_sts
    monkeypatch.setattr(engine.data, "read_sts", lambda p: reads.append(p) or read_sts(p))
    (task,), _ = _mteb_tasks("STSBenchmarkLocal", data, 4, None)
    task.load_data()
    assert reads == [data] and task.dataset["test"]["score"] == [0.0, 1.5, 2.0, 3.5]


def _compare(capsys, model, data, other, *extra):
    """engine.evaluate's JSON result of a --compare run (exit 0 asserted) and its ``compare``."""
    from engine.evaluate import main

    rc = main(["--model", model, "--data", data, "--compare", other, *extra])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    return json.loads(out)["compare"]


def test_compare_subtracts_the_other_model_and_follows_the_seed(capsys, tmp_path, stub_model):  # noqa: F811
    """Nothing checked that --compare reports this model minus the --scores file's (not the reverse) nor that
    --seed reaches the paired bootstrap: a better model A against a worse file B must come out above 0."""
    import numpy as np

    from engine.data import read_sts
    from engine.evaluate import write_scores

    model, set_cosines = stub_model
    rng = np.random.default_rng(0)
    gold = np.round(rng.uniform(0, 5, 80), 2)
    data = _sts(tmp_path / "pairs.csv", gold.tolist())
    set_cosines(gold / 5 + rng.normal(0, 0.1, 80))  # A: close to the golds
    write_scores(tmp_path / "b.tsv", read_sts(data), (gold / 5 + rng.normal(0, 0.6, 80)).tolist())  # B: noisier
    one = _compare(capsys, model, data, str(tmp_path / "b.tsv"), "--bootstrap", "500", "--seed", "1")
    assert one["difference"] > 0 and one["ci"][0] > 0 and one["share_at_or_below_0"] < 0.05, one
    assert one["n_boot"] == 500 and one["pairs"] == 80
    assert _compare(capsys, model, data, str(tmp_path / "b.tsv"), "--bootstrap", "500", "--seed", "1") == one
    two = _compare(capsys, model, data, str(tmp_path / "b.tsv"), "--bootstrap", "500", "--seed", "2")
    assert two["ci"] != one["ci"] and two["difference"] == one["difference"]


def test_compare_checks_the_sentences_not_only_the_golds(capsys, tmp_path, stub_model):  # noqa: F811
    """A --scores file of other sentences with the same gold scores was compared as if on the same pairs; a file
    from before the text column cannot be checked, so --compare refuses it and says to rewrite it."""
    from engine.data import read_sts
    from engine.evaluate import read_scores, write_scores

    model, set_cosines = stub_model
    golds = [0.0, 1.5, 2.0, 3.5, 5.0]
    data = _sts(tmp_path / "five.csv", golds)
    set_cosines([0.1, 0.3, 0.2, 0.6, 0.9])
    from engine.evaluate import main

    assert main(["--model", model, "--data", data, "--scores", str(tmp_path / "mine.tsv")]) == 0
    capsys.readouterr()
    assert _compare(capsys, model, data, str(tmp_path / "mine.tsv"))["difference"] == 0  # its own file reads back
    assert _StubEncoder.loads == 2
    other = read_sts(data)
    other[3] = ("Another sentence.", other[3][1], other[3][2])  # same gold, other text
    write_scores(tmp_path / "other.tsv", other, [0.5] * 5)
    rc, line = _evaluate(capsys, "--model", model, "--data", data, "--compare", str(tmp_path / "other.tsv"))
    assert rc == 2 and "other.tsv:5: pair 3 was scored on other sentences" in line and _StubEncoder.loads == 2, line
    lines = (tmp_path / "mine.tsv").read_text().splitlines()
    assert lines[0] == "pair\tgold\ttext\tcosine" and lines[3].split("\t")[3] == repr(0.2)  # the cosine still last
    old = [x.split("\t") for x in lines[1:]]
    (tmp_path / "old.tsv").write_text("pair\tgold\tcosine\n" + "".join(f"{i}\t{g}\t{c}\n" for i, g, _, c in old))
    rc, line = _evaluate(capsys, "--model", model, "--data", data, "--compare", str(tmp_path / "old.tsv"))
    assert rc == 2 and "old.tsv: written before --scores kept each pair's text digest" in line, line
    assert "rewrite it with --scores" in line and _StubEncoder.loads == 2
    assert read_scores(str(tmp_path / "old.tsv"), read_sts(data)) == [0.1, 0.3, 0.2, 0.6, 0.9]  # benchmark readers


@pytest.mark.parametrize("case,message", [
    ("scores_is_compare", "--scores {p} is the --compare file: writing this model's scores would overwrite it"),
    ("scores_is_data", "--scores {p} is the --data file"),
    ("bootstrap_huge", "--bootstrap 1000001: use at most 1000000 resamples"),
    ("compare_folder", "--compare {p}: cannot be read as a --scores file (IsADirectoryError"),
    ("compare_not_utf8", "--compare {p}: cannot be read as a --scores file (UnicodeDecodeError"),
])
def test_evaluate_refuses_before_the_model_loads(capsys, tmp_path, stub_model, case, message):  # noqa: F811
    """--scores naming the --compare or --data file overwrote it after the run (compared by real path here: one
    spelled through '..'); --bootstrap had no cap (resamples x pairs held at once); a --compare folder or non-UTF-8
    file was a bare OSError or codec line naming neither the flag nor (for the codec) the file."""
    from engine.data import read_sts
    from engine.evaluate import write_scores

    model, _ = stub_model
    data = _sts(tmp_path / "five.csv", [0.0, 1.5, 2.0, 3.5, 5.0])
    write_scores(tmp_path / "b.tsv", read_sts(data), [0.1, 0.2, 0.3, 0.4, 0.5])
    (tmp_path / "sub").mkdir()
    (tmp_path / "bin.tsv").write_bytes(b"pair\tgold\ttext\tcosine\n0\t0.0\t\xff\xfe\t0.5\n")
    aside = str(tmp_path / "sub" / ".." / "{}")
    path, args = {
        "scores_is_compare": (aside.format("b.tsv"), ["--compare", str(tmp_path / "b.tsv")]),
        "scores_is_data": (aside.format("five.csv"), []),
        "bootstrap_huge": ("", ["--bootstrap", "1000001"]),
        "compare_folder": (str(tmp_path / "sub"), []),
        "compare_not_utf8": (str(tmp_path / "bin.tsv"), []),
    }[case]
    if case.startswith("scores"):
        args += ["--scores", path]
    elif case.startswith("compare"):
        args += ["--compare", path]
    before = {p: (tmp_path / p).read_bytes() for p in ("b.tsv", "five.csv")}
    rc, line = _evaluate(capsys, "--model", model, "--data", data, *args)
    assert rc == 2 and message.format(p=path) in line and _StubEncoder.loads == 0, line
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
