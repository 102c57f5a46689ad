import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from maskprop.errors import MaskpropError
from maskprop.selection import (
    PRIOR_ASK,
    PRIOR_REJECT,
    PRIOR_SPLIT,
    Prior,
    Selection,
    fit_likelihoods,
)


def test_decide_follows_thresholds():
    sel = Selection(prior_reject_threshold=0.3, prior_accept_threshold=0.7)
    assert sel.decide(0.3) is Prior.REJECT
    assert sel.decide(0.5) is Prior.SPLIT
    assert sel.decide(0.7) is Prior.SPLIT
    assert sel.decide(0.71) is Prior.ASK


def test_learned_thresholds_bracket_the_ambiguous_band():
    rng = np.random.default_rng(0)
    s = rng.uniform(size=5000)
    # Quality rises with the score: clusters below 0.3 are all bad, above 0.8 mostly good.
    q = np.clip((s - 0.3) / 0.5 + rng.normal(0, 0.05, s.size), 0, 1)
    lik = fit_likelihoods(s, q, accept_threshold=0.85)
    assert np.all(np.diff(lik.p_high) >= -1e-12) and np.all(np.diff(lik.p_low) <= 1e-12)
    sel = lik.thresholds(tolerance=0.02)
    assert 0.25 <= sel.prior_reject_threshold <= 0.42
    assert sel.prior_reject_threshold <= sel.prior_accept_threshold <= 0.75


def test_inconsistent_thresholds_refused():
    with pytest.raises(MaskpropError):
        Selection(0.8, 0.7)
    with pytest.raises(MaskpropError):
        fit_likelihoods(np.array([0.5]), np.array([1.0]), 0.85)


@given(
    st.lists(st.floats(-0.5, 1.5, allow_nan=False), min_size=1, max_size=50),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
)
def test_decide_many_codes_what_decide_says(scores, a, b):
    sel = Selection(prior_reject_threshold=min(a, b), prior_accept_threshold=max(a, b))
    code = {Prior.REJECT: PRIOR_REJECT, Prior.SPLIT: PRIOR_SPLIT, Prior.ASK: PRIOR_ASK}
    assert sel.decide_many(np.array(scores)).tolist() == [code[sel.decide(s)] for s in scores]
