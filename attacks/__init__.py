"""Attacks shared by training and evaluation (see attacks/gradient.py)."""
from attacks.gradient import GradientAttack, bim, fgsm, input_gradient, mi_fgsm, pgd
from engine.seeding import seeded_generator  # attacks take generators made by it

__all__ = ["GradientAttack", "bim", "fgsm", "input_gradient", "mi_fgsm", "pgd", "seeded_generator"]
