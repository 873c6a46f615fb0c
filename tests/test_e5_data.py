"""The E5 training data as llm2vec reads it (one JSONL per dataset, echo-data's layout): per-dataset instructions
joined with "; ", documents instructed for the symmetric tasks, split halves in one group, and one dataset per
global batch. The sample in data/e5-sample/ is synthetic, written in that layout."""
import json
import os
import shutil

import pytest
import torch

from engine.config import load_config
from engine.data import E5_INSTRUCTIONS, BatchPlan, DataError, read_supervised, read_texts
from engine.encoding import tokenize_with_instruction
from engine.modeling import load_tokenizer
from engine.stages import build_stage

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "e5-sample")


@pytest.fixture(autouse=True)
def _token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM2VEC_ENGINE_TOKEN_CACHE", str(tmp_path / "token-cache"))


def test_e5_directory_instructions_joiner_and_groups():
    ex, stats = read_supervised([SAMPLE])
    assert len(ex) == 16 * 6 and stats.kept == 96
    assert stats.sources == {**{f"{n}.jsonl": 6 for n in E5_INSTRUCTIONS if "_split" not in n},
                             "allnli.jsonl": 12, "quora_duplicates.jsonl": 12}  # the download's 14 files
    by_file = {}
    for e in ex:
        name = e["query"].rsplit("(", 1)[1].split()[0]  # the sample names its file in each query
        by_file.setdefault(name, []).append(e)
    assert set(by_file) == set(E5_INSTRUCTIONS)
    nq, nli1, nli2, quora1 = (by_file[k][0] for k in ("nq", "allnli_split1", "allnli_split2",
                                                       "quora_duplicates_split1"))
    assert nq["instruction"] == "Given a question, retrieve Wikipedia passages that answer the question; "
    assert nq["doc_instruction"] == ""  # asymmetric retrieval: documents carry no instruction
    # allnli alternates between two prompts (its two halves), and its second half is symmetric
    assert nli1["instruction"] == "Given a premise, retrieve a hypothesis that is entailed by the premise; "
    assert nli2["instruction"] == nli2["doc_instruction"] == "Retrieve semantically similar text; "
    assert nli1["doc_instruction"] == ""
    assert quora1["doc_instruction"] == quora1["instruction"]
    assert by_file["quora_duplicates_split2"][0]["instruction"].startswith("Find questions that have the same")
    # the halves of a dataset are one group
    assert nli1["source"] == nli2["source"] == "allnli" and quora1["source"] == "quora_duplicates"
    assert len({e["source"] for e in ex}) == 14


def test_the_instruction_is_joined_as_llm2vec_joins_it_and_not_pooled():
    """llm2vec's "; " joiner, then the engine's one text rule (engine.encoding.instruction_prefix): the joiner's
    trailing space becomes the newline that never fuses with the query's first word, and EOS ends the text. Every
    token of the query is pooled, none of the instruction."""
    tok = load_tokenizer(load_config("configs/tiny/supervised.yaml", []).model)
    e = next(x for x in read_supervised([SAMPLE])[0] if x["source"] == "fever")
    assert e["instruction"] == "Given a claim, retrieve documents that support or refute the claim; "
    ids, pms, _ = tokenize_with_instruction(tok, [e["query"]], [e["instruction"]], 512, "mean")
    joined = "Given a claim, retrieve documents that support or refute the claim;\n" + e["query"]
    assert ids[0] == tok(joined)["input_ids"] + [tok.eos_token_id]
    pooled = [t for t, m in zip(ids[0], pms[0]) if m]
    assert pooled[-1] == tok.eos_token_id and tok.decode(pooled[:-1]) == e["query"]


def test_one_dataset_per_global_batch_through_the_supervised_stage():
    cfg = load_config("configs/tiny/supervised.yaml", [f"data={SAMPLE}", "batch_size=4", "micro_batch_size=2"])
    stage = build_stage(cfg, load_tokenizer(cfg.model))
    items, stats, groups = stage.load(cfg.data, 0)
    assert len(items) == 96 and groups is not None and len(set(groups)) == 14
    plan = BatchPlan(len(items), 4, 2, 1, 0, seed=3, groups=groups)
    for step in range(plan.steps_per_epoch):
        idx = [i for mb in plan.micro_batches(step) for i in mb]
        assert len({groups[i] for i in idx}) == 1
    # documents of a symmetric dataset carry the instruction (attended, not pooled), others none
    sym = [i for i in range(len(items)) if groups[i] == "quora_duplicates"][:2]
    asym = [i for i in range(len(items)) if groups[i] == "squad"][:2]
    for pick, instructed in ((sym, True), (asym, False)):
        batch = stage.collate([items[i] for i in pick], torch.Generator().manual_seed(0))
        doc_rows = batch["pool_mask"][2:]  # queries first, then positives and negatives
        attended_not_pooled = (batch["attention_mask"][2:] - doc_rows).sum(1)
        assert bool((attended_not_pooled > 0).all()) is instructed


