"""The tiny models' tokenizers, built from the shapes corpus and shipped with the package.

    python -m lavis_free.models.tokenizers --out lavis_free/models/assets/tokenizers

rebuilds all four, deterministically, from the generator's text (seed 0):

- ``opt_tiny/``: a byte-level BPE trained with the ``tokenizers`` library and saved as the files
  ``transformers.GPT2Tokenizer`` reads, laid out like facebook/opt's tokenizer: ids 0..3 are
  ``<s> <pad> </s> <unk>``; bos = eos = unk = ``</s>``, pad = ``<pad>`` (what facebook/opt's
  special_tokens_map says); ``add_bos_token`` so every encoding starts with ``</s>``. LAVIS loads
  it with ``AutoTokenizer.from_pretrained(path, use_fast=False)``, and its generation EOS,
  ``tokenizer("\\n").input_ids[0]``, is a single byte token.
- ``bert_tiny/vocab.txt``: a lowercase WordPiece vocabulary for ``transformers.BertTokenizer``
  (the Q-Former's), holding the special tokens, single characters (so no word becomes
  ``[UNK]``) and every corpus word. LAVIS adds ``[DEC]`` itself, as for bert-base-uncased.
- ``t5_tiny/tokenizer.json``: a SentencePiece-style Unigram model (what google/flan-t5's
  ``tokenizer.json`` holds) for ``transformers.T5TokenizerFast`` (what LAVIS's Blip2T5 loads),
  laid out like T5's: ids 0..2 are ``<pad> </s> <unk>`` (pad = decoder start, eos, unk), every
  encoding ends with ``</s>``, no sentinel ``<extra_id_*>`` tokens (``extra_ids: 0``). It is not
  trained: its pieces are the corpus words (``▁word``) and punctuation scored by log frequency,
  then single characters far below them, so every corpus word is one token and any ASCII text
  encodes without ``<unk>``. There is no ``spiece.model``: the slow ``T5Tokenizer`` cannot load it.
- ``llama_tiny/tokenizer.model``: a SentencePiece BPE model (what LLaMA / Vicuna ship) for
  ``transformers.LlamaTokenizer`` (what LAVIS main's InstructBLIP Vicuna loads, ``use_fast=False``):
  ``<unk> <s> </s>`` are ids 0..2, byte fallback; LAVIS adds ``[PAD]`` and makes bos = eos = unk
  = ``</s>`` itself, as for Vicuna.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections import Counter
from typing import Iterable, List, Optional, Sequence

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizers")
OPT_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5's SentencePiece vocabulary
T5_SPACE = "\u2581"  # SentencePiece's word-start marker
T5_CHAR_PENALTY = 10.0  # single characters score this far below the rarest word piece
# VQA prompts of LAVIS's BLIP-2 configs; the corpus holds every question wrapped in each, so
# the prompt words become whole tokens ("a photo of", the caption prompt, is already frequent).
VQA_PROMPTS = ("Question: {} Answer:", "Question: {} Short answer:")
DEFAULT_VOCAB_SIZE = 512
LLAMA_VOCAB_SIZE = 512  # SentencePiece BPE pieces, bytes (byte fallback) included
DEFAULT_CORPUS_IMAGES = 3000


def opt_tiny_tokenizer_path() -> str:
    """Directory of the shipped OPT-style tokenizer (pass it to ``AutoTokenizer.from_pretrained``)."""
    return os.path.join(ASSETS_DIR, "opt_tiny")


def bert_tiny_vocab_path() -> str:
    """The shipped Q-Former WordPiece vocabulary (``BertTokenizer(vocab_file=...)``)."""
    return os.path.join(ASSETS_DIR, "bert_tiny", "vocab.txt")


def llama_tiny_tokenizer_path() -> str:
    """Directory of the shipped LLaMA-style tokenizer (``LlamaTokenizer.from_pretrained``)."""
    return os.path.join(ASSETS_DIR, "llama_tiny")


def t5_tiny_tokenizer_path() -> str:
    """Directory of the shipped T5-style tokenizer (pass it to ``T5TokenizerFast.from_pretrained``)."""
    return os.path.join(ASSETS_DIR, "t5_tiny")


def _write_json(path: str, obj: object) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def build_opt_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> None:
    """Train a byte-level BPE on ``texts`` and write a GPT2Tokenizer directory that acts like OPT's."""
    from tokenizers import ByteLevelBPETokenizer

    os.makedirs(out_dir, exist_ok=True)
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(
        list(texts), vocab_size=vocab_size, min_frequency=2, special_tokens=list(OPT_SPECIAL_TOKENS), show_progress=False
    )
    bpe.save_model(out_dir)
    specials = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), specials)
    _write_json(
        os.path.join(out_dir, "tokenizer_config.json"),
        dict(specials, tokenizer_class="GPT2Tokenizer", add_bos_token=True, add_prefix_space=False,
             errors="replace", model_max_length=512),
    )


