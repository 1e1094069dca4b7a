"""The tiny models' tokenizers, built from the shapes corpus and shipped with the package.

    python -m lavis_free.models.tokenizers --out lavis_free/models/assets/tokenizers

rebuilds both, deterministically, from the generator's text (seed 0):

- ``opt_tiny/``: a byte-level BPE trained with the ``tokenizers`` library and saved as the files
  ``transformers.GPT2Tokenizer`` reads, laid out like facebook/opt's tokenizer: ids 0..3 are
  ``<s> <pad> </s> <unk>``; bos = eos = unk = ``</s>``, pad = ``<pad>`` (what facebook/opt's
  special_tokens_map says); ``add_bos_token`` so every encoding starts with ``</s>``. LAVIS loads
  it with ``AutoTokenizer.from_pretrained(path, use_fast=False)``, and its generation EOS,
  ``tokenizer("\\n").input_ids[0]``, is a single byte token.
- ``bert_tiny/vocab.txt``: a lowercase WordPiece vocabulary for ``transformers.BertTokenizer``
  (the Q-Former's), holding the special tokens, single characters (so no word becomes
  ``[UNK]``) and every corpus word. LAVIS adds ``[DEC]`` itself, as for bert-base-uncased.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from typing import Iterable, List, Optional, Sequence

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizers")
OPT_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# VQA prompts of LAVIS's BLIP-2 configs; the corpus holds every question wrapped in each, so
# the prompt words become whole tokens ("a photo of", the caption prompt, is already frequent).
VQA_PROMPTS = ("Question: {} Answer:", "Question: {} Short answer:")
DEFAULT_VOCAB_SIZE = 512
DEFAULT_CORPUS_IMAGES = 3000


def opt_tiny_tokenizer_path() -> str:
    """Directory of the shipped OPT-style tokenizer (pass it to ``AutoTokenizer.from_pretrained``)."""
    return os.path.join(ASSETS_DIR, "opt_tiny")


def bert_tiny_vocab_path() -> str:
    """The shipped Q-Former WordPiece vocabulary (``BertTokenizer(vocab_file=...)``)."""
    return os.path.join(ASSETS_DIR, "bert_tiny", "vocab.txt")


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


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lavis_free.models.tokenizers", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=ASSETS_DIR, help="directory that gets opt_tiny/ and bert_tiny/")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shapes corpus")
    parser.add_argument("--images", type=int, default=DEFAULT_CORPUS_IMAGES, help="corpus size in images")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="BPE vocabulary size (OPT)")
    args = parser.parse_args(argv)
    build_all(args.out, args.seed, args.images, args.vocab_size)
    print(f"wrote {os.path.join(args.out, 'opt_tiny')} and {os.path.join(args.out, 'bert_tiny')}")


if __name__ == "__main__":
    main()
