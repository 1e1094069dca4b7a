"""The FREE losses and the two-optimizer steps, tested for what they mean.

Each term of the generator loss is checked for presence, weight and sign against values computed
here by hand (or by independent code), with discriminators whose outputs the test controls; the
discriminator's labels are checked by what it learns (final-layer features called real), the
`distill` token loss against the LM's own (HF) logits with labels that disagree with them, and the
steps for what they lower and what they must leave bit-identical.

Most tests use a small random HF OPT and `EarlyExits` directly (fast, no LAVIS model); the
frozen-parts test uses the `tiny` BLIP-2 OPT so that the backbone is frozen by the model itself.
"""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from transformers import OPTConfig, OPTForCausalLM

from lavis_free.exits import losses
from lavis_free.exits.adapters import adapter_for
from lavis_free.exits.config import ExitConfig
from lavis_free.exits.early_exits import EarlyExits, ExitOutputs
from lavis_free.models.blip2_opt_free import Blip2OPTFree
from lavis_free.runners import optim
from lavis_free.tasks.exit_training import DISCRIMINATOR, GENERATOR, discriminator_step, generator_step
from lavis_free.exits.lm_batch import LMBatch, shift_to_aligned
from lavis_free.hosts import exits_of

VOCAB, HIDDEN, LAYERS, PAD = 32, 32, 4, 1
EXIT_LAYERS = [0, 2]


def softplus(x: float) -> float:
    """-log(sigmoid(-x)): the BCE of logit x against label 0 (and of -x against label 1)."""
    return math.log1p(math.exp(x))


# ---- a small LM, its backbone outputs, discriminators whose output the test controls ------------

