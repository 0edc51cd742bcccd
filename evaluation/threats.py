"""Threat models: which model the attacker differentiates (or queries), and which model is scored.

Every result row names one of these; a number without its threat model means nothing for a
purification defense (Athalye et al. 2018).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch import nn

from attacks.registry import AttackRecipe, query_attacks
from defenses.base import DefendedClassifier, Defense

Attacker = Literal["classifier", "exact", "bpda", "source"]


@dataclasses.dataclass(frozen=True)
class ThreatModel:
    """attacker: what the attack runs on: the classifier alone, classifier+defense with exact or
    BPDA gradients, or the transfer source classifier. defended: whether the defense is scored."""

    name: str
    description: str
    attacker: Attacker
    defended: bool = True
    queries_only: bool = False

    @property
    def through_defense(self) -> bool:
        """The attacker's model contains the defense, so a randomized defense calls for EOT."""
        return self.attacker in ("exact", "bpda")


THREATS: dict[str, ThreatModel] = {
    threat.name: threat
    for threat in (
        ThreatModel("none", "undefended: attack and score the classifier alone", "classifier", defended=False),
        ThreatModel(
            "gray-box", "attack the classifier alone, score classifier+defense (the seed papers' setting)", "classifier"
        ),
        ThreatModel(
            "white-box",
            "attack classifier+defense with exact gradients (double backprop where the defense differentiates the "
            "classifier)",
            "exact",
        ),
        ThreatModel(
            "bpda",
            "attack classifier+defense; the defense's surrogate (identity by default) on the backward pass",
            "bpda",
        ),
        ThreatModel(
            "transfer", "attack a second classifier (--transfer-from) alone, score classifier+defense", "source"
        ),
        ThreatModel("black-box", "query attacks on classifier+defense outputs only", "exact", queries_only=True),
    )
}


def parse_threats(text: str) -> list[ThreatModel]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in THREATS]
    if unknown or not names:
        raise ValueError(f"unknown threat models {unknown}; choose from {list(THREATS)}")
    return [THREATS[name] for name in names]


def skip_reason(threat: ThreatModel, recipe: AttackRecipe, defense: Defense, has_source: bool) -> str | None:
    """Why this attack cannot run under this threat model against this defense, or None."""
    if threat.queries_only and recipe.uses_gradients:
        return f"black-box allows query attacks only ({', '.join(query_attacks())})"
    if not recipe.uses_gradients and threat.name not in ("none", "black-box"):
        return "query attacks run under black-box (and none); this threat model is about gradients"
    if threat.attacker == "exact" and not threat.queries_only and not defense.differentiable:
        return f"{defense.spec()['name']} is not differentiable: its exact gradient is zero or absent; see bpda"
    if threat.attacker == "source" and not has_source:
        return "transfer needs a source classifier: --transfer-from <classifier file>"
    return None


def attacked_model(threat: ThreatModel, classifier: nn.Module, defense: Defense, source: nn.Module | None) -> nn.Module:
    """The model the attack computes gradients of (or queries) under `threat`."""
    if threat.attacker == "classifier":
        return classifier
    if threat.attacker == "source":
        assert source is not None, "skip_reason() rules this out"
        return source
    return DefendedClassifier(classifier, defense, backward=threat.attacker).eval()


def scored_model(threat: ThreatModel, classifier: nn.Module, defense: Defense) -> nn.Module:
    """The model whose accuracy on the adversarial images is reported under `threat`."""
    return defense.scored_model(classifier).eval() if threat.defended else classifier
