import math

import pytest

from raydefense.evaluate.detection import auroc, detection_summary, er_table4, tpr_tnr


def test_table4_matches_a_hand_computed_example():
    # 5 adversarial: detected = [1,1,0,0,0]; of the 3 undetected, 1 correctly classified.
    # 4 natural: one wrongly flagged.
    m = er_table4([1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 0, 0])
    assert m == pytest.approx({"acc_adv": 2 / 5, "acc_nadv": 3 / 4, "acc_cla": 1 / 3, "acc_com": 3 / 5})


def test_rates_and_auroc():
    assert tpr_tnr([1, 1, 0, 1], [0, 0, 1, 0]) == (0.75, 0.75)
    assert auroc([0.9, 0.8, 0.7], [0.1, 0.2, 0.3]) == 1.0
    assert auroc([0.1, 0.2], [0.9, 0.8]) == 0.0
    assert auroc([0.5, 0.5], [0.5, 0.5]) == 0.5
    assert math.isnan(er_table4([1, 1], [0, 0], [0])["acc_cla"])  # every adversarial example detected
    s = detection_summary([0.9, 0.4], [0.1, 0.6], threshold=0.5, correct_adv=[0, 1])
    assert s["tpr"] == 0.5 and s["tnr"] == 0.5 and s["acc_com"] == 1.0
