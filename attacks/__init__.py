"""Attacks shared by training and evaluation: our gradient attacks (attacks/gradient.py) and
every attack the evaluator runs, by name (attacks/registry.py)."""
from attacks.gradient import GradientAttack, bim, fgsm, input_gradient, mi_fgsm, pgd
from attacks.registry import RECIPES, AttackRecipe, AttackSettings, parse_attack
from engine.seeding import seeded_generator  # attacks take generators made by it

__all__ = [
    "RECIPES", "AttackRecipe", "AttackSettings", "GradientAttack", "bim", "fgsm", "input_gradient", "mi_fgsm",
    "parse_attack", "pgd", "seeded_generator",
]
