"""Language of the synthetic "shapes" dataset: captions, VQA questions and dialogue rounds.

Everything here is a function of a :class:`Scene` and an RNG. Captions come from several
templates with synonyms (so the 5 references of an image disagree in wording, as COCO's do, and
CIDEr's consensus weighting means something). VQA answers come as 10 "human" answers that
mostly agree, with a little realistic disagreement (confusable colours, off-by-one counts,
synonyms), more of it when the object asked about is small.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

from lavis_free.datasets.shapes_scene import COLOURS, SHAPES, Scene, ShapeObject

CAPTIONS_PER_IMAGE = 5

NUMBER_WORDS = ("zero", "one", "two", "three")
SHAPE_SYNONYMS: Dict[str, Tuple[str, ...]] = {
    "circle": ("circle", "disk"),
    "square": ("square",),
    "triangle": ("triangle",),
    "star": ("star",),
    "diamond": ("diamond", "rhombus"),
}
SIZE_SYNONYMS: Dict[str, Tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium", "medium sized"),
    "large": ("large", "big"),
}
_SYNONYM_PROB = 0.2
_MAX_WRONG_ANSWERS = 3

# What a careless annotator says instead of the right answer.
_ALTERNATIVES: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "color": {
        "red": ("orange",), "orange": ("red", "yellow"), "yellow": ("orange",),
        "green": ("blue",), "blue": ("purple",), "purple": ("blue", "violet"),
    },
    "shape": {
        "circle": ("dot", "oval"), "square": ("rectangle",), "triangle": ("pyramid",),
        "star": ("pentagon",), "diamond": ("rhombus", "square"),
    },
    "position": {
        "top left": ("upper left", "top left corner"), "top": ("top center", "top middle"),
        "top right": ("upper right", "top right corner"), "left": ("middle left", "left side"),
        "center": ("middle",), "right": ("middle right", "right side"),
        "bottom left": ("lower left", "bottom left corner"), "bottom": ("bottom center",),
        "bottom right": ("lower right", "bottom right corner"),
    },
    "size": {"small": ("tiny", "medium"), "medium": ("small", "large"), "large": ("big", "medium")},
    "yes/no": {"yes": ("no",), "no": ("yes",)},
}


@dataclass(frozen=True)
class QA:
    """One VQA question with its 10 human answers."""

    question_type: str
    question: str
    answers: Tuple[str, ...]


@dataclass(frozen=True)
class ImageText:
    """All text of one image."""

    captions: Tuple[str, ...]
    questions: Tuple[QA, ...]
    dialog: Tuple[Tuple[str, str], ...]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith("s") else "s")


def join_list(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def dialogue_context(history: Sequence[Tuple[str, str]], question: str) -> str:
    """The text a model sees for a dialogue round: earlier rounds, then the current question."""
    return " ".join([f"{q} {a}" for q, a in history] + [question])


def _shape_word(shape: str, rng: random.Random) -> str:
    synonyms = SHAPE_SYNONYMS[shape]
    return rng.choice(synonyms[1:]) if len(synonyms) > 1 and rng.random() < _SYNONYM_PROB else shape


def _size_word(size: str, rng: random.Random) -> str:
    return rng.choice(SIZE_SYNONYMS[size])


def position_phrase(obj: ShapeObject, rng: random.Random) -> str:
    """A prepositional phrase for the object's grid cell, e.g. 'in the upper left corner'."""
    name = obj.position
    if name == "center":
        options = ["in the center", "in the middle", "at the center"]
    elif " " in name:
        vertical, horizontal = name.split()
        other = {"top": "upper", "bottom": "lower"}[vertical]
        options = [f"in the {name}", f"in the {name} corner", f"at the {name}", f"in the {other} {horizontal}"]
    elif name in ("top", "bottom"):
        options = [f"at the {name}", f"at the {name} center", f"near the {name}"]
    else:
        options = [f"on the {name}", f"on the {name} side", f"at the {name}"]
    return rng.choice(options)


def noun_phrase(obj: ShapeObject, rng: random.Random, with_size: bool) -> str:
    words = ([_size_word(obj.size, rng)] if with_size else []) + [obj.colour, _shape_word(obj.shape, rng)]
    return f"{article(words[0])} {' '.join(words)}"


def groups(scene: Scene) -> List[List[ShapeObject]]:
    """Objects grouped by (colour, shape), in reading order of their first member."""
    grouped: Dict[Tuple[str, str], List[ShapeObject]] = {}
    for obj in scene.objects:
        grouped.setdefault((obj.colour, obj.shape), []).append(obj)
    return list(grouped.values())


