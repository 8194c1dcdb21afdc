"""Detection metrics shared by rfd, ldat and er.

Convention: a detector gives a score per input, higher = "adversarial", or a boolean flag.
Adversarial inputs are the positive class. ER's Table 4 metrics (Li et al.) are defined on N
adversarial and M natural examples: ACC-ADV = n_adv / N (adversarial detected), ACC-NADV = m_nadv / M
(natural passed), ACC-CLA = n_cla / (N - n_adv) (undetected adversarial still classified
correctly), ACC-COM = (n_adv + n_cla) / N.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def tpr_tnr(flag_adv, flag_nat) -> tuple[float, float]:
    """True positive rate on adversarial inputs, true negative rate on natural inputs."""
    flag_adv, flag_nat = _np(flag_adv).astype(bool), _np(flag_nat).astype(bool)
    tpr = float(flag_adv.mean()) if flag_adv.size else math.nan
    tnr = float((~flag_nat).mean()) if flag_nat.size else math.nan
    return tpr, tnr


def auroc(score_adv, score_nat) -> float:
    """Area under the ROC curve of a score separating adversarial (positive) from natural inputs."""
    from sklearn.metrics import roc_auc_score

    s_adv, s_nat = _np(score_adv).astype(float), _np(score_nat).astype(float)
    if not s_adv.size or not s_nat.size:
        return math.nan
    labels = np.concatenate([np.ones(len(s_adv)), np.zeros(len(s_nat))])
    return float(roc_auc_score(labels, np.concatenate([s_adv, s_nat])))


def er_table4(flag_adv, correct_adv, flag_nat) -> dict[str, float]:
    """ACC-ADV, ACC-NADV, ACC-CLA and ACC-COM (Li et al., Table 4).

    flag_adv: detector says adversarial, per adversarial example; correct_adv: the classifier's
    prediction on that adversarial example is right; flag_nat: detector says adversarial, per
    natural example.
    """
    flag_adv = _np(flag_adv).astype(bool)
    correct_adv = _np(correct_adv).astype(bool)
    flag_nat = _np(flag_nat).astype(bool)
    n = len(flag_adv)
    n_adv = int(flag_adv.sum())
    n_cla = int((~flag_adv & correct_adv).sum())
    m = len(flag_nat)
    return {
        "acc_adv": n_adv / n if n else math.nan,
        "acc_nadv": int((~flag_nat).sum()) / m if m else math.nan,
        "acc_cla": n_cla / (n - n_adv) if n - n_adv else math.nan,
        "acc_com": (n_adv + n_cla) / n if n else math.nan,
    }


def detection_summary(score_adv, score_nat, threshold: float, correct_adv=None) -> dict[str, float]:
    """TPR / TNR at a threshold, AUROC, and Table-4 metrics when correctness is given."""
    flag_adv, flag_nat = _np(score_adv) > threshold, _np(score_nat) > threshold
    tpr, tnr = tpr_tnr(flag_adv, flag_nat)
    out = {"tpr": tpr, "tnr": tnr, "auroc": auroc(score_adv, score_nat), "threshold": threshold}
    if correct_adv is not None:
        out.update(er_table4(flag_adv, correct_adv, flag_nat))
    return out
