"""The general recipe's supervised rows (data/snli-triplets): the committed file is the one its data card
describes, holds no STS-B sentence, reads as supervised rows, and make.py's steps do what the card says on
hand-written lines in e-SNLI's format."""
import json
import os
import re

from .helpers import ROOT, data_card, load_script

DIR = os.path.join(ROOT, "data", "snli-triplets")


def _make():
    return load_script(os.path.join(DIR, "make.py"), "snli_make")


def test_committed_file_matches_its_card():
    raw, card = data_card("snli-triplets", "triplets.jsonl", "CC BY-SA 4.0")
    rows = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
    assert f"{len(rows):,} JSON lines" in card
    assert all(set(r) == {"query", "positive", "negative"} for r in rows)
    assert all(isinstance(v, str) and v.strip() == v and v for r in rows for v in r.values())
    assert len({tuple(r.values()) for r in rows}) == len(rows)
    texts = [v for r in rows for v in r.values()]
    for bad in (" ,", " .", "``", "''", " n't", " 's", "( ", " )"):  # the PTB tokenisation is undone
        assert not any(bad in t for t in texts), bad


def test_committed_file_holds_no_sts_b_sentence():
    m = _make()
    sts = m.sts_sentences()
    assert len(sts) > 10_000  # every split was read
    with open(os.path.join(DIR, "triplets.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert not [v for r in rows for v in r.values() if m.normalise(v) in sts]


def test_the_supervised_reader_takes_every_row():
    from engine.data import read_supervised

    path = os.path.join(DIR, "triplets.jsonl")
    rows, stats = read_supervised([path])
    assert (stats.read, stats.kept, stats.empty) == (5712, 5712, 0)
    assert "duplicates" not in stats.summary()  # not checked for supervised rows: not printed as 0
    with open(path, encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert len(rows) == 5712 and all(len(r["negatives"]) == 1 and r["instruction"] == "" for r in rows)
    assert (rows[0]["query"], rows[0]["positive"], rows[0]["negatives"]) == (
        first["query"], first["positive"], [first["negative"]])


def test_detokenise_undoes_the_ptb_tokenisation():
    m = _make()
    assert m.detokenise("A man , in a `` big '' hat , is n't smiling ( really ) .") == \
        'A man, in a "big" hat, isn\'t smiling (really).'
    assert m.detokenise("`` Stop ! '' the dog 's owner said .") == '"Stop!" the dog\'s owner said.'
    assert m.detokenise("It costs $ 5 ; they 're here : now ? ") == "It costs $5; they're here: now?"
    assert m.detokenise("A T-shirt , a ping-pong table .") == "A T-shirt, a ping-pong table."


def test_build_groups_by_premise_and_drops_what_the_card_says():
    m = _make()
    raw = {"s1.dev": ["A dog runs .", "A dog runs .", "A dog runs .", "Two men sit .", "Two men sit .",
                      "A cat sleeps .", "A cat sleeps ."],
           "s2.dev": ["An animal moves .", "A dog plays .", "A cat sits .", "Men sit .", "Men stand .",
                      "A cat rests .", "A dog barks ."],
           "labels.dev": ["entailment", "entailment", "contradiction", "neutral", "contradiction",
                          "entailment", "contradiction"],
           # the test split repeats a dev row, and holds one sharing a sentence with STS-B
           "s1.test": ["A dog runs .", "A dog runs .", "A girl sings .", "A girl sings ."],
           "s2.test": ["An animal moves .", "A cat sits .", "Someone sings .", "A boy dances ."],
           "labels.test": ["entailment", "contradiction", "entailment", "contradiction"]}
    sts = {m.normalise("A BOY dances!")}
    rows, counts = m.build(raw, sts)
    assert rows == [{"query": "A dog runs.", "positive": "An animal moves.", "negative": "A cat sits."},
                    {"query": "A cat sleeps.", "positive": "A cat rests.", "negative": "A dog barks."}]
    assert counts == {"dev_pairs": 7, "dev_premises_without_both_labels": 1, "test_pairs": 4,
                      "test_premises_without_both_labels": 0, "dropped_repeats": 1,
                      "dropped_sharing_a_sentence_with_sts_b": 1, "rows": 2}


def test_make_refuses_inputs_that_are_not_the_pinned_files(tmp_path, capsys):
    m = _make()
    for name in m.RAW:
        (tmp_path / name).write_text("A dog runs .\n")
    assert m.main(["--raw", str(tmp_path), "--out", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "is not the pinned" in err and err.count("\n") == 1 and not (tmp_path / "out.jsonl").exists()
    assert m.main(["--raw", str(tmp_path / "absent"), "--out", str(tmp_path / "out.jsonl")]) == 2
    assert re.search(r"absent/s1\.dev: No such file", capsys.readouterr().err)