@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=HIDDEN, pad_token_id=PAD, eos_token_id=2,
    )
    model = OPTForCausalLM(cfg).eval()
    torch.manual_seed(0)  # OPT's own initialiser once more, from here: building the model draws
    model.apply(model._init_weights)  # differently on transformers 4.26 (twice) and 4.33 (once)
    with torch.no_grad():  # a final norm that is not the identity at init, so normalising twice shows
        norm = model.model.decoder.final_layer_norm
        norm.weight.copy_(1 + 0.5 * torch.randn(HIDDEN))
        norm.bias.copy_(0.3 * torch.randn(HIDDEN))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def sequences():
    """Two rows of different lengths (row 1 right-padded by 3); labels: LAVIS's -100 on the first
    column and the padding, plus two unscored columns inside row 0."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 9), generator=gen)
    mask = torch.ones(2, 9, dtype=torch.long)
    ids[1, 6:], mask[1, 6:] = PAD, 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    labels[0, 3:5] = -100
    return ids, mask, labels


def own_mask(labels):
    """Position t is trained when its aligned target labels[t] is scored (written out here)."""
    mask = torch.zeros(labels.shape, dtype=torch.bool)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            mask[b, t] = bool(labels[b, t] != -100)
    return mask


def make_exits(lm, **cfg):
    torch.manual_seed(1)
    config = ExitConfig.from_dict({"layers": EXIT_LAYERS, "init": "random", "disc_hidden": 16, **cfg}, LAYERS)
    return EarlyExits(adapter_for(lm), config)


def backbone_of(exits, lm, sequences, labels=None):
    """Backbone outputs of the sequences; `labels` (aligned) default to the sequences' causal
    labels shifted, as a decoder-only host binding does."""
    ids, mask, causal = sequences
    adapter = adapter_for(lm)
    aligned = shift_to_aligned(causal) if labels is None else labels
    return exits.backbone_outputs(adapter, LMBatch(adapter.embed_tokens(ids), mask, labels=aligned))


class ConstantDiscriminator(nn.Module):
    """Says the same logit for every token: > 0 'final layer' (real), < 0 'exit' (fake)."""

    def __init__(self, logit: float):
        super().__init__()
        self.logit = logit

    def forward(self, features):
        return torch.full(features.shape[:-1], self.logit)


class LinearProbe(nn.Module):
    """A fixed linear logit w . features, so that the loss depends on which features it reads."""

    def __init__(self, seed: int):
        super().__init__()
        w = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed)) / math.sqrt(HIDDEN)
        self.w = nn.Parameter(w, requires_grad=False)

    def forward(self, features):
        return features @ self.w


def own_token_ce(logits, labels):
    """Mean over trained positions of -log p(labels[t] | position t) (aligned labels)."""
    mask = own_mask(labels)
    logp = torch.log_softmax(logits.double(), dim=-1)
    values = [-logp[b, t, labels[b, t]] for b, t in mask.nonzero().tolist()]
    return torch.stack(values).mean().item()


def own_adversarial(probe, features, labels):
    """Mean over trained positions of -log sigmoid(probe(features)): the exit wants to be called real."""
    mask = own_mask(labels)
    with torch.no_grad():
        logits = probe(features)[mask].double()
    return (-F.logsigmoid(logits)).mean().item()


# ---- the loss functions, on hand-computable logits -----------------------------------------------

def test_discriminator_loss_labels_final_features_real_and_exit_features_fake():
    """BCE with final (real) = 1 and exit (fake) = 0, averaged over the masked positions only."""
    mask = torch.tensor([[True, True, False]])
    real = torch.tensor([[2.0, 0.5, -9.0]])  # the -9 / +9 sit at an untrained position
    fake = torch.tensor([[-1.0, 0.0, 9.0]])
    expected = (softplus(-2.0) + softplus(-0.5)) / 2 + (softplus(-1.0) + softplus(0.0)) / 2
    assert losses.discriminator_loss(real, fake, mask).item() == pytest.approx(expected, rel=1e-6)
    # a confident, correct discriminator has a near-zero loss; the same one with labels swapped does not
    right = losses.discriminator_loss(torch.full((1, 3), 8.0), torch.full((1, 3), -8.0), mask).item()
    wrong = losses.discriminator_loss(torch.full((1, 3), -8.0), torch.full((1, 3), 8.0), mask).item()
    assert right == pytest.approx(2 * softplus(-8.0), abs=1e-6) and right < 1e-3
    assert wrong == pytest.approx(2 * softplus(8.0), rel=1e-5)


def test_generator_adversarial_loss_rewards_exit_features_called_final():
    mask = torch.tensor([[True, False, True]])
    called_final = torch.tensor([[3.0, -20.0, 1.0]])
    assert losses.generator_adversarial_loss(called_final, mask).item() == pytest.approx(
        (softplus(-3.0) + softplus(-1.0)) / 2, rel=1e-6
    )
    assert losses.generator_adversarial_loss(torch.full((1, 3), 4.0), mask).item() == pytest.approx(softplus(-4.0), rel=1e-6)
    assert losses.generator_adversarial_loss(torch.full((1, 3), -4.0), mask).item() == pytest.approx(softplus(4.0), rel=1e-6)


def test_distill_loss_is_kl_to_the_teacher_at_the_temperature_times_t_squared():
    """Two classes, T = 2: teacher softmax([0, 2] / 2), exit softmax([2, 0] / 2), by hand."""
    teacher = torch.tensor([[[0.0, 2.0], [5.0, 5.0]]])
    student = torch.tensor([[[2.0, 0.0], [-7.0, 7.0]]])  # second position untrained
    mask = torch.tensor([[True, False]])
    p = [1 / (1 + math.e), math.e / (1 + math.e)]  # softmax([0, 1])
    q = [p[1], p[0]]  # softmax([1, 0])
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert losses.distill_loss(student, teacher, mask, temperature=2.0).item() == pytest.approx(4 * kl, rel=1e-5)
    assert losses.distill_loss(teacher, teacher, mask, temperature=2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_cross_entropy_scores_position_t_against_its_aligned_label():
    labels = torch.tensor([[4, 2, -100, -100]])
    mask = losses.scored_mask(labels)
    assert mask.tolist() == [[True, True, False, False]]
    logits = torch.zeros(1, 4, 6)
    logits[0, 0, 4] = logits[0, 1, 2] = 30.0  # peaks on each position's own label
    assert losses.cross_entropy_loss(logits, labels, mask).item() < 1e-6
    shifted = torch.zeros(1, 4, 6)
    shifted[0, 1, 4] = shifted[0, 2, 2] = 30.0  # peaks one position late (a causal shift applied twice)
    assert losses.cross_entropy_loss(shifted, labels, mask).item() > 10


def test_decoder_only_labels_are_shifted_once_to_aligned():
    causal = torch.tensor([[-100, 4, 2, -100], [-100, -100, 7, 1]])
    assert shift_to_aligned(causal).tolist() == [[4, 2, -100, -100], [-100, 7, 1, -100]]


# ---- the generator loss: each term, its weight and its sign, per exit --------------------------

@pytest.mark.parametrize("token_weight, adv_weight", [(1.0, 0.0), (1.0, 0.5), (0.25, 2.0), (0.0, 1.0)])
def test_generator_loss_is_weighted_token_loss_plus_weighted_adversarial_loss(lm, sequences, token_weight, adv_weight):
    exits = make_exits(lm, loss={"token_weight": token_weight, "adv_weight": adv_weight})
    if adv_weight > 0:
        exits.discriminators = nn.ModuleList(LinearProbe(seed=10 + k) for k in range(len(EXIT_LAYERS)))
    adapter = adapter_for(lm)
    backbone = backbone_of(exits, lm, sequences)
    outputs = exits.exit_outputs(adapter, backbone)
    labels = backbone.labels
    token = [own_token_ce(lg, labels) for lg in outputs.logits]
    assert token[0] != pytest.approx(token[1], rel=1e-3), "exits must differ for the per-exit check to mean anything"
    loss, logs = exits.generator_loss(adapter, outputs, backbone)
    for k, value in enumerate(token):
        assert logs[f"loss_token_exit{k}"] == pytest.approx(value, rel=1e-5)
    expected = token_weight * sum(token) / len(token)
    if adv_weight > 0:
        # each exit's features read by its own discriminator
        adv = sum(own_adversarial(d, f, labels) for d, f in zip(exits.discriminators, outputs.features)) / len(token)
        assert logs["loss_adv"] == pytest.approx(adv, rel=1e-5)
        expected += adv_weight * adv
    else:
        assert "loss_adv" not in logs and len(exits.discriminators) == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert logs["loss_gen"] == pytest.approx(expected, rel=1e-5)


def test_adv_weight_adds_exactly_the_adversarial_term(lm, sequences):
    """Same exits and batch: the loss with adv_weight=0.7 minus the loss with 0 is 0.7 * adv."""
    exits = make_exits(lm, loss={"adv_weight": 0.7})
    exits.discriminators = nn.ModuleList([ConstantDiscriminator(1.5), ConstantDiscriminator(-0.5)])
    adapter = adapter_for(lm)
    backbone = backbone_of(exits, lm, sequences)
    outputs = exits.exit_outputs(adapter, backbone)
    with_adv = exits.generator_loss(adapter, outputs, backbone)[0].item()
    cfg = exits.config
    exits.config = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, adv_weight=0.0))
    without = exits.generator_loss(adapter, outputs, backbone)[0].item()
    exits.config = cfg
    adv = (softplus(-1.5) + softplus(0.5)) / 2  # mean over the two exits of -log sigmoid(logit)
    assert with_adv - without == pytest.approx(0.7 * adv, rel=1e-5)


def test_generator_loss_is_lower_when_the_discriminator_calls_exit_features_final(lm, sequences):
    exits = make_exits(lm, loss={"adv_weight": 1.0})
    adapter = adapter_for(lm)
    backbone = backbone_of(exits, lm, sequences)
    outputs = exits.exit_outputs(adapter, backbone)

    def adversarial(logit):
        exits.discriminators = nn.ModuleList([ConstantDiscriminator(logit), ConstantDiscriminator(logit)])
        return exits.generator_loss(adapter, outputs, backbone)[1]["loss_adv"]

    fooled, caught = adversarial(3.0), adversarial(-3.0)
    assert fooled == pytest.approx(softplus(-3.0), rel=1e-5)
    assert caught == pytest.approx(softplus(3.0), rel=1e-5)
    assert fooled < caught


@pytest.mark.parametrize("layout", ["no_adversarial", "vanilla"])
def test_baseline_layouts_have_no_adversarial_term(lm, sequences, layout):
    """Even with adv_weight > 0: no discriminators, and the loss is exactly the token loss."""
    exits = make_exits(lm, layout=layout, loss={"adv_weight": 1.0, "token_weight": 0.5})
    assert len(exits.discriminators) == 0 and set(exits.optimizer_groups()) == {GENERATOR}
    adapter = adapter_for(lm)
    backbone = backbone_of(exits, lm, sequences)
    outputs = exits.exit_outputs(adapter, backbone)
    loss, logs = exits.generator_loss(adapter, outputs, backbone)
    token = [own_token_ce(lg, backbone.labels) for lg in outputs.logits]
    assert "loss_adv" not in logs
    assert loss.item() == pytest.approx(0.5 * sum(token) / len(token), rel=1e-5)


# ---- distill matches the final layer's distribution; supervised matches the labels ----------------

@pytest.fixture(scope="module")
def disagreeing(lm, sequences):
    """Labels that never agree with the final layer, the LM's own logits (HF forward, an
    independent computation), and logits that reproduce the labels."""
    ids, mask, labels = sequences
    with torch.no_grad():
        final = lm(input_ids=ids, attention_mask=mask).logits
    wrong = shift_to_aligned(labels)
    scored = wrong != -100
    wrong[scored] = ((final.argmax(-1) + 1) % VOCAB)[scored]
    copy_labels = torch.zeros_like(final)
    for b, t in own_mask(wrong).nonzero().tolist():
        copy_labels[b, t, wrong[b, t]] = 25.0
    # the final logits at trained positions only: elsewhere they are garbage, which must not count
    garbage = torch.randn(final.shape, generator=torch.Generator().manual_seed(4)) * 5
    final_where_trained = torch.where(own_mask(wrong)[..., None], final, garbage)
    return wrong, final, final_where_trained, copy_labels


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distill_matches_the_final_layer_not_the_labels(lm, sequences, disagreeing, temperature):
    wrong, final, final_where_trained, copy_labels = disagreeing
    exits = make_exits(lm, layout="no_adversarial", loss={"mode": "distill", "kd_temperature": temperature})
    backbone = backbone_of(exits, lm, sequences, labels=wrong)
    outputs = ExitOutputs(features=[None, None], logits=[final_where_trained, copy_labels])
    logs = exits.generator_loss(adapter_for(lm), outputs, backbone)[1]
    assert logs["loss_token_exit0"] == pytest.approx(0.0, abs=1e-5)
    # KL(final softmax || exit softmax) at T, times T^2, written out
    mask = own_mask(wrong)
    teacher = torch.log_softmax(final[mask].double() / temperature, -1)
    student = torch.log_softmax(copy_labels[mask].double() / temperature, -1)
    expected = (teacher.exp() * (teacher - student)).sum(-1).mean().item() * temperature**2
    assert logs["loss_token_exit1"] == pytest.approx(expected, rel=1e-4)
    assert logs["loss_token_exit1"] > 1.0


def test_supervised_matches_the_labels_not_the_final_layer(lm, sequences, disagreeing):
    wrong, final, final_where_trained, copy_labels = disagreeing
    exits = make_exits(lm, layout="no_adversarial", loss={"mode": "supervised"})
    backbone = backbone_of(exits, lm, sequences, labels=wrong)
    outputs = ExitOutputs(features=[None, None], logits=[final_where_trained, copy_labels])
    logs = exits.generator_loss(adapter_for(lm), outputs, backbone)[1]
    assert logs["loss_token_exit0"] == pytest.approx(own_token_ce(final, wrong), rel=1e-5)
    assert logs["loss_token_exit0"] > 1.0
    assert logs["loss_token_exit1"] < 1e-6


# ---- the two steps: what each lowers ---------------------------------------------------------------

class Host:
    """The least the step functions need (what `AttachedExits` gives them): exits on a frozen LM."""

    def __init__(self, lm, **cfg):
        self.lm = lm
        self.early_exits = make_exits(lm, **cfg)
        self.config = self.early_exits.config

    @property
    def adapter(self):
        return adapter_for(self.lm)


def disc_logits(exits, features, backbone):
    """Per exit, the discriminator's logits on (final features, exit features) at trained positions."""
    mask = own_mask(backbone.labels)
    with torch.no_grad():
        return [(d(backbone.final_features)[mask], d(f)[mask]) for d, f in zip(exits.discriminators, features)]