def test_directory_errors(tmp_path):
    with pytest.raises(DataError, match="holds none of the E5 dataset files"):
        read_supervised([str(tmp_path)])
    with pytest.raises(DataError, match="not a file"):
        read_texts([SAMPLE])
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(os.path.join(SAMPLE, "nq.jsonl"), part / "nq.jsonl")
    (part / "nq.jsonl").open("a").write(json.dumps({"query": "q"}) + "\n")
    with pytest.raises(DataError, match=r"nq.jsonl:7: missing field 'positive'"):
        read_supervised([str(part)])


def test_a_folder_missing_an_e5_file_says_so_and_counts_each_file(tmp_path):
    """An interrupted unpack that lost msmarco_passage.jsonl trained on 15 of the 16 datasets with one count for
    the whole folder; now the summary names the missing file (and a .jsonl it does not read), and counts per file."""
    part = tmp_path / "echo-data"
    shutil.copytree(SAMPLE, part)
    os.unlink(part / "msmarco_passage.jsonl")
    shutil.copy(part / "nq.jsonl", part / "allnli_v2.jsonl")  # no E5 dataset of that name: not read
    ex, stats = read_supervised([str(part)])
    assert len(ex) == 15 * 6
    assert stats.missing == ["msmarco_passage.jsonl"] and stats.unread == ["allnli_v2.jsonl"]
    want = {f: n for f, n in read_supervised([SAMPLE])[1].sources.items() if f != "msmarco_passage.jsonl"}
    assert stats.sources == want
    line = stats.summary()
    assert "MISSING 1 E5 dataset file(s) (not trained on): msmarco_passage.jsonl" in line, line
    assert "not read (no E5 dataset): allnli_v2.jsonl" in line
    assert "MISSING" not in read_supervised([SAMPLE])[1].summary()
    # two E5 folders: their file names repeat, so each count and each missing file names its folder
    ex2, both = read_supervised([str(part), SAMPLE])
    assert len(ex2) == 15 * 6 + 16 * 6 and both.missing == [os.path.join(str(part), "msmarco_passage.jsonl")]
    assert both.sources == {**{os.path.join(str(part), f): n for f, n in want.items()},
                            **{os.path.join(SAMPLE, f): n for f, n in read_supervised([SAMPLE])[1].sources.items()}}


def _split_layout(folder):
    """llm2vec 0.1.5's layout from the download's: allnli and quora as two files of halves (even rows, odd rows)."""
    for whole in ("allnli", "quora_duplicates"):
        rows = [line for line in open(folder / f"{whole}.jsonl") if line.strip()]
        for k in (1, 2):
            (folder / f"{whole}_split{k}.jsonl").write_text("".join(rows[k - 1::2]))
        os.unlink(folder / f"{whole}.jsonl")


def test_the_download_layout_and_llm2vec_0_1_5s_halves_read_the_same(tmp_path):
    """The echo-data download holds allnli and quora whole; llm2vec 0.1.6 on gives their rows the two prompts in
    turn. The engine read only 0.1.5's halves (allnli_split1.jsonl, ...), so on the real download it trained on 12 of
    the 14 datasets. Both layouts now give the same examples; a dataset in both layouts is refused (twice the
    rows), and a missing half is named."""
    halves = tmp_path / "halves"
    shutil.copytree(SAMPLE, halves)
    _split_layout(halves)
    key = lambda e: json.dumps(e, sort_keys=True)  # noqa: E731
    whole_ex, whole_stats = read_supervised([SAMPLE])
    half_ex, half_stats = read_supervised([str(halves)])
    assert sorted(map(key, whole_ex)) == sorted(map(key, half_ex)) and len(whole_ex) == 96
    assert half_stats.sources["allnli_split2.jsonl"] == 6 and whole_stats.sources["allnli.jsonl"] == 12
    for e in whole_ex:  # each row took the prompt of the half it names
        half = e["query"].rsplit("(", 1)[1].split()[0]
        assert e["instruction"] == E5_INSTRUCTIONS[half] + "; ", e
    shutil.copy(os.path.join(SAMPLE, "allnli.jsonl"), halves / "allnli.jsonl")
    with pytest.raises(DataError, match="allnli.jsonl and allnli_split1.jsonl: the same dataset whole and in halves"):
        read_supervised([str(halves)])
    os.unlink(halves / "allnli.jsonl")
    os.unlink(halves / "quora_duplicates_split2.jsonl")
    assert read_supervised([str(halves)])[1].missing == ["quora_duplicates_split2.jsonl"]


