import json
import os

import pytest

from engine.data import BatchPlan, DataError, check_sources, read_scored_pairs, read_sts, read_supervised, read_texts

from .helpers import STS


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.txt"):
        read_texts([str(tmp_path / "nope.txt")])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="data file is empty"):
        read_texts([str(empty)])
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(DataError, match=r"no non-empty text.*empty 3"):
        read_texts([str(blank)])
    with pytest.raises(DataError, match="no data given"):
        read_texts([])


def test_check_sources_says_what_the_readers_would_say_first(tmp_path):
    # engine/train.py calls it before any heavy import: the same messages as the readers, at once
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    good = tmp_path / "good.txt"
    good.write_text("a line\n")
    check_sources([str(good), "hf:some/dataset", "data/e5-sample"])  # hf: is its reader's to judge; E5 folders pass
    # a folder without E5 files, and any folder where the stage reads no E5 data, are said at once (they were found
    # only after the tokenizer loaded and the eval data was tokenised)
    with pytest.raises(DataError, match="holds none of the E5 dataset files"):
        check_sources([str(tmp_path)])
    with pytest.raises(DataError, match="is a folder, not a file: .*only the supervised stage"):
        check_sources(["data/e5-sample"], e5_folders=False)
    for src, msg in ((tmp_path / "nope.txt", "data file not found: .*nope.txt"), (empty, "data file is empty")):
        with pytest.raises(DataError, match=msg):
            check_sources([str(good), str(src)])
        with pytest.raises(DataError, match=msg):
            read_texts([str(src)])


def test_empty_lines_are_counted(tmp_path):
    p = tmp_path / "docs.txt"
    p.write_text("first doc\n\nsecond doc\n   \nthird\n")
    texts, stats = read_texts([str(p)])
    assert texts == ["first doc", "second doc", "third"]
    assert (stats.read, stats.kept, stats.empty) == (5, 3, 2)


def test_jsonl_and_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    texts, stats = read_texts([str(p)])
    assert texts == ["a", "b"] and stats.empty == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        read_texts([str(bad)])
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "a"}\n')
    with pytest.raises(DataError, match=r"nofield.jsonl:1: missing field 'text'"):
        read_texts([str(nofield)])


@pytest.mark.parametrize("name", ["D.JSONL", "d.ndjson", "d.Json"])
def test_json_lines_are_read_as_json_whatever_the_extensions_case(tmp_path, name):
    """Every stage reads a .jsonl, .json or .ndjson file, in any case, as JSON lines: MNTP and SimCSE once read
    ``C.JSONL`` and ``.ndjson`` as plain text and trained on the JSON syntax, while the supervised stage parsed them."""
    p = tmp_path / name
    p.write_text('{"text": "hello world"}\n{"text": "second doc"}\n')
    assert read_texts([str(p)])[0] == ["hello world", "second doc"]
    g = tmp_path / ("g" + name[1:])
    g.write_text('{"sentence1": "a", "sentence2": "b", "score": 3}\n')
    assert read_scored_pairs([str(g)])[0] == [("a", "b", 3.0)]



def test_json_nested_too_deep_is_one_data_error(tmp_path):
    """100k nested brackets overflow the JSON parser's recursion: a DataError naming the line, for text and
    supervised readers alike, not a RecursionError traceback."""
    deep = "[" * 100_000 + "]" * 100_000
    for name, reader in (("t.jsonl", lambda p: read_texts([p])),
                         ("s.jsonl", lambda p: read_supervised([p]))):
        f = tmp_path / name
        f.write_text('{"text": "a", "query": "q", "positive": "p"}\n' + deep + "\n")
        with pytest.raises(DataError, match=rf"{name}:2: JSON nested too deeply"):
            reader(str(f))

