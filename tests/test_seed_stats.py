"""Tests of `seed_stats`: a simulation with known seed and question variance (size, coverage and
power of the seed-aware test, and today's question-only test failing on the same data), the
macro-averaged figures of `compare`, edge cases, multiplicity adjustment and seed planning."""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower

from pipeline.analysis import compare as cmp
from pipeline.analysis.seed_stats import adjust, difference, power_table, seeds_needed
from pipeline.common import PipelineError

# The simulated benchmark: 240 paragraphs of 5 questions (XQuAD-R has 240 and 1,190), 3 seeds per
# arm. A run's value for a question = 0.7 + arm shift + paragraph and question difficulty (shared by
# both arms) + arm x paragraph and arm x question interaction + the run's seed effect (every question
# of the run) + residual noise.
N_CLUSTERS, PER_CLUSTER, SEEDS = 240, 5, 3
SD = {"cluster": 0.08, "question": 0.1, "arm_cluster": 0.15, "arm_question": 0.1, "seed": 0.03, "residual": 0.1}
CLUSTERS = np.repeat(np.arange(N_CLUSTERS), PER_CLUSTER)
N_QUESTIONS = len(CLUSTERS)
# What the two components must estimate, from the model above: the seed effects and each run's
# residual averaged over its questions; the interactions averaged over paragraphs and questions,
# plus the residual of the seed-averaged runs (counted in both: the method errs on the safe side).
RESIDUAL_OF_MEANS = SD["residual"] ** 2 / N_QUESTIONS * 2 / SEEDS
TRUE_SEED_VARIANCE = SD["seed"] ** 2 * 2 / SEEDS + RESIDUAL_OF_MEANS
TRUE_QUESTION_VARIANCE = 2 * (SD["arm_cluster"] ** 2 / N_CLUSTERS + SD["arm_question"] ** 2 / N_QUESTIONS) + RESIDUAL_OF_MEANS
SHIFT = 4 * SD["seed"]  # the true difference of the shifted simulations: a few seed sds
RESAMPLES = 400
# Sizes from the binomial margin. Over 60,000 null simulations the test rejected in 4.9%, so its
# interval covers the truth in 95.1%. With 3,500 null simulations the rejection rate's sd is
# 0.37%, so the 6% bound is 3 sd away; with 1,500 shifted ones the coverage's sd is 0.56%, so 93% and
# 97% are 3.4 sd away. Today's method takes ~0.1 s a comparison and fails by tens of points: 40 do.
N_NULL, N_SHIFTED, N_OLD = 3500, 1500, 40


def mean_figure(totals: np.ndarray) -> np.ndarray:
    """[..., 2] one cell's sum and count -> [..., 1] its mean: the simplest figure in compare's layout."""
    return totals[..., :1] / totals[..., 1:]


