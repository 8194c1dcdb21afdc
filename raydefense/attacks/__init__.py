"""Fast training-time attacks (input gradients only, eval mode). Evaluation attacks live in
``raydefense.evaluate`` and use the reference AutoAttack and torchattacks."""

from raydefense.attacks.boundary import boundary_attack
from raydefense.attacks.pgd import ce_objective, eval_mode, fgsm, pgd, pgd_ce, pgd_ce_until_fooled, project, random_start

__all__ = ["boundary_attack", "ce_objective", "eval_mode", "fgsm", "pgd", "pgd_ce", "pgd_ce_until_fooled", "project", "random_start"]
