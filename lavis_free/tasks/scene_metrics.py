"""Per-attribute accuracy of shapes captions against the scene each image shows.

CIDEr rewards wording shared with the references; it does not say whether "a small red circle
in the top left" got the colour, shape, size and position right. Here each generated caption is
read back into object mentions by the shapes language's own vocabulary
(`lavis_free.datasets.shapes_language`), each mention is matched to the scene object it agrees
with most, and every attribute the caption states is scored:

- colour, shape, size, position: right if it is the matched object's;
- count: a number word before "shapes" counts all objects ("two other shapes": all but one),
  before a colour and a plural shape the objects of that colour and shape.

An attribute the caption does not state is not scored; `coverage` is the share of scene objects
some mention matched, so a caption cannot score well by saying little. The scenes come from the
COCO ground-truth file's image entries (``"scene"``, written by `lavis_free.datasets.shapes`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

from lavis_free.datasets.shapes_language import NUMBER_WORDS, SHAPE_SYNONYMS, SIZE_SYNONYMS, plural
from lavis_free.datasets.shapes_scene import COLOURS

ATTRIBUTES = ("colour", "shape", "size", "position", "count")
_SHAPE_WORDS = {word: shape for shape, words in SHAPE_SYNONYMS.items() for w in words for word in (w, plural(w))}
_PLURALS = {plural(w) for words in SHAPE_SYNONYMS.values() for w in words}
_SIZE_WORDS = {w: size for size, words in SIZE_SYNONYMS.items() for w in words if " " not in w}
_NUMBERS = {w: n for n, w in enumerate(NUMBER_WORDS)} | {"single": 1}
_VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_HORIZONTAL = {"left", "right"}
_CENTRE = {"center", "middle"}


@dataclass
class Mention:
    """What a caption says about one object (or a group: `count` set, no size or position)."""

    colour: str
    shape: str
    size: Optional[str] = None
    position: Optional[str] = None
    count: Optional[int] = None


def _position(words: Sequence[str]) -> Optional[str]:
    vertical = next((_VERTICAL[w] for w in words if w in _VERTICAL), None)
    horizontal = next((w for w in words if w in _HORIZONTAL), None)
    if vertical and horizontal:
        return f"{vertical} {horizontal}"
    if vertical or horizontal:
        return vertical or horizontal
    return "center" if any(w in _CENTRE for w in words) else None


def parse_caption(caption: str) -> "tuple[List[Mention], List[tuple]]":
    """(object mentions, total-count claims as (number, "all" | "others")) of one caption."""
    words = caption.lower().replace(",", " , ").split()
    nouns = [i for i, w in enumerate(words) if w in _SHAPE_WORDS and i > 0 and words[i - 1] in COLOURS]
    mentions, totals = [], []
    for k, i in enumerate(nouns):
        mention = Mention(colour=words[i - 1], shape=_SHAPE_WORDS[words[i]])
        before = words[i - 2] if i >= 2 else ""
        if before == "sized" and i >= 3 and words[i - 3] == "medium":
            mention.size = "medium"
        elif before in _SIZE_WORDS:
            mention.size = _SIZE_WORDS[before]
        if words[i] in _PLURALS and before in _NUMBERS:
            mention.count = _NUMBERS[before]
        elif before in ("one", "single"):
            mention.count = 1
        end = nouns[k + 1] - 1 if k + 1 < len(nouns) else len(words)
        tail = words[i + 1:end]
        if "and" in tail:
            tail = tail[:tail.index("and")]
        if mention.count is None or mention.count == 1:
            mention.position = _position(tail)
        mentions.append(mention)
    for i, w in enumerate(words[:-1]):
        if w in _NUMBERS and words[i + 1] in ("shapes", "shape"):
            totals.append((_NUMBERS[w], "all"))
        elif w in _NUMBERS and words[i + 1] == "other" and i + 2 < len(words) and words[i + 2] in ("shapes", "shape"):
            totals.append((_NUMBERS[w], "others"))
    return mentions, totals


def _match(mention: Mention, scene: Sequence[Mapping[str, str]]) -> int:
    """The index of the scene object the mention agrees with most (reading order breaks ties)."""
    def agreement(obj: Mapping[str, str]) -> int:
        return sum(getattr(mention, a) == obj[a] for a in ("colour", "shape", "size", "position"))
    return max(range(len(scene)), key=lambda j: (agreement(scene[j]), -j))


def scene_accuracy(captions: Mapping[int, str], scenes: Mapping[int, Sequence[Mapping[str, str]]]) -> Dict[str, float]:
    """Per attribute: the share of stated values that are right (``scene_<attribute>``), how many
    were stated (``scene_<attribute>_n``), and ``scene_coverage``."""
    right = dict.fromkeys(ATTRIBUTES, 0)
    stated = dict.fromkeys(ATTRIBUTES, 0)
    matched_objects = total_objects = 0
    for image_id, caption in captions.items():
        scene = scenes[image_id]
        mentions, totals = parse_caption(caption)
        matched = set()
        for mention in mentions:
            j = _match(mention, scene)
            matched.add(j)
            if mention.count is not None:  # a group ("two red circles") covers its members
                matched.update(k for k, o in enumerate(scene) if (o["colour"], o["shape"]) == (mention.colour, mention.shape))
            for attribute in ("colour", "shape", "size", "position"):
                value = getattr(mention, attribute)
                if value is not None:
                    stated[attribute] += 1
                    right[attribute] += value == scene[j][attribute]
            if mention.count is not None:
                stated["count"] += 1
                right["count"] += mention.count == sum(
                    (o["colour"], o["shape"]) == (mention.colour, mention.shape) for o in scene)
        for number, kind in totals:
            stated["count"] += 1
            right["count"] += number == len(scene) - (kind == "others")
        matched_objects += len(matched)
        total_objects += len(scene)
    out: Dict[str, float] = {}
    for attribute in ATTRIBUTES:
        out[f"scene_{attribute}"] = right[attribute] / stated[attribute] if stated[attribute] else None
        out[f"scene_{attribute}_n"] = stated[attribute]
    out["scene_coverage"] = matched_objects / total_objects if total_objects else None
    return out


def load_scenes(gt_path: str) -> Dict[int, List[dict]]:
    """Scenes per image id from a COCO ground-truth file; empty when it has none (real data)."""
    with open(gt_path, "r", encoding="utf-8") as f:
        images = json.load(f).get("images", [])
    return {int(im["id"]): im["scene"] for im in images if isinstance(im, dict) and "scene" in im}