def test_exits_discriminator_loss_is_the_mean_over_exits_of_real_vs_own_exit_features(lm, sequences):
    """Each exit's discriminator scores final features as real and that exit's features as fake."""
    exits = make_exits(lm, loss={"adv_weight": 1.0})
    exits.discriminators = nn.ModuleList(LinearProbe(seed=20 + k) for k in range(len(EXIT_LAYERS)))
    backbone = backbone_of(exits, lm, sequences)
    outputs = exits.exit_outputs(adapter_for(lm), backbone)
    per_exit = []
    for real, fake in disc_logits(exits, outputs.features, backbone):
        per_exit.append((-F.logsigmoid(real.double())).mean().item() + (-F.logsigmoid(-fake.double())).mean().item())
    assert per_exit[0] != pytest.approx(per_exit[1], rel=1e-3)
    loss, logs = exits.discriminator_loss(outputs, backbone)
    assert loss.item() == pytest.approx(sum(per_exit) / len(per_exit), rel=1e-5)
    assert logs["loss_disc"] == pytest.approx(loss.item())


def test_discriminator_step_lowers_its_loss_on_the_same_batch(lm, sequences):
    host = Host(lm, loss={"adv_weight": 1.0})
    exits = host.early_exits
    backbone = backbone_of(exits, lm, sequences)
    outputs = exits.exit_outputs(host.adapter, backbone)
    before = exits.discriminator_loss(outputs, backbone)[0].item()
    opt = torch.optim.SGD(exits.discriminators.parameters(), lr=0.05)
    logs = discriminator_step(host, outputs, backbone, opt, 0, 0)
    assert logs["loss_disc"] == pytest.approx(before, rel=1e-6)
    assert exits.discriminator_loss(outputs, backbone)[0].item() < before


