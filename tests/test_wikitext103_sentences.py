"""The larger general corpus (data/wikitext103-sentences): the committed file is the one its data card describes,
and make.py drops the input's unterminated last line, then applies the WikiText-2 corpus's rules to the rest."""
import hashlib
import os

from .helpers import ROOT, load_script, sentence_corpus

DIR = os.path.join(ROOT, "data", "wikitext103-sentences")


def _make():
    return load_script(os.path.join(DIR, "make.py"), "wikitext103_make")


def test_committed_file_matches_its_card():
    lines = sentence_corpus("wikitext103-sentences")
    for bad in ("<unk>", " @-@ ", " @.@ ", " @,@ ", " ,", " .", "( ", " )"):  # WikiText's tokenisation is undone
        assert not any(bad in t for t in lines), bad
    with open(os.path.join(ROOT, "data", "wikitext2-sentences", "sentences.txt"), encoding="utf-8") as f:
        assert len(set(lines) & set(f.read().splitlines())) == 1  # "One sentence is in both files."


def test_complete_lines_keeps_only_terminated_lines():
    m = _make()
    assert m.complete_lines(" a \n b \nc cut") == ([" a ", " b "], "c cut")
    assert m.complete_lines(" a \n\n") == ([" a ", ""], "")
    assert m.complete_lines("cut") == ([], "cut")


def test_make_applies_the_wikitext2_rules_and_drops_the_cut_line(tmp_path, monkeypatch, capsys):
    m = _make()
    text = (" = Title = \n \n The first sentence has exactly eight words in it . It was found by a <unk> "
            "in 1901 . Short one here . It weighs 0 @.@ 7 kg ( 1 @,@ 500 g ) , and it 's common enough . \n"
            " This paragraph was cut in the middle of its first sentence by the")
    raw = tmp_path / "head.tokens"
    raw.write_bytes(text.encode("utf-8"))
    monkeypatch.setattr(m, "RAW_SHA256", hashlib.sha256(text.encode("utf-8")).hexdigest())
    out = tmp_path / "out.txt"
    assert m.main(["--raw", str(raw), "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8").splitlines() == [
        "The first sentence has exactly eight words in it.",
        "It weighs 0.7 kg (1,500 g), and it's common enough."]
    assert "2 sentences from 3 lines" in capsys.readouterr().out


def test_make_refuses_inputs_that_are_not_the_pinned_file(tmp_path, capsys):
    m = _make()
    raw = tmp_path / "head.tokens"
    raw.write_text(" = A = \n")
    assert m.main(["--raw", str(raw), "--out", str(tmp_path / "out.txt")]) == 2
    err = capsys.readouterr().err
    assert "is not the pinned" in err and err.count("\n") == 1 and not (tmp_path / "out.txt").exists()
    assert m.main(["--raw", str(tmp_path / "absent"), "--out", str(tmp_path / "out.txt")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
