"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, optional SPICE) with no download.

``caption_metrics(predictions, gt_path)`` scores a list of ``{"image_id", "caption"}`` against a
local COCO-format ground truth, with pycocoevalcap's scorers, and needs no LAVIS runner (a
threshold sweep calls it directly). Differences from LAVIS 1.0.2's ``coco_caption_eval``: the
ground truth is a local file (LAVIS always downloads the COCO Karpathy one), only the predicted
images are scored (so a subset can be evaluated), and SPICE runs only when asked (it downloads
Stanford CoreNLP on first use). The PTB tokenizer is run from a temporary directory, because
pycocoevalcap's own wrapper writes its temporary file inside site-packages.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from typing import Dict, Hashable, List, Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

from lavis_free.datasets.annotations import load_caption_gt
from lavis_free.tasks.scene_metrics import load_scenes, scene_accuracy

JAVA_HINT = (
    "caption metrics need Java for pycocoevalcap's PTB tokenizer and METEOR; "
    "install a JRE (e.g. apt-get install default-jre-headless)"
)


def _require_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError(JAVA_HINT)


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> Dict[Hashable, List[str]]:
    """Stanford PTB tokenization + punctuation removal, as pycocoevalcap does, in a temp dir."""
    jar = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)), ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    keys = [k for k, caps in captions.items() for _ in caps]
    text = "\n".join(c.replace("\n", " ") for caps in captions.values() for c in caps)
    with tempfile.TemporaryDirectory(prefix="lavis_free_ptb_") as tmp:
        path = os.path.join(tmp, "captions.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        cmd = ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", path]
        lines = subprocess.run(cmd, check=True, stdout=subprocess.PIPE).stdout.decode("utf-8").split("\n")
    out: Dict[Hashable, List[str]] = {k: [] for k in captions}
    for key, line in zip(keys, lines):
        out[key].append(" ".join(w for w in line.rstrip().split(" ") if w not in ptbtokenizer.PUNCTUATIONS))
    return out


SCORERS = ("bleu", "meteor", "rouge", "cider", "spice")
DEFAULT_SCORERS = ("bleu", "meteor", "rouge", "cider")


def check_scorers(scorers: Sequence[str]) -> None:
    unknown = sorted(set(scorers) - set(SCORERS))
    if unknown:
        raise ValueError(f"unknown caption scorers {unknown} (run.caption_scorers); allowed: {', '.join(SCORERS)}")
    if "cider" not in scorers:
        raise ValueError("caption scorers must include 'cider': agg_metrics and the baselines are CIDEr")


def _make_scorer(name: str):
    """(scorer, metric names); SPICE is imported only when asked for (it downloads on first use)."""
    if name == "bleu":
        return Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]
    if name == "meteor":
        return Meteor(), ["METEOR"]
    if name == "rouge":
        return Rouge(), ["ROUGE_L"]
    if name == "cider":
        return Cider(), ["CIDEr"]
    from pycocoevalcap.spice.spice import Spice

    return Spice(), ["SPICE"]


def score_captions(references: Mapping[int, Sequence[str]], hypotheses: Mapping[int, str],
                   scorers: Sequence[str] = DEFAULT_SCORERS) -> Dict[str, float]:
    """Corpus-level scores of one hypothesis per image against its references (same keys).

    ``scorers`` picks among bleu, meteor, rouge, cider, spice: METEOR starts a JVM that loads a
    60 MB paraphrase table, so callers that need only CIDEr (threshold sweeps) skip it.
    """
    check_scorers(scorers)
    _require_java()
    # One tokenizer run for references and hypotheses: a JVM start per call is the slow part.
    tokenized = ptb_tokenize({**{("ref", k): v for k, v in references.items()},
                              **{("hyp", k): [v] for k, v in hypotheses.items()}})
    gts = {k: tokenized[("ref", k)] for k in references}
    res = {k: tokenized[("hyp", k)] for k in hypotheses}
    scores: Dict[str, float] = {}
    for name in scorers:
        scorer, names = _make_scorer(name)
        value, _ = scorer.compute_score(gts, res, verbose=0) if name == "bleu" else scorer.compute_score(gts, res)
        values = value if isinstance(value, list) else [value]
        scores.update({metric: float(v) for metric, v in zip(names, values)})
    return scores


def caption_metrics(predictions: Sequence[Mapping], gt_path: str,
                    scorers: Sequence[str] = DEFAULT_SCORERS) -> Dict[str, float]:
    """Score ``[{"image_id": int, "caption": str}, ...]`` against the COCO-format ``gt_path``.

    ``scorers``: any of bleu, meteor, rouge, cider, spice (default: all but spice).
    Duplicate image ids keep their first caption. Returns the scores plus ``num_images``, and
    when the ground truth holds scenes (shapes), the per-attribute ``scene_*`` accuracies.
    Raises ValueError for malformed predictions or image ids absent from the ground truth.
    """
    references = load_caption_gt(gt_path)
    hypotheses: Dict[int, str] = {}
    for index, pred in enumerate(predictions):
        if not isinstance(pred, Mapping) or "image_id" not in pred or not isinstance(pred.get("caption"), str):
            raise ValueError(f"prediction {index} must be an object with 'image_id' and a string 'caption', got {pred!r}")
        image_id = int(pred["image_id"])
        if image_id not in references:
            raise ValueError(f"prediction {index} has image_id {image_id}, which is not in {gt_path}")
        hypotheses.setdefault(image_id, pred["caption"])
    if not hypotheses:
        raise ValueError("no predictions to score")
    if len(hypotheses) < len(references):
        logging.info("scoring %d of the %d images of %s", len(hypotheses), len(references), gt_path)
    scores = score_captions({k: references[k] for k in hypotheses}, hypotheses, scorers)
    scenes = load_scenes(gt_path)
    if scenes:
        scores.update(scene_accuracy(hypotheses, scenes))
    scores["num_images"] = len(hypotheses)
    return scores