def test_trained_discriminator_calls_final_features_real_and_exit_features_fake(lm, sequences):
    host = Host(lm, loss={"adv_weight": 1.0})
    exits = host.early_exits
    backbone = backbone_of(exits, lm, sequences)
    outputs = exits.exit_outputs(host.adapter, backbone)
    opt = torch.optim.Adam(exits.discriminators.parameters(), lr=1e-2)
    for i in range(30):
        discriminator_step(host, outputs, backbone, opt, 0, i)
    for real, fake in disc_logits(exits, outputs.features, backbone):
        assert (real > 0).float().mean() > 0.9 and (fake < 0).float().mean() > 0.9


def test_generator_step_lowers_the_adversarial_loss_it_faces(lm, sequences):
    """Discriminator fixed, token term off: the exit features move towards 'final' (logits up)."""
    host = Host(lm, loss={"adv_weight": 1.0, "token_weight": 0.0})
    exits = host.early_exits
    adapter = host.adapter
    backbone = backbone_of(exits, lm, sequences)
    torch.manual_seed(4)  # the exits train with OPT's dropout: the same masks before and after the step
    outputs = exits.exit_outputs(adapter, backbone)
    before = [own_adversarial(d, f, backbone.labels) for d, f in zip(exits.discriminators, outputs.features)]
    fake_before = [fake.mean() for _, fake in disc_logits(exits, outputs.features, backbone)]
    discs = {k: v.clone() for k, v in exits.discriminators.state_dict().items()}
    opt = torch.optim.SGD([p for p in exits.exits.parameters() if p.requires_grad], lr=0.05)
    generator_step(host, outputs, backbone, opt, 0, 0)
    assert all(torch.equal(discs[k], v) for k, v in exits.discriminators.state_dict().items())
    torch.manual_seed(4)
    after_features = exits.exit_outputs(adapter, backbone).features
    after = [own_adversarial(d, f, backbone.labels) for d, f in zip(exits.discriminators, after_features)]
    fake_after = [fake.mean() for _, fake in disc_logits(exits, after_features, backbone)]
    for k in range(len(EXIT_LAYERS)):
        assert after[k] < before[k], k
        assert fake_after[k] > fake_before[k], k


