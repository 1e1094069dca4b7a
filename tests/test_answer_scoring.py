"""`score_answers`: answer options scored by likelihood, with exits, as VisDial ranks them.

The engine's part (each token read at the exit the rule takes, one prefill for many options)
is checked against teacher-forced passes for every LM family in test_conformance.py; here the
host's part: the option strings become the tokens the host's own `forward` scores, and the
early-exit scoring of an answer the model generated repeats the decisions its decoding made.
"""
import pytest
import torch
from lavis.models import load_model, load_model_and_preprocess

import lavis_free  # noqa: F401  (registers the models)
from lavis_free.datasets.shapes import generate_item
from lavis_free.datasets.shapes_scene import render_scene

PROMPT = "Question: {} Answer:"
OPTIONS = ["red", "a blue square", "two", "yes", "the big green circle on the left"]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    return load_model_and_preprocess("blip2_opt_free", "shapes_frozen_lm", is_eval=True)


@pytest.fixture(scope="module")
def questions(shipped):
    _, vis, txt = shipped
    pairs = [(item, qa) for item in (generate_item(0, "test", i) for i in range(3)) for qa in item.text.questions[:2]]
    return {"image": torch.stack([vis["eval"](render_scene(item.scene)) for item, _ in pairs]),
            "text_input": [txt["eval"](qa.question) for _, qa in pairs]}


def _forward_scores(model, samples, options, prompt):
    """-(the host's own forward loss) x scored tokens, one (sample, option) at a time."""
    binding = lavis_free.exits_of(model).binding
    rows = []
    for i, text in enumerate(samples["text_input"]):
        row = []
        for option in options:
            one = {"image": samples["image"][i : i + 1], "text_input": [prompt.format(text)], "text_output": [option]}
            tokens = binding.answer_tokens(model, one["text_input"], [option], samples["image"].device)
            with torch.no_grad():
                row.append(-model.forward(one)["loss"].item() * tokens.shape[1])
        rows.append(row)
    return torch.tensor(rows)


@pytest.mark.parametrize("host", ["opt", "t5"])
def test_full_depth_scores_are_the_host_forward_likelihood(shipped, questions, host):
    """With exits off, an option's score is what the host's `forward` (the training loss) gives
    the same prompt and answer, on options of 1-8 words and prompts of different lengths."""
    model = shipped[0] if host == "opt" else load_model("blip2_t5_free", "tiny", is_eval=True)
    samples = questions if host == "opt" else {**questions, "image": torch.randn(len(questions["text_input"]), 3, 64, 64)}
    scores = model.score_answers(samples, OPTIONS, prompt=PROMPT, early_exit=False)
    torch.testing.assert_close(scores, _forward_scores(model, samples, OPTIONS, PROMPT), atol=1e-3, rtol=1e-4)
    assert len({tuple(row) for row in scores.argsort(1).tolist()}) >= 2 or host == "t5"


def test_scoring_its_own_answers_repeats_the_decisions_of_decoding(shipped, questions):
    """At a threshold inside (0, 1), scoring the answers the model generated with exits reads each
    token at the exit its decoding left at (same layers per token) and the log-probability of the
    emitted token there, which is the log of that exit's confidence (max_prob)."""
    model = shipped[0]
    answers, decoded = model.predict_answers(questions, prompt=PROMPT, num_beams=1, max_len=8, exit_threshold=0.4,
                                             return_exit_stats=True)
    per_sample = [[answer] for answer in answers]
    scores, scored = model.score_answers(questions, per_sample, prompt=PROMPT, exit_threshold=0.4, return_exit_stats=True)
    assert scored["exit_layers"] == decoded["exit_layers"]
    assert any(layer < 12 for row in decoded["exit_layers"] for layer in row[1:]), decoded["exit_layers"]
    full = model.score_answers(questions, per_sample, prompt=PROMPT, early_exit=False)
    assert not torch.allclose(scores, full)


def test_options_of_one_sample_are_ranked_in_one_call_with_per_option_stats(shipped, questions):
    model = shipped[0]
    per_sample = [OPTIONS[i:] + OPTIONS[:i] for i in range(len(questions["text_input"]))]
    scores, stats = model.score_answers(questions, per_sample, prompt=PROMPT, exit_threshold=0.4, return_exit_stats=True)
    assert scores.shape == (6, len(OPTIONS)) and len(stats["exit_layers"]) == 6 * len(OPTIONS)
    alone = model.score_answers({k: v[:1] for k, v in questions.items()}, [OPTIONS], prompt=PROMPT, exit_threshold=0.4)
    torch.testing.assert_close(scores[:1], alone, atol=1e-4, rtol=1e-4)
    assert set(stats["seconds"]) == {"image", "prefill", "copy", "decode"}  # copy: the prefix for each option


@pytest.mark.parametrize("options, match", [
    ([["red"], ["red", "blue"]] + [["x"]] * 4, r"same number of options, got sizes \[1, 2\]"),
    ([["red"]] * 2, r"answer_options must be one non-empty list of strings for every sample.*\(6 here\)"),
    ([[]] * 6, "answer_options must be one non-empty list"),
    ("red", "answer_options must be one non-empty list"),
])
def test_bad_options_are_named(shipped, questions, options, match):
    with pytest.raises(ValueError, match=match):
        shipped[0].score_answers(questions, options, prompt=PROMPT)


def test_unknown_keyword_is_named(shipped, questions):
    with pytest.raises(TypeError, match="exit_treshold"):
        shipped[0].score_answers(questions, OPTIONS, prompt=PROMPT, exit_treshold=0.5)


def test_options_after_a_prompt_longer_than_max_txt_len_are_scored_whole(shipped, questions):
    """The prefix keeps a long prompt's last max_txt_len tokens; the options are never cut: each
    is scored to its EOS, and the long prompt scores like its kept tail."""
    model = shipped[0]
    binding = lavis_free.exits_of(model).binding
    tokenizer = model.opt_tokenizer
    history = " ".join(["is there a red circle? yes"] * 20)
    long_prompt = f"Dialogue: {history} {questions['text_input'][0]} Answer:"
    assert len(tokenizer(long_prompt).input_ids) > model.max_txt_len
    tokens = binding.answer_tokens(model, [long_prompt] * 2, ["a blue square", "red"], torch.device("cpu"))
    assert tokenizer.batch_decode(tokens, skip_special_tokens=True) == [" a blue square\n", " red\n"]
    one = {"image": questions["image"][:1], "text_input": [long_prompt]}
    tail = tokenizer.decode(tokenizer(long_prompt, add_special_tokens=False).input_ids[-(model.max_txt_len - 1):])
    scores = model.score_answers(one, [OPTIONS], prompt="", early_exit=False)
    torch.testing.assert_close(scores, model.score_answers({**one, "text_input": [tail]}, [OPTIONS], prompt="", early_exit=False))
    assert torch.isfinite(scores).all()
