"""Attacks shared by training and evaluation: our gradient attacks (attacks/gradient.py) and
every attack the evaluator runs, by name (attacks/registry.py)."""

from attacks.gradient import GradientAttack, bim, fgsm, input_gradient, margin, mi_fgsm, pgd
from attacks.registry import RECIPES, AttackRecipe, AttackSettings, ParsedAttack, parse_attack, query_attacks
from engine.seeding import seeded_generator  # attacks take generators made by it

__all__ = [
    "RECIPES",
    "AttackRecipe",
    "AttackSettings",
    "ParsedAttack",
    "GradientAttack",
    "bim",
    "fgsm",
    "input_gradient",
    "margin",
    "mi_fgsm",
    "parse_attack",
    "pgd",
    "query_attacks",
    "seeded_generator",
]
