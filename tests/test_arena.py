"""Elo from a Bradley-Terry fit (docs/design.md, Math): recovery, invariances, edge cases, vote validation."""

import math
import random

import numpy as np
import pandas as pd
import pytest

from flowrl.arena import Battle, fit_elo, validate_votes


def _tournament(ratings: dict[str, float], n: int, seed: int, tie_rate: float = 0.0) -> list[Battle]:
    rng = random.Random(seed)
    names = list(ratings)
    battles = []
    for _ in range(n):
        a, b = rng.sample(names, 2)
        p = 1.0 / (1.0 + 10 ** ((ratings[b] - ratings[a]) / 400))
        if rng.random() < tie_rate:
            battles.append(Battle(a, b, 0.5))
        else:
            battles.append(Battle(a, b, 1.0 if rng.random() < p else 0.0))
    return battles


def test_a_synthetic_tournament_is_recovered():
    truth = {"base": 1000.0, "teacher": 1120.0, "student": 1250.0, "weak": 880.0}
    battles = _tournament(truth, 6000, seed=1)  # drawn from Bradley-Terry itself (random ties would compress it)
    fitted = fit_elo(battles, list(truth), anchor="base", bootstrap=100, seed=0)
    assert fitted["base"].rating == pytest.approx(1000.0)
    for name, value in truth.items():
        assert fitted[name].rating == pytest.approx(value, abs=35), name
        assert fitted[name].ci_low <= fitted[name].rating <= fitted[name].ci_high
        assert fitted[name].ci_low - 1e-6 <= value <= fitted[name].ci_high + 1e-6, name  # the 95 % interval holds it


def test_the_order_of_battles_does_not_matter():
    battles = _tournament({"base": 1000.0, "a": 1100.0, "b": 950.0}, 500, seed=2, tie_rate=0.2)
    shuffled = list(battles)
    random.Random(0).shuffle(shuffled)
    flipped = [Battle(b.model_b, b.model_a, 1.0 - b.outcome) for b in battles]  # the same results, sides swapped
    first = fit_elo(battles, ["base", "a", "b"], "base", bootstrap=0)
    for other in (shuffled, flipped):
        again = fit_elo(other, ["base", "a", "b"], "base", bootstrap=0)
        for name in first:
            assert again[name].rating == pytest.approx(first[name].rating, abs=1e-9)


def test_a_model_that_wins_every_battle_is_finite_and_clearly_highest():
    battles = [Battle("champ", other, 1.0) for other in ("base", "x") for _ in range(30)]
    battles += _tournament({"base": 1000.0, "x": 1050.0}, 60, seed=3)
    fitted = fit_elo(battles, ["base", "x", "champ"], "base", bootstrap=50)
    champ = fitted["champ"]
    assert all(math.isfinite(v) for v in (champ.rating, champ.ci_low, champ.ci_high))
    assert champ.rating > max(fitted["base"].rating, fitted["x"].rating) + 300


def test_only_ties_leave_two_models_equal():
    fitted = fit_elo([Battle("base", "other", 0.5)] * 20, ["base", "other"], "base", bootstrap=20)
    assert fitted["other"].rating == pytest.approx(1000.0, abs=1e-6)
    assert fitted["other"].ci_low == pytest.approx(1000.0, abs=1e-6)


def test_a_tie_counts_as_half_a_win_each_way():
    split = [Battle("base", "m", 1.0), Battle("base", "m", 0.0), Battle("base", "m", 1.0)]
    tied = [Battle("base", "m", 0.5), Battle("base", "m", 0.5), Battle("base", "m", 1.0)]
    a = fit_elo(split, ["base", "m"], "base", bootstrap=0)["m"].rating
    b = fit_elo(tied, ["base", "m"], "base", bootstrap=0)["m"].rating
    assert a == pytest.approx(b, abs=1e-9) and a < 1000.0


def test_bad_battles_are_named():
    with pytest.raises(ValueError, match="battle 1: unknown model 'z'"):
        fit_elo([Battle("base", "a", 1.0), Battle("z", "a", 1.0)], ["base", "a"], "base")
    with pytest.raises(ValueError, match="battle 0: outcome"):
        fit_elo([Battle("base", "a", 0.7)], ["base", "a"], "base")
    with pytest.raises(ValueError, match="anchor"):
        fit_elo([Battle("base", "a", 1.0)], ["base", "a"], "nobody")


