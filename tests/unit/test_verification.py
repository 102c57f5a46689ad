import itertools

import pytest

from maskprop.params import AnnotationParams
from maskprop.verification import Verdict, questions_per_round, verdict


def test_paper_rule_thresholds():
    p = AnnotationParams()
    assert verdict(13, 15, 100, p) is Verdict.ACCEPT  # 0.867 >= 0.85
    assert verdict(12, 15, 100, p) is Verdict.SPLIT
    assert verdict(2, 15, 100, p) is Verdict.REJECT  # 0.133 <= 0.15
    assert verdict(3, 15, 100, p) is Verdict.SPLIT
    assert verdict(14, 14, 100, p) is Verdict.MORE  # fixed rule waits for all N_s
    assert verdict(2, 3, 3, p) is Verdict.SPLIT  # small cluster: m = |C|
    assert verdict(0, 15, 100, AnnotationParams(reject_action="split")) is Verdict.SPLIT


def test_curtailed_rule_never_changes_the_paper_decision():
    fixed = AnnotationParams()
    curtail = AnnotationParams(sequential="curtail")
    # Every answer sequence of length 15: the first decisive prefix agrees with the full rule.
    for bits in itertools.product([0, 1], repeat=15):
        if sum(bits) not in (2, 3, 12, 13) and bits[0] == 0:
            continue  # the boundary counts are where mistakes would show; keep the test fast
        full = verdict(sum(bits), 15, 1000, fixed)
        for k in range(1, 16):
            v = verdict(sum(bits[:k]), k, 1000, curtail)
            if v is not Verdict.MORE:
                assert v is full
                break


def test_curtailed_rule_stops_early_on_mixed_answers():
    p = AnnotationParams(sequential="curtail")
    assert verdict(3, 6, 1000, p) is Verdict.SPLIT  # 3 no: no accept; 3 yes: no reject
    assert verdict(13, 13, 1000, p) is Verdict.ACCEPT


@pytest.mark.parametrize("rule", ["curtail", "beta"])
def test_sequential_rules_ask_in_batches_and_never_exceed_ns(rule):
    p = AnnotationParams(sequential=rule, sequential_batch=4)
    assert questions_per_round(0, 1000, p) == 4
    assert questions_per_round(13, 1000, p) == 2
    assert questions_per_round(15, 1000, p) == 0
    assert verdict(15, 15, 1000, p) is Verdict.ACCEPT


def test_beta_rule_splits_when_the_posterior_is_decisive():
    p = AnnotationParams(sequential="beta")
    assert verdict(4, 8, 1000, p) is Verdict.SPLIT
    assert verdict(1, 1, 1000, p) is Verdict.MORE