def group_phrase(group: List[ShapeObject], rng: random.Random, with_size: bool) -> str:
    if len(group) == 1:
        return noun_phrase(group[0], rng, with_size)
    return f"{NUMBER_WORDS[len(group)]} {group[0].colour} {plural(_shape_word(group[0].shape, rng))}"


def _single_captions(obj: ShapeObject) -> List[Callable[[random.Random], str]]:
    return [
        lambda r: f"{noun_phrase(obj, r, True)} {position_phrase(obj, r)}",
        lambda r: f"{noun_phrase(obj, r, False)} {position_phrase(obj, r)}",
        lambda r: f"there is {noun_phrase(obj, r, True)} {position_phrase(obj, r)}",
        lambda r: f"a photo of {noun_phrase(obj, r, False)}",
        lambda r: f"{noun_phrase(obj, r, r.random() < 0.5)} on a plain background",
        lambda r: f"a single {_size_word(obj.size, r)} {obj.colour} {_shape_word(obj.shape, r)}",
        lambda r: f"one {obj.colour} {_shape_word(obj.shape, r)} {position_phrase(obj, r)}",
        lambda r: f"{noun_phrase(obj, r, False)} placed {position_phrase(obj, r)}",
        lambda r: f"an image with {noun_phrase(obj, r, True)} {position_phrase(obj, r)}",
    ]


def _multi_captions(scene: Scene) -> List[Callable[[random.Random], str]]:
    grouped = groups(scene)
    count = NUMBER_WORDS[len(scene.objects)]
    largest = max(scene.objects, key=lambda o: ("small", "medium", "large").index(o.size))
    others = len(scene.objects) - 1
    other_words = f"{NUMBER_WORDS[others]} other {'shape' if others == 1 else 'shapes'}"
    verb = "is" if len(grouped[0]) == 1 else "are"

    def listed(r: random.Random, with_size: bool) -> str:
        return join_list([group_phrase(g, r, with_size) for g in grouped])

    def placed(r: random.Random) -> str:
        return join_list([f"{noun_phrase(o, r, False)} {position_phrase(o, r)}" for o in scene.objects])

    return [
        lambda r: listed(r, False),
        lambda r: listed(r, True),
        lambda r: f"a photo of {listed(r, False)}",
        lambda r: placed(r),
        lambda r: f"there {verb} {listed(r, False)}",
        lambda r: f"{noun_phrase(largest, r, True)} and {other_words}",
        lambda r: f"{count} shapes including {group_phrase(r.choice(grouped), r, False)}",
        lambda r: f"{listed(r, r.random() < 0.5)} on a plain background",
    ]


def captions(scene: Scene, rng: random.Random) -> Tuple[str, ...]:
    """Five distinct captions from randomly chosen templates."""
    templates = _single_captions(scene.objects[0]) if len(scene.objects) == 1 else _multi_captions(scene)
    chosen: List[str] = []
    for template in rng.sample(templates, len(templates)):
        text = template(rng)
        if text not in chosen:
            chosen.append(text)
        if len(chosen) == CAPTIONS_PER_IMAGE:
            break
    return tuple(chosen)


def human_answers(question_type: str, answer: str, hard: bool, rng: random.Random) -> Tuple[str, ...]:
    """Ten annotator answers: the right one at least 7 times, otherwise plausible mistakes.

    Each annotator errs with a small probability (larger when ``hard``); at most 3 err, so the
    right answer always scores full VQA accuracy and stays the majority.
    """
    if question_type == "count":
        value = int(answer)
        alternatives = tuple(str(v) for v in (value - 1, value + 1) if v >= 0)
    else:
        alternatives = _ALTERNATIVES[question_type][answer]
    p_wrong = 0.15 if hard else 0.05
    wrong = min(_MAX_WRONG_ANSWERS, sum(rng.random() < p_wrong for _ in range(10)))
    wrong_slots = set(rng.sample(range(10), wrong))
    return tuple(rng.choice(alternatives) if i in wrong_slots else answer for i in range(10))