def test_human_votes_are_validated_row_by_row():
    good = pd.DataFrame({"arena": ["t2i", "edit", "t2i"], "prompt": ["a red circle", "remove it", "two squares"],
                         "model_a": ["base", "base", "student"], "model_b": ["student", "student", "base"],
                         "winner": ["b", "tie", "a"]})
    arenas = validate_votes(good, models=["base", "student"])
    assert [b.outcome for b in arenas["t2i"]] == [0.0, 1.0] and arenas["edit"][0].outcome == 0.5
    for column, value, message in (("winner", "left", "row 1: winner"), ("arena", "video", "row 1: arena"),
                                   ("model_b", "base", "row 1: model_a and model_b"), ("prompt", " ", "row 1: prompt"),
                                   ("model_a", "ghost", "row 1: model_a 'ghost'")):
        bad = good.copy()
        bad.loc[1, column] = value
        with pytest.raises(ValueError, match=message):
            validate_votes(bad, models=["base", "student"])
    with pytest.raises(ValueError, match="missing column"):
        validate_votes(good.drop(columns=["winner"]))


def test_bootstrap_is_seeded():
    battles = _tournament({"base": 1000.0, "a": 1100.0}, 200, seed=4)
    one = fit_elo(battles, ["base", "a"], "base", bootstrap=30, seed=7)
    two = fit_elo(battles, ["base", "a"], "base", bootstrap=30, seed=7)
    assert one == two
    assert np.isfinite(one["a"].ci_high)


def test_judge_outcome_prefers_correctness_then_the_secondary_score():
    from flowrl.arena import judge_outcome

    assert judge_outcome(1, 0, 0.1, 0.9) == 1.0  # correct beats incorrect whatever the secondary
    assert judge_outcome(0, 1, 0.9, 0.1) == 0.0
    assert judge_outcome(1, 1, 0.9, 0.7) == 1.0  # both correct: the cleaner image wins
    assert judge_outcome(1, 1, 0.90, 0.88) == 0.5  # within the tolerance: a tie


def test_judge_battles_pair_every_model_on_every_prompt():
    from flowrl.arena import judge_battles

    primary = {"base": np.array([0, 1, 0]), "student": np.array([1, 1, 0]), "teacher": np.array([1, 0, 0])}
    secondary = {k: np.ones(3) for k in primary}
    battles = judge_battles(primary, secondary)
    assert len(battles) == 3 * 3  # 3 pairs x 3 prompts
    base_student = [b.outcome for b in battles if (b.model_a, b.model_b) == ("base", "student")]
    assert base_student == [0.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="one length"):
        judge_battles({"a": np.zeros(2), "b": np.zeros(3)}, {"a": np.zeros(2), "b": np.zeros(3)})


def test_unanimous_pairs_flag_who_won_or_lost_every_battle_against_whom():
    """a beat b in all 3 battles; a and c split theirs (a tie counts half each way, so a c-b record of
    one win and one tie is not unanimous for either); d met nobody."""
    from flowrl.arena import arena_flags

    battles = [Battle("a", "b", 1.0), Battle("b", "a", 0.0), Battle("a", "b", 1.0),
               Battle("a", "c", 1.0), Battle("c", "a", 1.0), Battle("c", "b", 1.0), Battle("b", "c", 0.5)]
    flags = arena_flags(battles, ["a", "b", "c", "d"])
    assert flags == [{"model": "a", "opponent": "b", "outcome": "won_all", "battles": 3},
                     {"model": "b", "opponent": "a", "outcome": "lost_all", "battles": 3}]
    # one more battle that b wins clears the pair; a single tie alone is not unanimous either
    assert arena_flags(battles + [Battle("b", "a", 1.0)], ["a", "b", "c", "d"]) == []
    assert arena_flags([Battle("a", "b", 0.5)], ["a", "b"]) == []
    # ties beside wins keep the record mixed: won 2 of 3 with a tie is not all
    assert arena_flags([Battle("a", "b", 1.0), Battle("a", "b", 1.0), Battle("a", "b", 0.5)], ["a", "b"]) == []


def test_a_flagged_rating_is_set_by_the_prior():
    """The pair the flag names is the pair whose gap the prior decides: with a weaker prior the unanimous
    winner's rating runs away, while a mixed record stays where it was."""
    from flowrl.arena import arena_flags

    unanimous = [Battle("base", "x", 0.0)] * 20
    mixed = [Battle("base", "y", 0.0)] * 15 + [Battle("base", "y", 1.0)] * 5
    battles = unanimous + mixed
    assert [(f["model"], f["outcome"]) for f in arena_flags(battles, ["base", "x", "y"])] == [
        ("base", "lost_all"), ("x", "won_all")]
    strong = fit_elo(battles, ["base", "x", "y"], "base", bootstrap=0, prior=1e-2)
    weak = fit_elo(battles, ["base", "x", "y"], "base", bootstrap=0, prior=1e-4)
    assert weak["x"].rating - strong["x"].rating > 300
    assert abs(weak["y"].rating - strong["y"].rating) < 5


def test_unanimous_pairs_checks_the_totals_shape():
    from flowrl.arena import unanimous_pairs

    with pytest.raises(ValueError, match="3 x 3"):
        unanimous_pairs(np.zeros((2, 2)), np.zeros((2, 2)), ["a", "b", "c"])
