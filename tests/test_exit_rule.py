"""The exit rule, against cases computed by hand.

`EarlyExitDecoder._decide_exits` (engine.py) lets a row leave at the first *allowed* exit whose
confidence (confidence.py) reaches the threshold; the engine then skips that row's deeper layers.
These tests drive the public `generate` on a stub LM whose every logit is written out below, so
each row's confidence at each exit is a number in this file, not something the code computes:

- vocabulary and hidden size 8; a hidden state is the one-hot of the column's input token and
  every decoder layer is the identity (it only records which tokens it ran on), so the exits'
  and the head's logits are lookup tables indexed by the input token;
- 6 decoder layers, exits after layers 1 and 3 (2 and 4 layers run; full depth is 6);
- row r's prompt (left-padded to different lengths) ends in token r; the head maps it to token
  4 + r, the first generated token (prefill is always full depth). The second token is the one
  the exit rule decides: its input is 4 + r, so row r's logits there are `EXIT_TABLE[k][r]` at
  exit k and `HEAD_TOP[r]` (one-hot-like) at full depth. Each of these has its own most likely
  token, so the emitted token also tells where the row left.
"""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lavis_free.exits.adapters.base import DecoderAdapter, no_cache
from lavis_free.exits.confidence import entropy, get_confidence, margin, max_prob
from lavis_free.exits.engine import DecodeOptions, EarlyExitDecoder
from lavis_free.exits.lm_batch import LMBatch
from lavis_free.exits.options import ExitConfigError, ExitOptions
from lavis_free.models.blip2_opt_free import Blip2OPTFree

V = 8
NUM_LAYERS = 6
EXIT_LAYERS = (1, 3)
E0, E1, FULL = 2, 4, 6  # layers run when a row leaves at exit 0, at exit 1, at full depth
ROWS = 4
PAD = 6
NO_EOS = -1  # never generated (min_length is 0 unless a test sets it)
# The second token's most likely token, by where the row left: distinct per row and per place.
TOP = {E0: [0, 1, 2, 3], E1: [4, 5, 6, 7], FULL: [1, 2, 3, 0]}


# ---- distributions, and their confidences worked out by hand --------------------------------
def two_top(p1, p2):
    """p1 and p2 on two tokens, the rest spread evenly over the other 6:
    max_prob = p1, margin = p1 - p2."""
    rest = (1.0 - p1 - p2) / 6
    return [p1, p2] + [rest] * 6


# Dyadic distributions over 8 tokens: entropy in bits H = sum p * log2(1/p), and the `entropy`
# confidence is 1 - H / log2(8) = 1 - H / 3.
D_A2 = [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 128]  # H = 1.984375 -> 0.338542
D_A = [1 / 2, 1 / 4, 1 / 8, 1 / 16] + [1 / 64] * 4  # H = 2       -> 0.333333
D_B = [1 / 2, 1 / 8, 1 / 8, 1 / 8] + [1 / 32] * 4  # H = 2.25    -> 0.25
D_C = [1 / 4, 1 / 4, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 64]  # H = 2.46875 -> 0.177083
UNIFORM = [1 / 8] * 8  # H = 3 -> 0

# Exact cases (softmax is exact when the logits are equal or underflow): logits 0 on m tokens,
# -1e4 elsewhere give probability exactly 1/m on those m tokens.
ONE_HOT = ("exact", 1)  # every confidence is exactly 1
HALVES = ("exact", 2)  # max_prob exactly 0.5, margin exactly 0
QUARTERS = ("exact", 4)  # max_prob exactly 0.25, margin exactly 0


def logits_row(dist, top):
    """Logits whose softmax is `dist`, rotated so that its first (most likely) entry is `top`."""
    if isinstance(dist, tuple):
        row = torch.full((V,), -1e4)
        row[: dist[1]] = 0.0
    else:
        assert math.isclose(sum(dist), 1.0) and len(dist) == V
        row = torch.tensor(dist, dtype=torch.float64).log().float()
    return row.roll(top)


# ---- the stub LM --------------------------------------------------------------------------
class RecordingLayer(nn.Module):
    """An identity decoder layer that records the input token of each row it ran at the window's
    last column (hidden states are one-hot tokens)."""

    def __init__(self):
        super().__init__()
        self.seen = []