def test_sts_reader_handles_extra_columns_and_rejects_malformed(tmp_path):
    pairs = read_sts(f"{STS}/sts-test.csv")
    assert len(pairs) == 1379
    assert all(0.0 <= s <= 5.0 for _, _, s in pairs)
    texts, _ = read_texts([f"{STS}/sts-dev.csv"])
    assert len(texts) == 3000  # each sentence of each pair is a document
    bad = tmp_path / "bad.csv"
    bad.write_text("g\ts\t2012\t1\t4.0\ta\tb\ng\ts\t2012\t2\tfive\ta\tb\n")
    with pytest.raises(DataError, match=r"bad.csv:2: score column is not a number"):
        read_sts(str(bad))
    for value in ("nan", "inf"):  # a NaN gold score makes Spearman and a graded loss NaN
        bad.write_text(f"g\ts\t2012\t1\t4.0\ta\tb\ng\ts\t2012\t2\t{value}\ta\tb\n")
        with pytest.raises(DataError, match=rf"bad.csv:2: score '{value}' is not a finite number"):
            read_sts(str(bad))
        jsonl = tmp_path / "pairs.jsonl"
        jsonl.write_text('{"sentence1": "a", "sentence2": "b", "score": "%s"}\n' % value)
        with pytest.raises(DataError, match=rf"pairs.jsonl:1: score '{value}' is not a finite number"):
            read_scored_pairs([str(jsonl)])


def test_supervised_jsonl_and_sts_conversion(tmp_path):
    p = tmp_path / "s.jsonl"
    rows = [{"query": "q1", "positive": "p1", "negative": "n1", "instruction": "Find: "},
            {"query": "q2", "positive": "p2", "negatives": ["n2", "m2"], "source": "other"},
            {"query": "", "positive": "p3", "negative": "n3"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ex, stats = read_supervised([str(p)])
    assert [e["negatives"] for e in ex] == [["n1"], ["n2", "m2"]]
    assert ex[0]["instruction"] == "Find: " and ex[1]["source"] == "other"
    # a null negative is a row without one (counted), as a missing field is, not an error that stops the build
    gaps = tmp_path / "gaps.jsonl"
    gaps.write_text("\n".join(json.dumps({"query": f"gap{i}", "positive": "p", key: None})
                              for i, key in enumerate(("negative", "negatives"))) + "\n" + json.dumps(rows[0]) + "\n")
    kept, gap_stats = read_supervised([str(gaps)])
    assert [e["query"] for e in kept] == ["q1"] and gap_stats.no_negative == 2
    # a file whose rows use either field holds both columns, the one a row lacks null: the other is its negatives
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"query": "b1", "positive": "p", "negative": "n1", "negatives": None}) + "\n"
                    + json.dumps({"query": "b2", "positive": "p", "negative": None, "negatives": ["a", "b"]}) + "\n")
    kept, both_stats = read_supervised([str(both)])
    assert [e["negatives"] for e in kept] == [["n1"], ["a", "b"]] and both_stats.no_negative == 0
    both.write_text(json.dumps({"query": "b3", "positive": "p", "negative": "n", "negatives": ["m"]}) + "\n")
    with pytest.raises(DataError, match=r"both\.jsonl:1: both 'negative' and 'negatives' are set"):
        read_supervised([str(both)])  # (the second was dropped, unsaid)
    numbered = tmp_path / "numbered.jsonl"  # a number names a group as its text does
    numbered.write_text(json.dumps({"query": "q", "positive": "p", "negative": "n", "source": 5}) + "\n")
    assert read_supervised([str(numbered)])[0][0]["source"] == "5"
    # a null source (pandas or datasets write a missing value so) is the file's own group, not the group "None"
    nulls = [tmp_path / "n1.jsonl", tmp_path / "n2.jsonl"]
    for f in nulls:
        f.write_text(json.dumps({"query": "q", "positive": "p", "negative": "n", "source": None}) + "\n")
    assert [e["source"] for e in read_supervised([str(f) for f in nulls])[0]] == [str(nulls[0]), str(nulls[1])]
    assert stats.empty == 1
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"query": "q"}\n')
    with pytest.raises(DataError, match="missing field 'positive'"):
        read_supervised([str(bad)])
    sts_ex, _ = read_supervised([f"{STS}/sts-train.csv"])
    gold_list = [(a, b) for a, b, s in read_sts(f"{STS}/sts-train.csv") if s >= 4.0]
    gold = set(gold_list)
    assert len(sts_ex) == 2 * len(gold_list)
    assert all((e["query"], e["positive"]) in gold or (e["positive"], e["query"]) in gold for e in sts_ex)
    assert all(e["negatives"][0] not in (e["query"], e["positive"]) for e in sts_ex)


