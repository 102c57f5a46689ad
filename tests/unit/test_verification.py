import itertools
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskprop.params import AnnotationParams
from maskprop.verification import Verdict, questions_per_round, sample_order, verdict


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


@given(
    seed=st.integers(0, 2**63),
    class_id=st.integers(0, 10_000),
    node=st.integers(0, 2**31 - 1),
    size=st.integers(1, 3000),
    k=st.integers(1, 40),
)
@settings(max_examples=300, deadline=None)
def test_a_cluster_sample_is_distinct_positions_that_a_larger_one_extends(
    seed, class_id, node, size, k
):
    picked = sample_order(seed, class_id, node, size, k)
    assert len(picked) == min(k, size) == len(set(picked))
    assert all(0 <= p < size for p in picked)
    assert sample_order(seed, class_id, node, size, k + 5)[: len(picked)] == picked
    assert sample_order(seed, class_id, node, size, k) == picked  # a pure function


def test_cluster_samples_are_uniform_and_independent_across_clusters():
    """Every ordered pair of 2 out of 4 positions is equally likely over clusters (nodes),
    and every position of a 1,000-mask cluster is drawn as often as sampling without
    replacement predicts: chi-square tests at the 0.1 % level."""
    from scipy.stats import chisquare

    pairs = Counter(tuple(sample_order(7, 3, node, 4, 2)) for node in range(24_000))
    assert len(pairs) == 12 and chisquare(list(pairs.values())).pvalue > 1e-3
    drawn = Counter(p for node in range(4_000) for p in sample_order(1, 2, node, 1000, 15))
    assert chisquare([drawn[p] for p in range(1000)]).pvalue > 1e-3
    # Nearby keys give unrelated samples: the first draw of consecutive nodes and seeds.
    firsts = [sample_order(0, 0, node, 1000, 1)[0] for node in range(2000)]
    assert len(set(firsts)) > 800 and chisquare(np.bincount(firsts, minlength=1000)).pvalue > 1e-3
    by_seed = [sample_order(seed, 0, 5, 1000, 1)[0] for seed in range(2000)]
    assert chisquare(np.bincount(by_seed, minlength=1000)).pvalue > 1e-3


def test_a_cluster_sample_of_every_mask_is_a_permutation():
    assert sample_order(0, 0, 0, 1, 15) == [0]
    assert sorted(sample_order(4, 1, 9, 12, 15)) == list(range(12))
    assert sample_order(0, 0, 0, 0, 5) == [] and sample_order(0, 0, 0, 5, 0) == []