class Table(nn.Module):
    """Logits = one-hot input token @ table, i.e. row t of `table` for input token t."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, features):
        return features @ self.table


class StubAdapter(DecoderAdapter):
    def __init__(self, head_table):
        super().__init__(None)
        self._layers = nn.ModuleList(RecordingLayer() for _ in range(NUM_LAYERS))
        self._head = Table(head_table)

    layers = property(lambda self: self._layers)
    hidden_size = property(lambda self: V)
    num_heads = property(lambda self: 1)
    head_dim = property(lambda self: 1)

    def embed_tokens(self, input_ids):
        return nn.functional.one_hot(input_ids, V).float()

    def embed(self, inputs_embeds, positions):
        return inputs_embeds

    def forward_layer(self, layer, hidden, positions, attn_mask, kv_store, encoder=None):
        layer.seen.extend(hidden[:, -1].argmax(-1).tolist())
        kv_store(hidden[:, None, :, :1], hidden[:, None, :, :1])
        return hidden

    def kv_projection(self, layer, hidden, positions):
        return hidden[:, None, :, :1], hidden[:, None, :, :1]

    def final_norm_module(self):
        return nn.Identity()

    def head_modules(self):
        return [self._head]

    def new_layer(self):
        return RecordingLayer()

    def head_cost_in_layers(self):
        return 0.0


class StubExit(nn.Module):
    """FREE-style exit (own cached layer, identity here) whose logits are a lookup table."""

    uses_cache = True
    reads_lm_head = False  # its own table (a FREE exit reads the LM's head)

    def __init__(self, table):
        super().__init__()
        self.layer = RecordingLayer()
        self.table = Table(table)

    def features(self, adapter, hidden, positions, attn_mask, kv_store=no_cache, encoder=None):
        return adapter.final_norm(adapter.forward_layer(self.layer, hidden, positions, attn_mask, kv_store, encoder))

    def logits(self, adapter, features):
        return self.table(features)


def build(exit_table):
    """Stub adapter + exits; exit_table[k][r] is exit k's distribution for row r's decided token
    (the head is sure of TOP[FULL][r] there)."""
    head = torch.zeros(V, V)
    for r in range(ROWS):
        head[r, 4 + r] = 10.0  # prompt token r -> first generated token 4 + r
        head[4 + r] = logits_row(ONE_HOT, TOP[FULL][r])
    tables = []
    for k, rows in enumerate(exit_table):
        table = torch.zeros(V, V)
        for r, dist in enumerate(rows):
            table[4 + r] = logits_row(dist, TOP[(E0, E1)[k]][r])
        tables.append(table)
    adapter = StubAdapter(head)
    exits = SimpleNamespace(exits=[StubExit(t) for t in tables], config=SimpleNamespace(layers=EXIT_LAYERS),
                            confidence_heads=None, confidence_fitted=torch.tensor(False))
    return adapter, exits


def prompts():
    """Row r ends in token r, left-padded to 3, 2, 1, 3 real tokens (filler and PAD only sit
    before the last column, the one the recording layers look at)."""
    pads = [0, 1, 2, 0]
    ids = torch.full((ROWS, 3), PAD)
    mask = torch.zeros(ROWS, 3, dtype=torch.long)
    for r, p in enumerate(pads):
        ids[r, p:] = 0
        ids[r, -1] = r
        mask[r, p:] = 1
    return ids, mask


def decode(exit_table, **opts):
    return decode_with(*build(exit_table), **opts)


def decode_with(adapter, exits, **opts):
    ids, mask = prompts()
    options = DecodeOptions(2, opts.pop("eos_token_id", NO_EOS), PAD, min_length=opts.pop("min_length", 0), exits=ExitOptions(**opts))
    result = EarlyExitDecoder(adapter, exits).generate(LMBatch(adapter.embed_tokens(ids), mask), options)
    assert result.tokens[:, 0].tolist() == [4, 5, 6, 7], "the stub's first tokens carry the row identity"
    assert all(row[0] == FULL for row in result.layers_run)
    return result, adapter, exits


def rows_run(layer):
    """Rows whose decided token went through this (recording) layer."""
    return sorted(t - 4 for t in layer.seen if t >= 4)


def assert_left_at(result, adapter, expected):
    """Row r left at `expected[r]` layers run: its stats say so, its token is that place's
    argmax, and no deeper layer or exit ran on it."""
    assert [row[1] for row in result.layers_run] == expected
    assert result.tokens[:, 1].tolist() == [TOP[where][r] for r, where in enumerate(expected)]
    for layer in range(NUM_LAYERS):
        assert rows_run(adapter.layers[layer]) == [r for r in range(ROWS) if expected[r] > layer], layer


# ---- the rule at thresholds inside (0, 1), one hand-worked case per measure -----------------
# Per row: (exit 0 distribution, exit 1 distribution) and the confidences they give. In every
# case row 0 passes only at exit 0, row 1 only at exit 1, row 2 nowhere, row 3 at both (so it
# leaves at the first); with another measure at the same threshold the pattern differs.
CASES = {
    "max_prob": (0.6, [
        (two_top(0.70, 0.20), two_top(0.40, 0.30)),  # 0.70 | 0.40  -> exit 0
        (two_top(0.50, 0.10), two_top(0.90, 0.05)),  # 0.50 | 0.90  -> exit 1
        (two_top(0.55, 0.40), two_top(0.59, 0.30)),  # 0.55 | 0.59  -> full depth
        (two_top(0.62, 0.35), two_top(0.80, 0.10)),  # 0.62 | 0.80  -> exit 0 (margin 0.27 would stay)
    ]),
    "margin": (0.3, [
        (two_top(0.60, 0.20), two_top(0.40, 0.35)),  # 0.40 | 0.05  -> exit 0
        (two_top(0.50, 0.45), two_top(0.70, 0.10)),  # 0.05 | 0.60  -> exit 1 (max_prob 0.5 would leave at 0)
        (two_top(0.40, 0.30), two_top(0.45, 0.25)),  # 0.10 | 0.20  -> full depth
        (two_top(0.90, 0.05), two_top(0.50, 0.10)),  # 0.85 | 0.40  -> exit 0
    ]),
    "entropy": (0.3, [
        (D_A, UNIFORM),  # 0.3333 | 0       -> exit 0 (margin 0.25 would stay)
        (D_B, D_A2),     # 0.25   | 0.3385  -> exit 1 (max_prob 0.5 would leave at 0)
        (D_C, D_B),      # 0.1771 | 0.25    -> full depth
        (D_A2, D_A),     # 0.3385 | 0.3333  -> exit 0
    ]),
}
EXPECTED = [E0, E1, FULL, E0]


def table(case):
    rows = CASES[case][1]
    return [[r[0] for r in rows], [r[1] for r in rows]]


@pytest.mark.parametrize("kv_policy", ["recompute", "propagate"])
@pytest.mark.parametrize("confidence", sorted(CASES))
def test_each_row_leaves_at_its_first_confident_exit(confidence, kv_policy):
    threshold = CASES[confidence][0]
    result, adapter, exits = decode(table(confidence), exit_threshold=threshold, confidence=confidence,
                                    kv_policy=kv_policy)
    assert_left_at(result, adapter, EXPECTED)
    # Exit 1's transformer ran only on the rows still going after exit 0.
    assert rows_run(exits.exits[0].layer) == [0, 1, 2, 3]
    assert rows_run(exits.exits[1].layer) == [1, 2]
    assert [row[1] for row in result.exit_blocks_run] == [1, 2, 2, 1]
    assert [row[1] for row in result.heads_run] == [1, 2, 3, 1]


# ---- the learned confidence: read from features, the head only for rows that leave ----------
class LearnedStub(nn.Module):
    """A confidence head whose output for row r's decided token is `values[r]` (its features are
    the one-hot of token `first + r`: the input 4 + r, or a `ShiftedLMHeadExit`'s shift of it)."""

    def __init__(self, values, first=4):
        super().__init__()
        by_token = torch.zeros(V)
        by_token[first : first + ROWS] = torch.tensor(values)
        self.register_buffer("by_token", by_token)

    def forward(self, features):
        return features @ self.by_token


