"""The arithmetic of experiments.fidelity_probe.fidelity_probe on hand-made values."""

import numpy as np
import pytest

from experiments.fidelity_probe.fidelity_probe import rank_agreement, term_errors
from flowrl.shapes.judge import FIDELITY_SCALES, FidelityTerms


def test_term_errors_are_each_terms_share_of_minus_log_fidelity():
    terms = [FidelityTerms(0.02, 0.04, 0.0, 0.1), FidelityTerms(0.0, 0.0, 0.5, 0.0)]
    errors = term_errors(terms)
    assert errors["background"] == pytest.approx([0.1, 0.0]) and errors["color"] == pytest.approx([0.1, 0.0])
    assert errors["strays"] == pytest.approx([0.0, 2.0]) and errors["shapes"] == pytest.approx([0.2, 0.0])
    for t, total in zip(terms, sum(errors.values())):  # the shares add up to minus log fidelity
        assert np.exp(-total) == pytest.approx(t.score)
    assert set(errors) == set(FIDELITY_SCALES)


def test_rank_agreement_reads_a_reward_against_each_term():
    errors = {"color": np.array([0.0, 0.1, 0.2, 0.3]), "strays": np.zeros(4)}
    scores = {"sees_colour": np.array([4.0, 3.0, 2.0, 1.0]), "blind": np.array([1.0, 4.0, 2.0, 3.0]),
              "flat": np.full(4, 2.0)}
    out = rank_agreement(scores, errors)
    assert out["sees_colour"] == {"color": 1.0, "strays": None}  # no stray errors: nothing to rank
    assert out["blind"]["color"] == pytest.approx(-0.4)
    assert out["flat"] == {"color": None, "strays": None}