def test_batch_plan_is_deterministic_sharded_and_resumable():
    world, micro, glob = 2, 3, 12
    plans = [BatchPlan(100, glob, micro, world, r, seed=5) for r in range(world)]
    assert plans[0].accum == 2 and plans[0].steps_per_epoch == 8
    for step in (0, 7, 8, 19):
        shards = [idx for p in plans for mb in p.micro_batches(step) for idx in mb]
        assert len(shards) == glob and len(set(shards)) == glob  # the ranks split the global batch
        again = BatchPlan(100, glob, micro, world, 0, seed=5)  # a resumed process sees the same data
        assert again.micro_batches(step) == plans[0].micro_batches(step)
    epoch0 = {i for s in range(8) for p in plans for mb in p.micro_batches(s) for i in mb}
    assert len(epoch0) == 96  # no repeats inside an epoch
    assert plans[0].micro_batches(0) != plans[0].micro_batches(8)  # reshuffled next epoch


def test_batch_plan_source_homogeneous():
    groups = ["a"] * 40 + ["b"] * 30
    plan = BatchPlan(70, 10, 5, 1, 0, seed=1, groups=groups)
    for step in range(plan.steps_per_epoch):
        idx = [i for mb in plan.micro_batches(step) for i in mb]
        assert len({groups[i] for i in idx}) == 1


