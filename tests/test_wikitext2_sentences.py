"""The general recipe's corpus (data/wikitext2-sentences): the committed file is the one its data card describes,
and make.py's detokeniser and splitter do what the card says, on hand-written lines in WikiText's format."""
import os

from .helpers import ROOT, load_script, sentence_corpus

DIR = os.path.join(ROOT, "data", "wikitext2-sentences")


def _make():
    return load_script(os.path.join(DIR, "make.py"), "wikitext2_make")


def test_committed_file_matches_its_card():
    lines = sentence_corpus("wikitext2-sentences")
    for bad in ("<unk>", " @", " ,", " .", "( ", " )", " 's"):  # WikiText's tokenisation is undone
        assert not any(bad in t for t in lines), bad


def test_detokenise_undoes_wikitexts_tokenisation():
    m = _make()
    got = m.detokenise('It weighs 0 @.@ 7 – 2 @.@ 2 kg ( 1 @,@ 500 g ) , and it \'s the " common lobster " .')
    assert got == 'It weighs 0.7 – 2.2 kg (1,500 g), and it\'s the "common lobster".'
    assert m.detokenise("a well @-@ known case does n't hold ; see [ 1 ] .") == "a well-known case doesn't hold; see [1]."
    assert m.detokenise("I shouldn 't say") == "I shouldn't say"
    assert m.detokenise('He said " go " , then " stop "') == 'He said "go", then "stop"'
    assert m.detokenise('the play ( " too faithful " , he said ) ran') == 'the play ("too faithful", he said) ran'
    assert m.detokenise('an odd " quote here .') == 'an odd " quote here.'  # unbalanced: left alone


def test_sentences_split_filter_and_dedup():
    m = _make()
    lines = [" = Title = ", "",
             " The first sentence has exactly eight words in it . It was found in St. Paul by a <unk> in 1901 . "
             "Short one here . \" Quoted words open this sentence of ten words here , \" he said . \" It ends here and the quote closes with it . \" Then it goes on with a few more words .",
             " = = Section = = ",
             " The first sentence has exactly eight words in it . "]
    got = list(m.sentences(lines))
    assert got == ["The first sentence has exactly eight words in it.",
                   '"Quoted words open this sentence of ten words here," he said.',
                   '"It ends here and the quote closes with it."', "Then it goes on with a few more words."]


def test_make_refuses_inputs_that_are_not_the_pinned_files(tmp_path, capsys):
    m = _make()
    (tmp_path / "valid.txt").write_text(" = A = \n")
    (tmp_path / "test.txt").write_text(" = B = \n")
    assert m.main(["--raw", str(tmp_path), "--out", str(tmp_path / "out.txt")]) == 2
    err = capsys.readouterr().err
    assert "is not the pinned" in err and err.count("\n") == 1 and not (tmp_path / "out.txt").exists()
    assert m.main(["--raw", str(tmp_path / "absent"), "--out", str(tmp_path / "out.txt")]) == 2