@pytest.mark.parametrize("n,repeated", [(1, 0), (2, 96)])
def test_rows_with_fewer_negatives_than_the_stage_uses_are_counted(n, repeated):
    """E5 rows hold one hard negative; with num_hard_negatives 2 the batch repeats it (twice the weight in the
    loss), which the data summary now counts."""
    cfg = load_config("configs/tiny/supervised.yaml", [f"data={SAMPLE}", f"contrastive.num_hard_negatives={n}"])
    _, stats, _ = build_stage(cfg, load_tokenizer(cfg.model)).load(cfg.data, 0)
    assert stats.repeated_negatives == repeated
    assert ("repeated negatives 96" in stats.summary()) is bool(repeated)
    assert stats.unused_negatives == 0 and "unused negatives" not in stats.summary()


def test_rows_with_more_negatives_than_the_stage_uses_are_counted(tmp_path):
    """A row's first num_hard_negatives negatives are its negatives in every epoch (collate takes the k-th): the
    rows holding more, whose others are never trained on, are counted in the data line."""
    rows = [{"query": f"q{i}", "positive": f"p{i}", "negative": [f"n{i}{c}" for c in "abc"[:1 + i % 3]]}
            for i in range(9)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for n, unused, repeated in ((1, 6, 0), (2, 3, 3), (3, 0, 6)):
        cfg = load_config("configs/tiny/supervised.yaml", [f"data={path}", f"contrastive.num_hard_negatives={n}"])
        _, stats, _ = build_stage(cfg, load_tokenizer(cfg.model)).load(cfg.data, 0)
        assert (stats.unused_negatives, stats.repeated_negatives) == (unused, repeated)
        assert (f"unused negatives {unused}" in stats.summary()) is bool(unused)


def test_the_item_cache_is_rebuilt_when_the_e5_rules_change(monkeypatch):
    """Cached items hold their E5 instruction: an engine whose table changed must not reuse them."""
    import engine.data

    cfg = load_config("configs/tiny/supervised.yaml", [f"data={SAMPLE}"])
    stage = build_stage(cfg, load_tokenizer(cfg.model))

    def nq_instructions():
        items = stage.load(cfg.data, 0)[0]
        return {items[i]["instruction"] for i in range(len(items)) if items[i]["source"] == "nq"}

    assert nq_instructions() == {E5_INSTRUCTIONS["nq"] + "; "}
    monkeypatch.setitem(engine.data.E5_INSTRUCTIONS, "nq", "Find the passage")
    assert nq_instructions() == {"Find the passage; "}


def test_the_held_out_loss_reads_every_source_in_turn():
    """eval_loss reads the first eval_batches micro-batches: in file order all of an E5 folder's came from its first
    dataset. They now come from each source in turn, each batch from one source, as training draws them."""
    from engine.stages.supervised import by_source

    cfg = load_config("configs/tiny/supervised.yaml", [f"data={SAMPLE}", "micro_batch_size=2"])
    stage = build_stage(cfg, load_tokenizer(cfg.model))
    items, _, _ = stage.load(cfg.data, 0)
    first = {items.groups[i] for i in range(8)}
    assert len(first) == 1  # the old read: 4 batches of 2, one dataset
    picked = by_source(items, 4, 2)
    sources = [e["source"] for e in picked]
    assert len(picked) == 8 and all(sources[2 * b] == sources[2 * b + 1] for b in range(4))  # one source a batch
    assert len({sources[2 * b] for b in range(4)}) == 4, sources  # four batches, four sources
    seen = []
    stage.collate = lambda batch, g: seen.append([e["source"] for e in batch]) or {}

    class Engine:
        def __call__(self, batch):
            return torch.tensor(1.0), {}

    assert stage.batch_losses(Engine(), items, 4) == [1.0] * 4 and [s[0] for s in seen] == sources[::2]
    assert by_source(list(range(5)), 4, 2) == list(range(5))  # no groups: as they are