@pytest.mark.parametrize("kv_policy", ["recompute", "propagate"])
def test_learned_confidence_decides_from_features_and_pays_the_head_only_on_leaving(kv_policy):
    """Exit 0's head says 0.7, 0.5, 0.55, 0.62 and exit 1's 0.4, 0.9, 0.59, 0.8 for rows 0-3:
    at 0.6 rows leave at exit 0, exit 1, full depth, exit 0, whatever the exits' logits (uniform
    here: every softmax confidence would keep every row); each row pays one head application."""
    adapter, exits = build([[UNIFORM] * ROWS, [UNIFORM] * ROWS])
    exits.confidence_heads = [LearnedStub([0.7, 0.5, 0.55, 0.62]), LearnedStub([0.4, 0.9, 0.59, 0.8])]
    exits.confidence_fitted = torch.tensor(True)
    result, adapter, exits = decode_with(adapter, exits, exit_threshold=0.6, confidence="learned", kv_policy=kv_policy)
    assert [row[1] for row in result.layers_run] == EXPECTED
    for layer in range(NUM_LAYERS):
        assert rows_run(adapter.layers[layer]) == [r for r in range(ROWS) if EXPECTED[r] > layer], layer
    assert [row[1] for row in result.exit_blocks_run] == [1, 2, 2, 1]
    assert [row[1] for row in result.heads_run] == [1, 1, 1, 1]
    # the token is the leaving exit's choice (its uniform logits: token 0) or the head's
    assert result.tokens[:, 1].tolist() == [0, 0, TOP[FULL][2], 0]


