"""Spread-aware verdicts (fedsim.outputs.paired): paired per-seed margins, a one-sided paired
t-test, the sign test where a target was never reached, and the diverged runs listed."""

import math

import pytest
from scipy.stats import ttest_rel

from fedsim.bench import diverged_runs
from fedsim.outputs.paired import claim_margin, paired_verdict


def test_paired_verdict_is_the_one_sided_paired_t_test():
    setting, baseline = [0.81, 0.78, 0.84, 0.80], [0.76, 0.77, 0.79, 0.74]
    margins = [claim_margin(s, b) for s, b in zip(setting, baseline, strict=True)]
    verdict = paired_verdict(margins)
    # by hand: margins 0.05, 0.01, 0.05, 0.06; mean 0.0425, sd 0.022174; t = 3.8333 on 3 df
    assert verdict.outcome == "HOLDS" and verdict.held == 4
    assert verdict.p == pytest.approx(ttest_rel(setting, baseline, alternative="greater").pvalue, rel=1e-9)
    assert verdict.p == pytest.approx(0.01564, rel=1e-3)
    reverse = paired_verdict([-m for m in margins])
    assert reverse.outcome == "DOES NOT HOLD" and reverse.p == pytest.approx(verdict.p)


def test_a_mean_difference_inside_the_seed_spread_is_inconclusive():
    # "#C=1 is the hardest" held on the 3-seed means and was reversed in 2 of 3 seeds
    k1, k2 = [0.50, 0.71, 0.70], [0.80, 0.69, 0.68]
    verdict = paired_verdict([claim_margin(a, b, lower_is_better=True) for a, b in zip(k1, k2, strict=True)])
    assert sum(k1) < sum(k2) and verdict.outcome == "INCONCLUSIVE" and verdict.held == 1


def test_a_target_never_reached_is_judged_by_the_sign_test_which_needs_five_seeds():
    never = [claim_margin(math.inf, 5.0, lower_is_better=True)] * 4
    assert never[0] == -math.inf
    assert paired_verdict(never).outcome == "INCONCLUSIVE"  # 2^-4 = 0.0625 > 0.05
    five = paired_verdict(never + [-math.inf])
    assert (five.outcome, five.p) == ("DOES NOT HOLD", 0.5 ** 5)
    assert claim_margin(3.0, math.inf, lower_is_better=True) == math.inf  # reached where the baseline never did


def test_identical_seeds_decide_by_their_common_margin_and_one_seed_decides_nothing():
    assert paired_verdict([0.0, 0.0, 0.0]).outcome == "HOLDS"  # "at least as accurate", exactly equal
    assert paired_verdict([-0.1, -0.1]).outcome == "DOES NOT HOLD"
    assert paired_verdict([0.3]).outcome == "INCONCLUSIVE"
    assert claim_margin(1_000, 4_000, ratio=4, lower_is_better=True) == 0.0


def test_every_non_finite_or_exploding_run_is_listed_as_diverged():
    results = {"SCAFFOLD": [{"seed": 0, "final_accuracy": 0.8, "final_loss": 0.6},
                            {"seed": 1, "final_accuracy": 0.1, "final_loss": None},
                            {"seed": 2, "final_accuracy": 0.3, "final_loss": 6012.5}],
               "FedAvg": [{"seed": 0, "final_accuracy": 0.8, "final_loss": 0.5},
                          {"seed": 1, "status": "diverged", "rounds_completed": 7, "final_loss": 3.0}],
               "gossip": [{"seed": 0}, {"seed": 1, "status": "diverged", "rounds_completed": 2}]}
    assert diverged_runs(results, threshold=10.0) == ["- SCAFFOLD, seed 1: final test loss not finite",
                                                     "- SCAFFOLD, seed 2: final test loss 6012",
                                                     "- FedAvg, seed 1: stopped as diverging at round 7",
                                                     "- gossip, seed 1: stopped as diverging at round 2"]