def simulated_arms(rng: np.random.Generator, shift: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two arms of SEEDS runs each, one [N_QUESTIONS, 2] matrix (value, count) per run; B's true mean is A's + shift."""
    shared = 0.7 + SD["cluster"] * rng.standard_normal(N_CLUSTERS)[CLUSTERS] + SD["question"] * rng.standard_normal(N_QUESTIONS)
    arms = []
    for arm_shift in (0.0, shift):
        arm = shared + arm_shift + SD["arm_cluster"] * rng.standard_normal(N_CLUSTERS)[CLUSTERS]
        arm += SD["arm_question"] * rng.standard_normal(N_QUESTIONS)
        runs = arm + SD["seed"] * rng.standard_normal((SEEDS, 1)) + SD["residual"] * rng.standard_normal((SEEDS, N_QUESTIONS))
        arms.append([np.column_stack([run, np.ones(N_QUESTIONS)]) for run in runs])
    return arms[0], arms[1]


def simulate(n: int, shift: float, seed: int) -> dict[str, np.ndarray]:
    """Per simulation: the seed-aware method's interval, p and components; for the first N_OLD, the
    question-only analysis `compare` made before issue #28: each arm pooled into its seed-averaged
    matrix (one "run"), question ids resampled one by one, no seed variance."""
    data_rng, boot_rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    rows, old = [], []
    for k in range(n):
        a, b = simulated_arms(data_rng, shift)
        result = difference(a, b, CLUSTERS, mean_figure, RESAMPLES, boot_rng)
        rows.append([result.ci_low[0], result.ci_high[0], result.p[0], result.seed_variance[0], result.question_variance[0]])
        if k < N_OLD:
            pooled = difference([np.mean(a, axis=0)], [np.mean(b, axis=0)], np.arange(N_QUESTIONS), mean_figure, RESAMPLES, boot_rng)
            old.append([pooled.ci_low[0], pooled.ci_high[0], pooled.p[0]])
    rows, old = np.array(rows), np.array(old)
    return {
        "covered": (rows[:, 0] <= shift) & (shift <= rows[:, 1]),
        "rejected": rows[:, 2] < 0.05,
        "seed_variance": rows[:, 3],
        "question_variance": rows[:, 4],
        "old_covered": (old[:, 0] <= shift) & (shift <= old[:, 1]),
        "old_rejected": old[:, 2] < 0.05,
    }


@pytest.fixture(scope="module")
def null_sims() -> dict[str, np.ndarray]:
    return simulate(N_NULL, 0.0, seed=1)


@pytest.fixture(scope="module")
def shifted_sims() -> dict[str, np.ndarray]:
    return simulate(N_SHIFTED, SHIFT, seed=2)


def test_components_estimate_the_simulated_seed_and_question_variance(null_sims):
    assert null_sims["seed_variance"].mean() == pytest.approx(TRUE_SEED_VARIANCE, rel=0.05)
    assert null_sims["question_variance"].mean() == pytest.approx(TRUE_QUESTION_VARIANCE, rel=0.05)


def test_keeps_its_size_where_the_question_only_test_does_not(null_sims):
    """No true difference: the seed-aware test rejects at 0.05 in <= 6% of simulations; today's
    test, blind to seeds and paragraphs, calls most of them significant."""
    assert null_sims["rejected"].mean() <= 0.06, null_sims["rejected"].mean()
    assert null_sims["old_rejected"].mean() >= 0.3, null_sims["old_rejected"].mean()


def test_interval_covers_the_true_difference_where_the_question_only_one_does_not(shifted_sims):
    assert 0.93 <= shifted_sims["covered"].mean() <= 0.97, shifted_sims["covered"].mean()
    assert shifted_sims["old_covered"].mean() <= 0.8, shifted_sims["old_covered"].mean()


def test_detects_a_difference_of_a_few_seed_sds(shifted_sims):
    assert shifted_sims["rejected"].mean() >= 0.8, shifted_sims["rejected"].mean()


def test_paragraph_clusters_carry_the_arm_by_paragraph_variance():
    """Resampling questions as if independent would miss most of the arm x paragraph interaction."""
    rng = np.random.default_rng(3)
    a, b = simulated_arms(rng, 0.0)
    by_paragraph = difference(a, b, CLUSTERS, mean_figure, 2000, rng).question_variance[0]
    by_question = difference(a, b, np.arange(N_QUESTIONS), mean_figure, 2000, rng).question_variance[0]
    assert by_paragraph > 2 * by_question


def per_query_table(rng: np.random.Generator, easiness: np.ndarray, has_recall: np.ndarray, shift: float) -> pd.DataFrame:
    """One run's per-query rows in `evaluate`'s form, 3 languages in every setting, one seed effect on
    every ap; rank distance does not depend on the arm. `has_recall` [language, question], the same in
    every run, leaves some multi rows without recall, so cells differ in size and the macro-average is
    not a plain mean."""
    langs = ["en", "de", "zh"]
    pairs = (
        [("mono", x, x) for x in langs] + [("cross", x, y) for x in langs for y in langs if x != y] + [("multi", x, None) for x in langs]
    )
    n = len(easiness)
    seed_effect = 0.03 * rng.standard_normal()
    table = pd.DataFrame(
        {
            "setting": np.repeat([s for s, _, _ in pairs], n),
            "query_lang": np.repeat([q for _, q, _ in pairs], n),
            "passage_lang": np.repeat([p for _, _, p in pairs], n),
            "question_id": np.tile([f"q{i}" for i in range(n)], len(pairs)),
            "ap": np.tile(easiness, len(pairs)) + shift + seed_effect + 0.1 * rng.standard_normal(n * len(pairs)),
        }
    )
    multi = table["setting"] == "multi"
    recall_kept = np.concatenate([np.zeros((len(pairs) - len(langs)) * n, bool), has_recall.ravel()])  # multi rows come last
    table["recall_at_10"] = np.where(recall_kept, table["ap"] + 0.1, np.nan)
    table["rank_distance"] = np.where(multi, rng.gamma(2.0, 50.0, len(table)), np.nan)
    return table


def test_macro_figures_of_compare_layout():
    """Every headline figure at once: the difference is the seeds' mean headline difference, and a
    shift of every ap is found in the ap figures, not in rank distance."""
    rng = np.random.default_rng(4)
    n_ids = 200
    easiness = 0.4 + 0.4 * rng.random(n_ids)
    has_recall = rng.random((3, n_ids)) < 0.9
    clusters = np.arange(n_ids) // 4
    a_tables = [per_query_table(rng, easiness, has_recall, 0.0) for _ in range(3)]
    b_tables = [per_query_table(rng, easiness, has_recall, 0.15) for _ in range(3)]
    longs = [cmp.cells(t) for t in a_tables + b_tables]
    lay, notes = cmp.layout([(str(k), long) for k, long in enumerate(longs)])
    assert notes == []
    runs = [cmp.matrices(long, lay) for long in longs]
    result = difference(runs[:3], runs[3:], clusters, partial(cmp.macro, lay=lay), 1000, rng)

    def seeds_mean(tables):
        return pd.DataFrame([cmp.headline(t) for t in tables]).mean()

    expected = (seeds_mean(b_tables) - seeds_mean(a_tables))[lay.figures].to_numpy()
    np.testing.assert_allclose(result.difference, expected, rtol=1e-12)
    significant = dict(zip(lay.figures, result.p < 0.05))
    assert significant == {"mono_map": True, "cross_map": True, "multi_map": True, "multi_recall_at_10": True, "rank_distance": False}
    assert (result.seed_variance > 0).all() and (result.question_variance > 0).all()


def small_arms(rng: np.random.Generator, n_a: int, n_b: int, n_rows: int = 30) -> tuple[list[np.ndarray], list[np.ndarray]]:
    def run(offset):
        return np.column_stack([offset + rng.standard_normal(n_rows), np.ones(n_rows)])

    return [run(rng.normal()) for _ in range(n_a)], [run(rng.normal()) for _ in range(n_b)]


def test_seed_component_is_the_runs_own_figures_variance():
    rng = np.random.default_rng(5)
    a, b = small_arms(rng, 3, 4)
    result = difference(a, b, np.arange(30) // 3, mean_figure, 200, rng)
    fig_a, fig_b = (np.array([mean_figure(run.sum(axis=0)) for run in arm]) for arm in (a, b))
    assert result.difference == pytest.approx(fig_b.mean(axis=0) - fig_a.mean(axis=0))
    assert result.seed_variance == pytest.approx(fig_a.var(axis=0, ddof=1) / 3 + fig_b.var(axis=0, ddof=1) / 4)
    assert result.se**2 == pytest.approx(result.seed_variance + result.question_variance)
    assert not result.a_single_run and not result.b_single_run and not result.question_only


def test_a_single_run_arm_has_no_seed_variance_and_says_so():
    rng = np.random.default_rng(6)
    clusters = np.arange(30) // 3
    base, strategy = small_arms(rng, 1, 3)
    one_side = difference(base, strategy, clusters, mean_figure, 200, rng)
    assert one_side.a_single_run and not one_side.b_single_run and not one_side.question_only
    strategy_figures = [mean_figure(run.sum(axis=0))[0] for run in strategy]
    assert one_side.seed_variance[0] == pytest.approx(np.var(strategy_figures, ddof=1) / 3)
    both = difference(base, strategy[:1], clusters, mean_figure, 200, rng)
    assert both.a_single_run and both.b_single_run and both.question_only
    assert both.seed_variance[0] == 0 and both.df[0] == pytest.approx(10 - 1)


def test_identical_arms_differ_by_nothing():
    rng = np.random.default_rng(7)
    clusters = np.arange(30) // 3
    arm, _ = small_arms(rng, 3, 0)
    result = difference(arm, [run.copy() for run in arm], clusters, mean_figure, 200, rng)
    assert result.difference[0] == 0 and result.p[0] == 1 and result.ci_low[0] < 0 < result.ci_high[0]
    # Two single identical runs leave no chance at all; a constant shift between them is certain (up
    # to rounding in the bootstrap's ratios).
    same = difference(arm[:1], arm[:1], clusters, mean_figure, 200, rng)
    assert (same.difference[0], same.ci_low[0], same.ci_high[0], same.p[0], same.se[0]) == (0, 0, 0, 1, 0)
    shifted = difference(arm[:1], [arm[0] + [0.5, 0.0]], clusters, mean_figure, 200, rng)
    assert shifted.p[0] < 1e-12 and shifted.ci_low[0] == pytest.approx(0.5) and shifted.ci_high[0] == pytest.approx(0.5)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_a=st.integers(1, 4), n_b=st.integers(1, 4), n_clusters=st.integers(2, 12))
def test_interval_excludes_zero_exactly_when_p_is_below_alpha(seed, n_a, n_b, n_clusters):
    rng = np.random.default_rng(seed)
    a, b = small_arms(rng, n_a, n_b, n_rows=24)
    result = difference(a, b, rng.permutation(np.arange(24) % n_clusters), mean_figure, 100, rng)
    excludes_zero = (result.ci_low > 0) | (result.ci_high < 0)
    np.testing.assert_array_equal(excludes_zero, result.p < 0.05)


def test_same_rng_state_gives_the_same_result():
    a, b = small_arms(np.random.default_rng(8), 3, 3)
    first, second = (difference(a, b, np.arange(30) // 3, mean_figure, 300, np.random.default_rng(9)) for _ in range(2))
    np.testing.assert_array_equal(np.stack([first.p, first.ci_low]), np.stack([second.p, second.ci_low]))


@pytest.mark.parametrize(
    ("a", "b", "clusters", "resamples", "message"),
    [
        ([], [np.ones((4, 2))], np.arange(4), 100, "arm A has no runs"),
        ([np.ones((4, 2))], [np.ones((4, 2)), np.ones((5, 2))], np.arange(4), 100, "arm B's runs have different shapes"),
        ([np.ones((4, 2))], [np.ones((5, 2))], np.arange(4), 100, "both arms need the same rows and columns"),
        ([np.ones(4)], [np.ones(4)], np.arange(4), 100, "expected a [rows, columns] matrix per run"),
        ([np.ones((0, 2))], [np.ones((0, 2))], np.arange(0), 100, "no rows (no question id shared by every run?)"),
        ([np.ones((4, 2))], [np.ones((4, 2))], np.arange(3), 100, "expected one cluster per row (4,)"),
        ([np.ones((4, 2))], [np.ones((4, 2))], np.zeros(4), 100, "at least 2 clusters"),
        ([np.ones((4, 2))], [np.ones((4, 2))], np.arange(4), 1, "too few for a variance"),
    ],
)
def test_bad_input_is_one_line(a, b, clusters, resamples, message):
    with pytest.raises(PipelineError, match="^[^\n]*$") as err:
        difference(a, b, clusters, mean_figure, resamples, np.random.default_rng(0))
    assert message in str(err.value)


@pytest.mark.parametrize("method", ["holm", "fdr_bh"])
def test_adjust_is_statsmodels_over_the_whole_family(method):
    p = np.random.default_rng(10).random((4, 5)) ** 3  # 4 comparisons x 5 figures
    adjusted = adjust(p, method)
    assert adjusted.shape == p.shape
    np.testing.assert_array_equal(adjusted.ravel(), multipletests(p.ravel(), method=method)[1])
    assert (adjusted >= p).all()


def test_adjust_defaults_to_holm_and_rejects_an_unknown_method():
    p = [0.01, 0.02, 0.04]
    np.testing.assert_allclose(adjust(p), [0.03, 0.04, 0.04])
    with pytest.raises(PipelineError, match="unknown multiplicity adjustment 'bonferoni' \\(use one of: holm, fdr_bh\\)"):
        adjust(p, "bonferoni")


def test_power_table_by_hand_and_monotone_in_seeds():
    table = power_table({"mono_map": 1.0, "multi_map": 0.01})
    assert list(table.index) == [2, 3, 4, 5, 8, 10] and list(table.columns) == ["mono_map", "multi_map"]
    assert (table.diff().dropna() < 0).all().all()
    np.testing.assert_allclose(table["multi_map"], table["mono_map"] * 0.01)
    # 3 seeds per arm at sd 1: a difference of 3.07 sd has 80% power. By hand: the two-sample t
    # statistic has 4 df and noncentrality 3.07 * sqrt(3 / 2); it passes t(4)'s 97.5% point in 80%.
    detectable = table.loc[3, "mono_map"]
    assert detectable == pytest.approx(3.07, abs=0.01)
    critical = stats.t.ppf(0.975, 4)
    noncentrality = detectable * np.sqrt(3 / 2)
    assert stats.nct.sf(critical, 4, noncentrality) + stats.nct.cdf(-critical, 4, noncentrality) == pytest.approx(0.8, abs=1e-4)
    assert TTestIndPower().power(detectable, nobs1=3, alpha=0.05) == pytest.approx(0.8, abs=1e-6)


def test_seeds_needed_inverts_the_power_table():
    table = power_table({"figure": 0.02})
    for n in table.index:
        assert seeds_needed(table.loc[n, "figure"] * 1.001, 0.02) == n
        assert seeds_needed(-table.loc[n, "figure"] * 0.999, 0.02) == n + 1  # a sign does not matter; a hair less needs one more
    assert seeds_needed(10.0, 0.01) == 2  # any t-test needs two seeds per arm


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: power_table({"mono_map": 1.0}, seeds=(1, 3)), "cannot estimate a seed variance"),
        (lambda: seeds_needed(0.0, 0.01), "cannot be detected"),
        (lambda: seeds_needed(0.01, 0.0), "must be positive"),
        (lambda: seeds_needed(1e-6, 1.0), "more than 1000 seeds per arm"),
    ],
)
def test_planning_bad_input_is_one_line(call, message):
    with pytest.raises(PipelineError, match=message):
        call()