class ShiftedLMHeadExit(StubExit):
    """A FREE-like exit: its logits are the LM's head on its features (`reads_lm_head`), and its
    features are the input token's one-hot shifted by 4, so row r's features read as token r,
    which the head maps to 4 + r; at full depth it maps to TOP[FULL][r]. The token emitted thus
    says whose features the step's one head call read, and for which row."""

    reads_lm_head = True

    def __init__(self):
        super().__init__(torch.zeros(V, V))

    def features(self, adapter, hidden, positions, attn_mask, kv_store=no_cache, encoder=None):
        return super().features(adapter, hidden, positions, attn_mask, kv_store, encoder).roll(4, dims=-1)

    def logits(self, adapter, features):
        return adapter.head(features)


@pytest.mark.parametrize("kv_policy", ["recompute", "propagate"])
def test_rows_leaving_through_the_lm_head_share_the_steps_head_call(kv_policy):
    """Rows 0 and 3 leave at exit 0, row 1 at exit 1, row 2 at full depth, so the step's one head
    call gathers them out of order ([0, 3], [1], [2]); each must get its own exit's logits."""
    adapter, exits = build([[UNIFORM] * ROWS, [UNIFORM] * ROWS])
    exits.exits = [ShiftedLMHeadExit(), ShiftedLMHeadExit()]
    exits.confidence_heads = [LearnedStub([0.7, 0.5, 0.55, 0.62], first=0), LearnedStub([0.4, 0.9, 0.59, 0.8], first=0)]
    exits.confidence_fitted = torch.tensor(True)
    result, adapter, exits = decode_with(adapter, exits, exit_threshold=0.6, confidence="learned", kv_policy=kv_policy)
    assert [row[1] for row in result.layers_run] == EXPECTED
    assert result.tokens[:, 1].tolist() == [4, 5, TOP[FULL][2], 7]
    assert [row[1] for row in result.heads_run] == [1, 1, 1, 1]


def test_learned_confidence_without_fitted_heads_is_refused():
    with pytest.raises(ExitConfigError, match="confidence='learned'.*fit_confidence"):
        decode([[UNIFORM] * ROWS, [UNIFORM] * ROWS], exit_threshold=0.5, confidence="learned")


# ---- min_exit_layer: a count of layers run ---------------------------------------------------
@pytest.mark.parametrize(
    "min_exit_layer, expected, blocks",
    [
        (0, [E0, E1, FULL, E0], [1, 2, 2, 1]),
        (2, [E0, E1, FULL, E0], [1, 2, 2, 1]),  # exit 0 runs exactly 2 layers: allowed
        (3, [FULL, E1, FULL, E1], [1, 1, 1, 1]),  # exit 0 not allowed: rows 0 and 3 decide at exit 1
        (4, [FULL, E1, FULL, E1], [1, 1, 1, 1]),  # exit 1 runs exactly 4 layers: allowed
        (5, [FULL] * 4, [0] * 4),
        (6, [FULL] * 4, [0] * 4),
    ],
)
def test_min_exit_layer_counts_layers_run(min_exit_layer, expected, blocks):
    """Exits with fewer layers run than `min_exit_layer` are neither decided at nor computed."""
    result, adapter, exits = decode(table("max_prob"), exit_threshold=0.6, min_exit_layer=min_exit_layer)
    assert_left_at(result, adapter, expected)
    assert [row[1] for row in result.exit_blocks_run] == blocks