def build_bert_vocab(texts: Iterable[str], out_dir: str) -> None:
    """Write ``vocab.txt``: specials, characters and their ``##`` forms, then words by frequency."""
    from transformers.models.bert.tokenization_bert import BasicTokenizer

    basic = BasicTokenizer(do_lower_case=True)
    counts: Counter = Counter()
    for text, n in Counter(texts).items():  # the corpus repeats itself a lot: tokenize each text once
        for word in basic.tokenize(text):
            counts[word] += n
    chars = sorted({ch for word in counts for ch in word} | set("abcdefghijklmnopqrstuvwxyz0123456789.,?!:;'\"-"))
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    vocab: List[str] = list(BERT_SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars if c.isalnum()] + words
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {"do_lower_case": True, "tokenizer_class": "BertTokenizer"})


def _t5_pieces(text: str) -> List[str]:
    """SentencePiece-style pieces of one text: each whitespace-separated chunk splits into words
    and single punctuation marks; the chunk's first piece carries the word-start marker."""
    pieces = []
    for chunk in text.split():
        parts = re.findall(r"\w+|[^\w\s]", chunk)
        pieces.extend([T5_SPACE + parts[0]] + parts[1:])
    return pieces


def build_t5_tokenizer(texts: Iterable[str], out_dir: str) -> None:
    """Write a ``T5TokenizerFast`` directory: a Unigram model over the corpus pieces (see the
    module docstring), T5's normalizer, Metaspace pre-tokenizer/decoder and ``$A </s>`` template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    counts: Counter = Counter()
    for text, n in Counter(texts).items():  # the corpus repeats itself a lot: split each text once
        for piece in _t5_pieces(text):
            counts[piece] += n
    total = sum(counts.values())
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    vocab = [(token, 0.0) for token in T5_SPECIAL_TOKENS]
    vocab += [(piece, round(math.log(n / total), 6)) for piece, n in ranked]
    char_score = round(vocab[-1][1] - T5_CHAR_PENALTY, 6)
    known = {piece for piece, _ in vocab}
    chars = [T5_SPACE] + [chr(c) for c in range(33, 127)]  # printable ASCII, then their word-start forms
    chars += [T5_SPACE + ch for ch in chars[1:]]
    vocab += [(piece, char_score) for piece in chars if piece not in known]

    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=T5_SPECIAL_TOKENS.index("<unk>")))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=T5_SPACE, add_prefix_space=True)
    tokenizer.decoder = decoders.Metaspace(replacement=T5_SPACE, add_prefix_space=True)
    eos = T5_SPECIAL_TOKENS.index("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    tokenizer.add_special_tokens(list(T5_SPECIAL_TOKENS))
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), specials)
    _write_json(
        os.path.join(out_dir, "tokenizer_config.json"),
        dict(specials, tokenizer_class="T5Tokenizer", extra_ids=0, model_max_length=512),
    )


def build_llama_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = LLAMA_VOCAB_SIZE) -> None:
    """Write a ``LlamaTokenizer`` directory: a SentencePiece BPE model trained on the corpus with
    LLaMA's special-token layout (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, byte fallback so any text
    encodes), single-threaded so the model file is the same on every run."""
    import contextlib

    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    # relative paths, inside out_dir: the model file records its trainer's input and prefix
    with contextlib.chdir(out_dir):
        with open("corpus.txt", "w", encoding="utf-8") as f:
            f.write("\n".join(sorted(set(texts))) + "\n")
        try:
            spm.SentencePieceTrainer.train(
                input="corpus.txt", model_prefix="tokenizer", vocab_size=vocab_size, model_type="bpe",
                character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
                add_dummy_prefix=True, minloglevel=2,
            )
        finally:
            os.remove("corpus.txt")
        os.remove("tokenizer.vocab")
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 2048,
    })


def tokenizer_corpus(seed: int = 0, num_images: int = DEFAULT_CORPUS_IMAGES) -> List[str]:
    """Shapes text (captions, questions, answers, dialogue) plus the questions in VQA prompts."""
    from lavis_free.datasets.shapes import corpus_texts

    texts = corpus_texts(seed=seed, num_images=num_images)
    questions = [t for t in texts if t.endswith("?")]
    return texts + [prompt.format(q) for prompt in VQA_PROMPTS for q in questions]


def build_all(out_dir: str, seed: int = 0, num_images: int = DEFAULT_CORPUS_IMAGES,
              vocab_size: int = DEFAULT_VOCAB_SIZE) -> None:
    texts = tokenizer_corpus(seed, num_images)
    build_opt_tokenizer(texts, os.path.join(out_dir, "opt_tiny"), vocab_size)
    build_bert_vocab(texts, os.path.join(out_dir, "bert_tiny"))
    build_t5_tokenizer(texts, os.path.join(out_dir, "t5_tiny"))
    build_llama_tokenizer(texts, os.path.join(out_dir, "llama_tiny"))


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lavis_free.models.tokenizers", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=ASSETS_DIR, help="directory that gets opt_tiny/, bert_tiny/, t5_tiny/ and llama_tiny/")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shapes corpus")
    parser.add_argument("--images", type=int, default=DEFAULT_CORPUS_IMAGES, help="corpus size in images")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="BPE vocabulary size (OPT)")
    args = parser.parse_args(argv)
    build_all(args.out, args.seed, args.images, args.vocab_size)
    written = [os.path.join(args.out, name) for name in ("opt_tiny", "bert_tiny", "t5_tiny", "llama_tiny")]
    print(f"wrote {', '.join(written)}")


if __name__ == "__main__":
    main()
