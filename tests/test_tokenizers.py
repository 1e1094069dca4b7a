"""The shipped tiny tokenizers load offline the way LAVIS loads them and behave like OPT's / BERT's."""
import filecmp
import json
import os

import pytest
from transformers import AutoTokenizer, BertTokenizer

from lavis_free.datasets.shapes import iter_items
from lavis_free.models.tokenizers import bert_tiny_vocab_path, build_all, opt_tiny_tokenizer_path


@pytest.fixture(scope="module")
def opt_tok():
    return AutoTokenizer.from_pretrained(opt_tiny_tokenizer_path(), use_fast=False)


def _captions(n=40):
    return [c for it in iter_items(7, "val", n) for c in it.text.captions]


def test_opt_special_tokens_like_facebook_opt(opt_tok):
    assert type(opt_tok).__name__ == "GPT2Tokenizer"
    assert opt_tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<s>", "<pad>", "</s>", "<unk>"]
    assert (opt_tok.bos_token, opt_tok.eos_token, opt_tok.pad_token) == ("</s>", "</s>", "<pad>")
    assert (opt_tok.bos_token_id, opt_tok.eos_token_id, opt_tok.pad_token_id) == (2, 2, 1)
    assert 400 <= len(opt_tok) <= 600


def test_opt_newline_is_one_token_and_bos_prepended(opt_tok):
    newline = opt_tok("\n", add_special_tokens=False).input_ids
    assert len(newline) == 1
    ids = opt_tok("a red circle\n").input_ids
    assert ids[0] == opt_tok.bos_token_id and ids[-1] == newline[0]


def test_opt_round_trip_and_whole_words(opt_tok):
    for caption in _captions():
        ids = opt_tok(caption).input_ids
        assert opt_tok.decode(ids, skip_special_tokens=True).strip() == caption
    # Frequent words are single tokens: one token per word plus bos.
    assert len(opt_tok("a large red circle in the top left corner").input_ids) == 10


def test_bert_vocab_covers_corpus_words():
    tok = BertTokenizer(vocab_file=bert_tiny_vocab_path())
    with open(bert_tiny_vocab_path(), encoding="utf-8") as f:
        vocab = f.read().split("\n")
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for caption in _captions():
        pieces = tok.tokenize(caption)
        assert "[UNK]" not in pieces
        assert not any(p.startswith("##") for p in pieces), caption
    assert tok.tokenize("Zebra") == ["z", "##e", "##b", "##r", "##a"]


def test_rebuild_is_deterministic_and_matches_shipped(tmp_path):
    build_all(str(tmp_path))
    shipped = os.path.dirname(opt_tiny_tokenizer_path())
    for sub, names in (("opt_tiny", ["vocab.json", "merges.txt", "tokenizer_config.json"]), ("bert_tiny", ["vocab.txt"])):
        match, mismatch, errors = filecmp.cmpfiles(os.path.join(shipped, sub), str(tmp_path / sub), names, shallow=False)
        assert mismatch == [] and errors == [], (sub, mismatch, errors)
    with open(tmp_path / "opt_tiny" / "special_tokens_map.json") as f:
        assert json.load(f)["pad_token"] == "<pad>"