# ---- the threshold's ends and the boundary ---------------------------------------------------
def test_confidence_equal_to_threshold_leaves():
    """The engine documents "confidence reaches the threshold" (>=): exactly 0.5 leaves at 0.5."""
    exit0 = [HALVES, QUARTERS, QUARTERS, ONE_HOT]  # max_prob exactly 0.5, 0.25, 0.25, 1
    exit1 = [QUARTERS, HALVES, QUARTERS, QUARTERS]
    result, adapter, exits = decode([exit0, exit1], exit_threshold=0.5)
    assert_left_at(result, adapter, [E0, E1, FULL, E0])


@pytest.mark.parametrize("confidence", sorted(CASES))
def test_threshold_one_still_exits_on_certainty(confidence):
    """1.0 is a valid threshold (the top of the range): exactly certain rows leave."""
    exit0 = [ONE_HOT, D_A2, two_top(0.9, 0.05), ONE_HOT]
    exit1 = [D_A2, ONE_HOT, two_top(0.99, 0.005), D_A2]
    result, adapter, exits = decode([exit0, exit1], exit_threshold=1.0, confidence=confidence)
    assert_left_at(result, adapter, [E0, E1, FULL, E0])


@pytest.mark.parametrize("confidence", sorted(CASES))
@pytest.mark.parametrize("min_exit_layer, first_allowed", [(0, E0), (3, E1)], ids=["min0", "min3"])
def test_threshold_zero_every_row_leaves_at_the_first_allowed_exit(confidence, min_exit_layer, first_allowed):
    # Unsure rows too: margin exactly 0 for HALVES/QUARTERS (entropy's uniform case is
    # test_entropy_confidence_never_below_zero's: its sign is a rounding accident).
    least_sure = UNIFORM if confidence != "entropy" else D_C
    exit0 = [least_sure, QUARTERS, HALVES, two_top(0.4, 0.3)]
    result, _, _ = decode([exit0, exit0], exit_threshold=0.0, confidence=confidence, min_exit_layer=min_exit_layer)
    assert [row[1] for row in result.layers_run] == [first_allowed] * ROWS


def test_thresholds_above_one_are_refused_not_a_hidden_off_switch():
    for threshold in (1.0 + 1e-6, 1.5, 2.0):
        with pytest.raises(ExitConfigError, match=r"exit_threshold=.* expected a confidence in \[0, 1\] \(early_exit=False for full depth\)"):
            decode([[ONE_HOT] * ROWS] * 2, exit_threshold=threshold)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_early_exit_false_disables_exits(threshold):
    """The one switch: even certain exits (confidence exactly 1) do not fire at any threshold,
    and no exit is computed."""
    result, adapter, exits = decode([[ONE_HOT] * ROWS] * 2, exit_threshold=threshold, early_exit=False)
    assert_left_at(result, adapter, [FULL] * ROWS)
    assert all(n == 0 for row in result.exit_blocks_run for n in row)
    assert rows_run(exits.exits[0].layer) == rows_run(exits.exits[1].layer) == []


def test_entropy_rule_still_exits_while_min_length_suppresses_eos():
    """With min_length not reached, EOS (token 3 here) is set to -inf before the decision. A
    sure row (all mass on token 0, everything else at -30) must still leave; an unsure one
    (uniform over the 7 other tokens: 1 - ln 7 / ln 8 = 0.064) must not."""
    eos = 3
    sure = torch.full((V,), -30.0)
    sure[0] = 0.0
    unsure = torch.zeros(V)
    unsure[eos] = -30.0
    adapter, exits = build([[ONE_HOT] * ROWS] * 2)
    for k, ex in enumerate(exits.exits):
        for r in range(ROWS):
            ex.table.table[4 + r] = sure if (r, k) in ((0, 0), (1, 1)) else unsure
    result, _, _ = decode_with(adapter, exits, eos_token_id=eos, min_length=2, exit_threshold=0.5, confidence="entropy")
    assert [row[1] for row in result.layers_run] == [E0, E1, FULL, FULL]


# ---- the confidence functions, directly ------------------------------------------------------
def batch(*dists):
    return torch.stack([logits_row(d, 0) for d in dists])