def test_pairs_without_hard_negatives(tmp_path, monkeypatch):
    """A row without a hard negative is dropped and counted when the stage uses hard negatives, and is an example
    with contrastive.num_hard_negatives=0; a blank negative is dropped from a row that keeps others (counted)."""
    import torch

    from engine.config import load_config
    from engine.modeling import load_tokenizer
    from engine.stages import build_stage

    monkeypatch.setenv("LLM2VEC_ENGINE_TOKEN_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "pairs.jsonl"
    rows = [{"query": f"q{i}", "positive": f"p{i}"} for i in range(6)]
    rows += [{"query": "q6", "positive": "p6", "negatives": ["", "n6"]}, {"query": "q7", "positive": "p7", "negative": " "}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ex, stats = read_supervised([str(p)])
    assert [e["negatives"] for e in ex] == [["n6"]] and (stats.no_negative, stats.blank_negatives) == (7, 2)
    assert "no negative 7, blank negatives 2" in stats.summary()
    ex, stats = read_supervised([str(p)], need_negatives=False)
    assert len(ex) == 8 and ex[0]["negatives"] == [] and stats.no_negative == 0
    only_pairs = tmp_path / "only.jsonl"
    only_pairs.write_text("\n".join(json.dumps(r) for r in rows[:6]) + "\n")
    cfg = load_config("configs/tiny/supervised.yaml", [f"data={only_pairs}"])
    with pytest.raises(DataError, match="no negative 6.*contrastive.num_hard_negatives=0"):
        build_stage(cfg, load_tokenizer(cfg.model)).load(cfg.data)
    cfg = load_config("configs/tiny/supervised.yaml", [f"data={only_pairs}", "contrastive.num_hard_negatives=0"])
    stage = build_stage(cfg, load_tokenizer(cfg.model))
    items, stats, _ = stage.load(cfg.data)
    batch = stage.collate([items[i] for i in range(4)], torch.Generator())
    assert len(items) == 6 and batch["n_queries"] == 4 and batch["input_ids"].shape[0] == 8  # 4 queries, 4 positives


def test_supervised_collate_takes_the_kth_negative_of_each_row_cycling_short_rows():
    """With num_hard_negatives = n the candidates are [positives; each row's negative 0; ...; each row's negative
    n-1], a row with fewer than n negatives reusing its own in turn (k mod its count). Every tested row had one
    negative (the STS conversion), so taking negative 0 n times passed unseen: the second block would repeat the
    first and each query would see its first hard negative twice and its second never."""
    import torch

    from engine.config import load_config
    from engine.modeling import load_tokenizer
    from engine.stages import build_stage

    cfg = load_config("configs/tiny/supervised.yaml", ["contrastive.num_hard_negatives=2"])
    tok = load_tokenizer(cfg.model)
    stage = build_stage(cfg, tok)
    negatives = [["neg 0a", "neg 0b", "neg 0c"], ["neg 1a", "neg 1b"], ["neg 2a"]]
    items = [{"query": f"query {r}", "positive": f"positive {r}", "negatives": negs, "instruction": "Find: ",
              "source": "s"} for r, negs in enumerate(negatives)]
    batch = stage.collate(items, torch.Generator())
    texts = [tok.decode(ids[:int(am.sum())], skip_special_tokens=True)
             for ids, am in zip(batch["input_ids"], batch["attention_mask"])]
    assert batch["n_queries"] == 3 and texts[:3] == ["Find:\nquery 0", "Find:\nquery 1", "Find:\nquery 2"]
    assert texts[3:] == ["positive 0", "positive 1", "positive 2",
                         "neg 0a", "neg 1a", "neg 2a",   # negative 0 of each row
                         "neg 0b", "neg 1b", "neg 2a"]   # negative 1 of each row; row 2 has one: it comes again


def test_batch_plan_reports_what_no_batch_holds():
    """Each epoch leaves out every group's last partial batch, and a group smaller than one global batch is never
    trained on: both counted (the trainer logs the summary and warns about the starved sources)."""
    groups = ["a"] * 45 + ["b"] * 30 + ["tiny"] * 7
    plan = BatchPlan(82, 10, 5, 1, 0, seed=1, groups=groups)
    assert plan.steps_per_epoch == 7 and plan.unused_per_epoch == 82 - 70 and plan.starved == {"tiny": 7}
    used = {i for step in range(plan.steps_per_epoch) for mb in plan.micro_batches(step) for i in mb}
    assert len(used) == 70 and not used & set(range(75, 82))  # the tiny source's items: never in a batch
    assert plan.summary() == ("7 steps per epoch of 10; 12 of 82 items in no batch each epoch (a different partial "
                              "batch per source each time); 1 source(s) smaller than one global batch, never "
                              "trained on (7 items)")
    flat = BatchPlan(82, 10, 5, 1, 0, seed=1)
    assert flat.unused_per_epoch == 2 and flat.starved == {} and "never trained" not in flat.summary()


def test_too_little_data_for_a_batch():
    with pytest.raises(DataError, match="fewer than one global batch"):
        BatchPlan(5, 8, 2, 2, 0, seed=0)


def test_a_utf8_bom_is_not_part_of_the_first_text(tmp_path):
    bom = "\ufeff".encode("utf-8")
    txt, jsonl, csv = tmp_path / "d.txt", tmp_path / "d.jsonl", tmp_path / "s.csv"
    txt.write_bytes(bom + "first\nsecond\n".encode())
    jsonl.write_bytes(bom + b'{"text": "a"}\n{"text": "b"}\n')
    csv.write_bytes(bom + b"g\ts\t2012\t1\t4.0\tone\ttwo\ng\ts\t2012\t2\t1.0\tthree\tfour\n")
    assert read_texts([str(txt)])[0] == ["first", "second"]
    assert read_texts([str(jsonl)])[0] == ["a", "b"]
    assert read_sts(str(csv))[0] == ("one", "two", 4.0)
    sup = tmp_path / "s.jsonl"
    sup.write_bytes(bom + b'{"query": "q", "positive": "p", "negative": "n"}\n')
    assert read_supervised([str(sup)])[0][0]["query"] == "q"
    mid = tmp_path / "mid.txt"  # only a leading mark is metadata: one inside the text is kept
    mid.write_text("a\ufeffb\n", encoding="utf-8")
    assert read_texts([str(mid)])[0] == ["a\ufeffb"]
    joined = tmp_path / "joined.txt"  # `cat` of two files that each begin with a mark: each is metadata
    joined.write_bytes(txt.read_bytes() + txt.read_bytes())
    assert read_texts([str(joined)])[0] == ["first", "second"] * 2


def test_a_lone_utf16_surrogate_is_refused_when_read(tmp_path):
    """JSON's ``"\\ud800"`` escape gives a lone surrogate that json.loads keeps and no tokenizer takes: it passed the
    readers and the item cache, then failed at the batch that drew it with the tokenizer's TypeError (MNTP: while
    building its cache, naming no file). Every text a reader takes from JSON is refused at once, naming file:line
    and field; a surrogate pair's escape (one character) reads as before."""
    bad = "bad \ud83d text"
    texts = tmp_path / "t.jsonl"
    texts.write_text(json.dumps({"text": "fine \ud83d\ude00"}) + "\n" + json.dumps({"text": bad}) + "\n")
    assert "\\ud83d" in texts.read_text()  # the escape, as a JSON writer leaves it
    with pytest.raises(DataError, match=r"t.jsonl:2: field 'text' holds an unpaired UTF-16 surrogate \('\\ud83d' at "
                                        r"character 5\)"):
        read_texts([str(texts)])
    texts.write_text(json.dumps({"text": "fine \ud83d\ude00"}) + "\n")
    assert read_texts([str(texts)])[0] == ["fine \U0001f600"]
    ok = {"query": "q", "positive": "p", "negative": "n"}
    for key, row in (("query", {**ok, "query": bad}), ("positive", {**ok, "positive": bad}),
                     ("negative", {**ok, "negative": bad}),
                     ("negatives", {"query": "q", "positive": "p", "negatives": ["n", bad]}),
                     ("instruction", {**ok, "instruction": bad}), ("doc_instruction", {**ok, "doc_instruction": bad}),
                     ("source", {**ok, "source": bad})):
        p = tmp_path / f"s-{key}.jsonl"
        p.write_text(json.dumps(ok) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(DataError, match=rf"s-{key}.jsonl:2: field '{key}' holds an unpaired UTF-16 surrogate"):
            read_supervised([str(p)])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"sentence1": "a", "sentence2": bad, "score": 1}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:1: field 'sentence2' holds an unpaired UTF-16 surrogate"):
        read_scored_pairs([str(pairs)])


def test_the_stages_read_no_table_but_an_sts_file(tmp_path):
    """A .csv/.tsv that is no STS Benchmark TSV was read as text lines, its header row a document; an STS file (the
    benchmark's own .csv files are tab-separated) is still read as its pairs' sentences."""
    table = tmp_path / "pairs.csv"
    table.write_text("sentence1,sentence2,score\na man plays,a person plays,4.0\n")
    short = tmp_path / "pairs.tsv"
    short.write_text("a man plays\ta person plays\t4.0\n")
    for src in (table, short):
        for read in (read_texts, lambda s: read_supervised(s, need_negatives=False), check_sources):
            # check_sources: said before the imports and the tokenizer (train.py), as the readers would say it
            with pytest.raises(DataError, match=rf"{src.name}: not an STS Benchmark TSV .*give .txt lines or .jsonl"):
                read([str(src)])
    sts = tmp_path / "sts.tsv"
    sts.write_text("g\ts\t2012\t1\t4.0\tone\ttwo\n")
    assert sorted(read_texts([str(sts)])[0]) == ["one", "two"]
    check_sources([str(sts)])
    lines = tmp_path / "lines.txt"  # commas in a text file are text
    lines.write_text("a, b, c\n")
    assert read_texts([str(lines)])[0] == ["a, b, c"]


def _hf_dir(root, name, rows):
    folder = root / name
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"hf:{folder}"


def test_hf_sources_need_a_text_column_of_strings_and_a_split_they_hold(tmp_path, monkeypatch):
    """Local `datasets` folders: a dataset without a `text` column trained on its first column, whatever it held
    (an id column: an AttributeError at strip()), a non-string value was that traceback too, and a split the
    dataset lacks was datasets' ValueError traceback (on every rank). Each is now one DataError line."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    good = _hf_dir(tmp_path, "good", [{"id": 1, "text": "first"}, {"id": 2, "text": None}, {"id": 3, "text": "x"}])
    texts, stats = read_texts([good])
    assert texts == ["first", "x"] and stats.empty == 1  # a null text is an empty one, counted
    with pytest.raises(DataError, match=r"good::nosuch: Unknown split \"nosuch\""):
        read_texts([good + "::nosuch"])
    multi = _hf_dir(tmp_path, "multi", [{"id": 1, "sentence": "a"}])
    with pytest.raises(DataError, match=r"multi: no `text` column \(its columns: id, sentence\)"):
        read_texts([multi])
    assert read_texts([_hf_dir(tmp_path, "one", [{"sentence": "a"}])])[0] == ["a"]  # its only column is the text
    numbers = _hf_dir(tmp_path, "numbers", [{"text": 5}, {"text": 6}])
    with pytest.raises(DataError, match=r"numbers:1: column 'text' must be a string, got a number"):
        read_texts([numbers])
    cut = _hf_dir(tmp_path, "cut", [{"text": "a"}])
    with open(cut[3:] + "/train.jsonl", "a") as f:
        f.write('{"text": \n')  # a file cut mid-row: datasets' DatasetGenerationError, a traceback before
    with pytest.raises(DataError, match=r"cut: An error occurred while generating the dataset \(.*JSON"):
        read_texts([cut])


def test_hf_sources_offline_are_one_line(monkeypatch):
    import sys
    import types

    def load_dataset(name, config=None, split="train"):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match=r"hf:org/x: Couldn't reach 'org/x' on the Hub .*give a local path instead"):
        read_texts(["hf:org/x"])


def test_hf_rows_holding_a_lone_surrogate_are_refused(monkeypatch):
    """(`datasets` itself will not build such a dataset from JSON, but a row of another builder could hold one.)"""
    import sys
    import types

    class Rows(list):
        column_names = ["text"]

    mod = types.ModuleType("datasets")
    mod.load_dataset = lambda name, config=None, split="train": Rows([{"text": "ok"}, {"text": "a \udc80"}])
    monkeypatch.setitem(sys.modules, "datasets", mod)
    with pytest.raises(DataError, match=r"hf:org/x:2: field 'text' holds an unpaired UTF-16 surrogate"):
        read_texts(["hf:org/x"])


def test_a_jsonl_row_names_its_own_document_instruction(tmp_path, monkeypatch):
    """``doc_instruction`` on a JSONL row was ignored (documents went uninstructed) though the stage checks the rows'
    own document instructions for room: it is read and type-checked as ``instruction`` is (null: the default,
    none), reaches the documents at collate, and a too-long one is refused at load."""
    import torch

    from engine.config import ConfigError, load_config
    from engine.modeling import load_tokenizer
    from engine.stages import build_stage

    monkeypatch.setenv("LLM2VEC_ENGINE_TOKEN_CACHE", str(tmp_path / "cache"))
    rows = [{"query": f"q{i}", "positive": f"p{i}", "negative": f"n{i}", "doc_instruction": "Passage: "}
            for i in range(4)]
    p = tmp_path / "rows.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows + [{**rows[0], "doc_instruction": None}]))
    ex, _ = read_supervised([str(p)])
    assert [e["doc_instruction"] for e in ex] == ["Passage: "] * 4 + [""]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**rows[0], "doc_instruction": 3}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'doc_instruction' must be a string, got a number"):
        read_supervised([str(bad)])
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "doc_instruction"}) + "\n" for r in rows))
    lengths = []
    for data in (plain, p):
        cfg = load_config("configs/tiny/supervised.yaml", [f"data={data}", "max_samples=4"])
        stage = build_stage(cfg, load_tokenizer(cfg.model))
        items = stage.load(cfg.data)[0]
        batch = stage.collate([items[i] for i in range(4)], torch.Generator())
        lengths.append(batch["attention_mask"][4:].sum().item())  # the documents (positives, negatives)
    assert lengths[1] > lengths[0]
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({**r, "doc_instruction": "word " * 40}) + "\n" for r in rows))
    cfg = load_config("configs/tiny/supervised.yaml", [f"data={long}"])
    with pytest.raises(ConfigError, match=r"a row's own document instruction.*leaves no room"):
        build_stage(cfg, load_tokenizer(cfg.model)).load(cfg.data)


def test_the_item_cache_rules_digest_holds_the_row_fields_read(monkeypatch):
    """An engine that reads another field of a supervised row (doc_instruction once was ignored) must not reuse
    items cached without it: the fields read are in the rules digest the cache key holds."""
    import engine.data as D

    before = D.rows_rule_digest()
    monkeypatch.setattr(D, "ROW_FIELDS", D.ROW_FIELDS[:-1])
    assert D.rows_rule_digest() != before


def test_the_dev_score_reads_every_genre_of_a_file_sorted_by_genre(tmp_path):
    """STS-B dev is sorted by genre (625 captions, 375 forums, 500 news): its first 500 pairs, which the dev score
    read, are all captions. eval_sts_pairs takes its pairs genre by genre in turn now; the whole file stays as it
    is, and a file interleaved by hand (the quality benchmark's copy) gives the same pairs as its source."""
    from collections import Counter

    from engine.data import sts_eval_pairs, sts_genre

    dev = os.path.join(STS, "sts-dev.csv")
    with open(dev, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    genre = {(x[5].strip(), x[6].strip()): sts_genre(x[0]) for x in (line.split("\t") for line in lines)}
    assert Counter(genre[p[:2]] for p in read_sts(dev)[:500]) == {"captions": 500}
    picked = sts_eval_pairs(dev, 500)
    assert Counter(genre[p[:2]] for p in picked) == {"captions": 167, "forums": 167, "news": 166}
    assert sts_eval_pairs(dev, 1500) == read_sts(dev) == sts_eval_pairs(dev, 10**6)
    from benchmarks.quality_smollm2 import interleave_genres

    copy = tmp_path / "sts-dev-interleaved.csv"
    copy.write_text("\n".join(interleave_genres(lines)) + "\n")
    assert read_sts(str(copy))[:500] == sts_eval_pairs(str(copy), 500) == picked
