"""Attacks shared by training and evaluation (see attacks/gradient.py)."""
from attacks.gradient import GradientAttack, bim, fgsm, input_gradient, mi_fgsm, pgd, seeded_generator

__all__ = ["GradientAttack", "bim", "fgsm", "input_gradient", "mi_fgsm", "pgd", "seeded_generator"]