def test_max_prob_and_margin_per_row():
    x = batch(two_top(0.7, 0.2), two_top(0.5, 0.45), two_top(0.9, 0.05), UNIFORM, HALVES, ONE_HOT)
    torch.testing.assert_close(max_prob(x), torch.tensor([0.7, 0.5, 0.9, 0.125, 0.5, 1.0]))
    torch.testing.assert_close(margin(x), torch.tensor([0.5, 0.05, 0.85, 0.0, 0.0, 1.0]), atol=1e-6, rtol=0)


def test_confidences_depend_on_probabilities_not_raw_logits():
    """Adding a constant or permuting the vocabulary changes no confidence."""
    x = batch(two_top(0.6, 0.3), D_B)
    shuffled = (x + 7.5)[:, torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])]
    for fn in (max_prob, margin, entropy):
        torch.testing.assert_close(fn(shuffled), fn(x))


def test_entropy_confidence_is_one_minus_normalised_entropy():
    x = batch(D_A2, D_A, D_B, D_C, UNIFORM, ONE_HOT)
    expected = torch.tensor([1 - 1.984375 / 3, 1 / 3, 0.25, 1 - 2.46875 / 3, 0.0, 1.0])
    torch.testing.assert_close(entropy(x), expected, atol=1e-6, rtol=0)
    # Normalised by log(vocab), whatever the vocabulary size:
    # V=4, (1/2, 1/4, 1/8, 1/8): H = 1.75 bits of log2(4) = 2  -> 0.125
    # V=2, (3/4, 1/4):           H = 0.811278 bits of 1        -> 0.188722
    small = entropy(torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log())
    tiny = entropy(torch.tensor([[0.75, 0.25]]).log())
    torch.testing.assert_close(small, torch.tensor([0.125]))
    torch.testing.assert_close(tiny, torch.tensor([0.188722]), atol=1e-6, rtol=0)


def test_get_confidence_maps_each_name_to_its_measure():
    x = batch(D_A)  # max_prob 0.5, margin 0.25, entropy 1/3: all different
    for name, value in (("max_prob", 0.5), ("margin", 0.25), ("entropy", 1 / 3)):
        torch.testing.assert_close(get_confidence(name)(x), torch.tensor([value]), atol=1e-6, rtol=0)


def test_entropy_confidence_never_below_zero():
    """Uniform logits over many vocabulary sizes: rounding must not take the confidence below 0
    (at threshold 0, "every token leaves at the first exit")."""
    values = np.array([entropy(torch.zeros(1, v)).item() for v in range(2, 600)])
    assert values.min() >= 0.0 and values.max() <= 1.0


# ---- the model's generate hands the rule its settings --------------------------------------
def test_model_generate_gives_the_rule_its_keywords_and_config_defaults(monkeypatch):
    """`tiny` with exits after layers 2, 5, 8 (3, 6, 9 layers run): what the rule is called
    with comes from the keywords, else from `exits.inference`."""
    cfg = OmegaConf.merge(OmegaConf.load(Blip2OPTFree.default_config_path("tiny")).model, {
        "exits": {"layers": [2, 5, 8],
                  "inference": {"exit_threshold": 0.35, "confidence": "entropy", "min_exit_layer": 6}},
    })
    torch.manual_seed(0)
    model = Blip2OPTFree.from_config(cfg).eval()
    calls = []
    rule = EarlyExitDecoder._decide_exits

    def spy(self, confidence, opts, exit_index, rows, step):
        calls.append((opts.exits.exit_threshold, opts.exits.confidence, opts.exits.min_exit_layer, exit_index))
        return rule(self, confidence, opts, exit_index, rows, step)

    monkeypatch.setattr(EarlyExitDecoder, "_decide_exits", spy)
    images = torch.randn(2, 3, 64, 64)
    model.generate({"image": images}, num_beams=1, max_length=4)
    assert calls and {c[:3] for c in calls} == {(0.35, "entropy", 6)}
    assert {c[3] for c in calls} <= {1, 2} and 1 in {c[3] for c in calls}  # exit 0 runs 3 layers < 6
    calls.clear()
    model.generate({"image": images}, num_beams=1, max_length=4,
                   exit_threshold=0.6, confidence="margin", min_exit_layer=9)
    assert calls and {c for c in calls} == {(0.6, "margin", 9, 2)}
