"""The trainable part of FREE, attached to a frozen LM through its adapter.

`EarlyExits` owns the K exits, while training adversarially one feature classifier per exit,
and one learned confidence head per exit (`confidence: learned`; fitted after the exits, so
`confidence_fitted` says whether these exits have fitted ones). Training reads the frozen backbone once per batch (`backbone_outputs`, no autograd, and
cacheable on disk because it never changes), then alternates discriminator and generator
losses computed from the same exit features.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from lavis_free.exits import losses
from lavis_free.exits.adapters.base import DecoderAdapter, EncoderContext
from lavis_free.exits.attention import full_sequence_mask
from lavis_free.exits.confidence import ConfidenceHead
from lavis_free.exits.config import ExitConfig
from lavis_free.exits.discriminator import FeatureClassifier
from lavis_free.exits.exit_block import build_exit
from lavis_free.exits.lm_batch import LMBatch


@dataclass
class BackboneOutputs:
    """What exit training needs from the frozen backbone for one batch."""

    exit_inputs: List[torch.Tensor]  # output of decoder layer layers[k], [B, T, D] each
    final_features: torch.Tensor  # final-normed output of the last layer, [B, T, D]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T] aligned targets (see lm_batch), -100 where no loss
    encoder: Optional[EncoderContext] = None  # encoder-decoder LMs: what exit layers cross-attend to


@dataclass
class ExitOutputs:
    features: List[torch.Tensor]  # per exit, [B, T, D]
    logits: List[torch.Tensor]  # per exit, [B, T, V]


class EarlyExits(nn.Module):
    def __init__(self, adapter: DecoderAdapter, config: ExitConfig):
        super().__init__()
        self.config = config
        self.exits = nn.ModuleList(build_exit(adapter, config, layer) for layer in config.layers)
        self.discriminators = nn.ModuleList(
            FeatureClassifier(adapter.hidden_size, config.disc_hidden) for _ in config.layers
        ) if config.adversarial else nn.ModuleList()
        # fitted after exit training (lavis_free.evaluation.fit_confidence), so frozen during it;
        # initialised on a forked RNG, so that adding them changed no seeded draw that follows
        with torch.random.fork_rng(devices=[]):
            self.confidence_heads = nn.ModuleList(ConfidenceHead(adapter.hidden_size) for _ in config.layers).requires_grad_(False)
        self.register_buffer("confidence_fitted", torch.tensor(False))

    def optimizer_groups(self) -> Dict[str, List[nn.Parameter]]:
        """Generator (exits) and discriminator parameters, each trained by its own optimizer."""
        groups = {"generator": [p for p in self.exits.parameters() if p.requires_grad]}
        if len(self.discriminators):
            groups["discriminator"] = list(self.discriminators.parameters())
        return groups

    def inference_state_dict(self) -> Dict[str, torch.Tensor]:
        """Exits (and fitted confidence heads): discriminators are a training device and are not exported."""
        state = {f"exits.{k}": v for k, v in self.exits.state_dict().items()}
        if bool(self.confidence_fitted):
            state.update({f"confidence_heads.{k}": v for k, v in self.confidence_heads.state_dict().items()})
            state["confidence_fitted"] = self.confidence_fitted
        return state

    @torch.no_grad()
    def backbone_outputs(self, adapter: DecoderAdapter, batch: LMBatch) -> BackboneOutputs:
        hidden = adapter.hidden_states(batch.inputs_embeds, batch.attention_mask, batch.encoder)
        labels = batch.labels if batch.labels is not None else torch.full_like(batch.attention_mask, -100, dtype=torch.long)
        return BackboneOutputs(
            exit_inputs=[hidden[layer] for layer in self.config.layers],
            final_features=adapter.final_norm(hidden[-1]),
            attention_mask=batch.attention_mask,
            labels=labels,
            encoder=batch.encoder,
        )

    def exit_outputs(self, adapter: DecoderAdapter, backbone: BackboneOutputs) -> ExitOutputs:
        positions = adapter.positions_from_mask(backbone.attention_mask)
        mask = full_sequence_mask(backbone.attention_mask)
        features, logits = [], []
        for exit_module, hidden in zip(self.exits, backbone.exit_inputs):
            feats = exit_module.features(adapter, hidden, positions, mask, encoder=backbone.encoder)
            features.append(feats)
            logits.append(exit_module.logits(adapter, feats))
        return ExitOutputs(features, logits)

    def discriminator_loss(self, outputs: ExitOutputs, backbone: BackboneOutputs) -> Tuple[torch.Tensor, dict]:
        """Mean over exits of the feature classifier's real/fake loss (exit features detached)."""
        mask = losses.scored_mask(backbone.labels)
        real = backbone.final_features
        per_exit = [
            losses.discriminator_loss(disc(real), disc(feats.detach()), mask)
            for disc, feats in zip(self.discriminators, outputs.features)
        ]
        loss = torch.stack(per_exit).mean()
        return loss, {"loss_disc": loss.item()}

    def generator_loss(
        self, adapter: DecoderAdapter, outputs: ExitOutputs, backbone: BackboneOutputs
    ) -> Tuple[torch.Tensor, dict]:
        """Token loss of every exit, plus the adversarial loss when the layout is `free`."""
        cfg = self.config.loss
        mask = losses.scored_mask(backbone.labels)
        if cfg.mode == "distill":
            with torch.no_grad():
                teacher = adapter.head(backbone.final_features)
            token = [losses.distill_loss(lg, teacher, mask, cfg.kd_temperature) for lg in outputs.logits]
        else:
            token = [losses.cross_entropy_loss(lg, backbone.labels, mask) for lg in outputs.logits]
        token_loss = torch.stack(token).mean()
        logs = {f"loss_token_exit{k}": t.item() for k, t in enumerate(token)}
        loss = cfg.token_weight * token_loss
        if self.config.adversarial:
            adv = torch.stack([
                losses.generator_adversarial_loss(disc(feats), mask)
                for disc, feats in zip(self.discriminators, outputs.features)
            ]).mean()
            loss = loss + cfg.adv_weight * adv
            logs["loss_adv"] = adv.item()
        logs["loss_gen"] = loss.item()
        return loss, logs