# ---- frozen parts stay bit-identical (on the tiny BLIP-2, frozen by the model itself) ---------------

def tiny_model(**exits):
    cfg = OmegaConf.load(Blip2OPTFree.default_config_path("tiny")).model
    cfg = OmegaConf.merge(cfg, {"exits": {"layers": [2, 5, 8], **exits}})
    torch.manual_seed(0)
    return Blip2OPTFree.from_config(cfg).train()


def tiny_batch():
    gen = torch.Generator().manual_seed(5)
    texts = ["a red circle", "two blue squares at the top left", "one green triangle"]
    return {"image": torch.randn(3, 3, 64, 64, generator=gen), "text_input": texts}


def tensors(module, prefix=""):
    return {prefix + k: v.detach().clone() for k, v in module.state_dict().items()}


def identical(before, module, prefix=""):
    now = tensors(module, prefix)
    return sorted(k for k in before if not torch.equal(before[k], now[k])) == []


@pytest.mark.parametrize("layout", ["free", "vanilla"])
def test_steps_leave_the_frozen_parts_bit_identical(layout):
    """Large LR and weight decay, so that any frozen tensor in an optimizer would move."""
    model = tiny_model(layout=layout, loss={"adv_weight": 1.0})
    run = {"init_lr": 0.05, "min_lr": 0.0, "weight_decay": 0.05, "lr_sched": "linear_warmup_cosine_lr"}
    groups = optim.parameter_groups(model)
    settings = optim.group_settings(run, list(groups))
    opts = {name: optim.build_optimizer(params, settings[name]) for name, params in groups.items()}
    exits = model.early_exits
    lm = model.opt_model
    backbone_before = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("early_exits.")}
    norm_head_before = {**tensors(lm.model.decoder.final_layer_norm, "norm."), **tensors(lm.lm_head, "head.")}
    backbone = exits_of(model).backbone_outputs(tiny_batch())
    outputs = exits.exit_outputs(exits_of(model).adapter, backbone)

    def backbone_untouched():
        now = model.state_dict()
        assert [k for k, v in backbone_before.items() if not torch.equal(v, now[k])] == []
        now_nh = {**tensors(lm.model.decoder.final_layer_norm, "norm."), **tensors(lm.lm_head, "head.")}
        assert all(torch.equal(v, now_nh[k]) for k, v in norm_head_before.items())

    if layout == "free":
        exits_before = tensors(exits.exits)
        discs_before = tensors(exits.discriminators)
        discriminator_step(exits_of(model), outputs, backbone, opts[DISCRIMINATOR], 0, 0)
        backbone_untouched()
        assert identical(exits_before, exits.exits)
        assert not identical(discs_before, exits.discriminators)
        discs_before = tensors(exits.discriminators)
        exits.discriminators.zero_grad(set_to_none=True)
    exits_before = tensors(exits.exits)
    generator_step(exits_of(model), outputs, backbone, opts[GENERATOR], 0, 0)
    backbone_untouched()
    assert not identical(exits_before, exits.exits)
    if layout == "free":
        assert identical(discs_before, exits.discriminators)
        assert all(p.grad is None for p in exits.discriminators.parameters()), "gradient reached the discriminators"