def _question_candidates(scene: Scene, rng: random.Random) -> Dict[str, List[Tuple[str, str, bool]]]:
    """Per question type: (question, right answer, hard) for every question that is unambiguous."""
    objs = scene.objects
    any_small = any(o.size == "small" for o in objs)
    by_shape = {s: [o for o in objs if o.shape == s] for s in SHAPES}
    by_colour = {c: [o for o in objs if o.colour == c] for c in COLOURS}
    pairs = {(o.colour, o.shape): [p for p in objs if (p.colour, p.shape) == (o.colour, o.shape)] for o in objs}
    cands: Dict[str, List[Tuple[str, str, bool]]] = {t: [] for t in ("color", "shape", "count", "position", "yes/no", "size")}

    cands["count"].append(("how many shapes are there?", str(len(objs)), any_small or len(objs) == 3))
    colour = rng.choice(tuple(COLOURS))
    cands["count"].append((f"how many {colour} shapes are there?", str(len(by_colour[colour])), any_small))
    shape = rng.choice(SHAPES)
    cands["count"].append((f"how many {plural(shape)} are there?", str(len(by_shape[shape])), any_small))

    for shape, members in by_shape.items():
        if members and len({o.colour for o in members}) == 1:
            hard = any(o.size == "small" for o in members)
            question = f"what color is the {shape}?" if len(members) == 1 else f"what color are the {plural(shape)}?"
            cands["color"].append((question, members[0].colour, hard))
    for obj in objs:
        small = obj.size == "small"
        cands["shape"].append((f"what shape is {position_phrase(obj, rng)}?", obj.shape, small))
        if len(by_colour[obj.colour]) == 1:
            cands["shape"].append((f"what shape is the {obj.colour} object?", obj.shape, small))
        if len(pairs[(obj.colour, obj.shape)]) == 1:
            cands["position"].append((f"where is the {obj.colour} {obj.shape}?", obj.position, small))
            cands["size"].append((f"how big is the {obj.colour} {obj.shape}?", obj.size, small))

    if rng.random() < 0.5:
        obj = rng.choice(objs)
        cands["yes/no"].append((f"is there {article(obj.colour)} {obj.colour} {obj.shape}?", "yes", obj.size == "small"))
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in pairs]
        colour, shape = rng.choice(absent)
        cands["yes/no"].append((f"is there {article(colour)} {colour} {shape}?", "no", any_small))
    return cands


def vqa_questions(scene: Scene, rng: random.Random) -> Tuple[QA, ...]:
    """One question of each type that has an unambiguous question for this scene."""
    out = []
    for question_type, options in _question_candidates(scene, rng).items():
        if options:
            question, answer, hard = rng.choice(options)
            out.append(QA(question_type, question, human_answers(question_type, answer, hard, rng)))
    return tuple(out)


def _introduce(focus: ShapeObject, scene: Scene, rng: random.Random) -> Tuple[Tuple[str, str], str]:
    """A round that singles out the focus object; returns it and which attribute it revealed."""
    same_shape = [o for o in scene.objects if o.shape == focus.shape]
    same_colour = [o for o in scene.objects if o.colour == focus.colour]
    if len(same_shape) == 1:
        return (f"what color is the {focus.shape}?", focus.colour), "color"
    if len(same_colour) == 1:
        return (f"what shape is the {focus.colour} one?", focus.shape), "shape"
    return (f"what shape is {position_phrase(focus, rng)}?", focus.shape), "position"


def dialog(scene: Scene, rng: random.Random) -> Tuple[Tuple[str, str], ...]:
    """Three rounds about one focus object; later rounds say "it", so the history matters."""
    focus = rng.choice(scene.objects)
    count_round = ("how many shapes are there?", NUMBER_WORDS[len(scene.objects)])
    follow_ups = {
        "color": [("where is it?", focus.position), ("how big is it?", focus.size)],
        "shape": [("where is it?", focus.position), ("how big is it?", focus.size)],
        "position": [("what color is it?", focus.colour), ("how big is it?", focus.size)],
    }
    unique = sum(1 for o in scene.objects if (o.colour, o.shape) == (focus.colour, focus.shape)) == 1
    if unique and rng.random() < 0.4:
        rounds = [(f"is there {article(focus.colour)} {focus.colour} {focus.shape}?", "yes"),
                  ("where is it?", focus.position),
                  rng.choice([("how big is it?", focus.size), count_round])]
    else:
        intro, revealed = _introduce(focus, scene, rng)
        present = {(o.colour, o.shape) for o in scene.objects}
        colour, shape = rng.choice([(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present])
        opening = rng.choice([count_round, (f"is there {article(colour)} {colour} {shape}?", "no")])
        rounds = [opening, intro, rng.choice(follow_ups[revealed])]
    return tuple(rounds)


def describe(scene: Scene, rng: random.Random) -> ImageText:
    """All text of an image, drawn in a fixed order from ``rng`` (so it is reproducible)."""
    return ImageText(captions(scene, rng), vqa_questions(scene, rng), dialog(scene, rng))

