"""Seed-aware comparison of two arms (one strategy, several training seeds each): the difference of the
headline figures with an interval and p-value that carry both sources of chance, a multiplicity
correction over a whole report, and how many seeds a difference needs.

Why: `compare.paired_stats` pools an arm into its seed-averaged matrix and resamples question ids
only, as if another set of seeds would give the same arm figure. It would not: a seed shifts every
question's score of its run together (sd ~0.03 in AP), so two arms of 3 seeds with no true difference
differ by ~0.025 from seeds alone, far outside a question-only interval. Nor are questions independent:
XQuAD-R's 1,190 questions come from 240 paragraphs, and questions of one paragraph rise and fall
together, so the unit a benchmark samples, and the unit to resample, is the paragraph (cluster).

Method: the standard error of the difference in a linear mixed model with crossed random effects for
seed and question (run value = arm + seed + question + arm x question + residual; Baayen, Davidson &
Bates 2008), estimated component by component so that it applies to any figure, including ratios and
macro-averages over cells:

- D = figure of B's seed-averaged matrix - figure of A's (with rows shared by every run: the mean of
  B's per-run figures minus A's);
- seed component V_seed = var(F_A)/n_A + var(F_B)/n_B, F = each run's own figure, ddof 1: how far each
  arm's mean would move with other seeds (Clark et al. 2011; Bouthillier et al. 2021);
- question component V_q = variance of D over a paired cluster bootstrap (Field & Welsh 2007; Cameron,
  Gelbach & Miller 2008): whole clusters drawn with replacement, the same draw for both arms, so what
  the arms share (a paragraph's difficulty) cancels and only their per-question disagreement counts;
- se = sqrt(V_seed + V_q), Welch-Satterthwaite degrees of freedom from the components' own
  (n_A - 1, n_B - 1, n_clusters - 1; Satterthwaite 1946, Welch 1947). Where seeds dominate it
  nears 2 (n - 1), 4 for 3 seeds per arm: t(4), not the normal, is what keeps the test's size;
- one t distribution gives both the interval and the two-sided p-value, so "the interval excludes 0"
  and "p < 1 - confidence" cannot disagree.

An arm of one run (the zero-shot base model is deterministic: one run is all there is) has no
estimable seed variance: it contributes 0 and the result flags it; two such arms give the
question-only comparison. The estimate errs on the safe side: a run's own per-question noise
(seed x question) is counted in both components, adding about var(residual) / n_questions x
(1/n_A + 1/n_B), small next to a seed effect that moves every question at once.

`adjust` corrects p-values over a whole family (Holm 1979; Benjamini & Hochberg 1995); `power_table`
and `seeds_needed` plan seeds from the two-sample t-test on per-run figures. They count seed variance
only, so the question component makes the true detectable difference somewhat larger.

References: Baayen, Davidson & Bates 2008, J. Memory and Language 59(4); Benjamini & Hochberg 1995,
JRSS-B 57(1); Bouthillier et al. 2021, "Accounting for Variance in Machine Learning Benchmarks",
MLSys; Cameron, Gelbach & Miller 2008, Rev. Econ. Stat. 90(3); Clark, Dyer, Lavie & Smith 2011,
"Better Hypothesis Testing for Statistical Machine Translation: Controlling for Optimizer
Instability", ACL; Field & Welsh 2007, JRSS-B 69(3); Holm 1979, Scand. J. Stat. 6(2);
Satterthwaite 1946, Biometrics Bulletin 2(6); Welch 1947, Biometrika 34(1/2).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower

from pipeline.common import PipelineError

BATCH = 1000  # bootstrap resamples per matrix product: a [BATCH, n_clusters] count matrix stays a few MiB
ADJUSTMENTS = ("holm", "fdr_bh")
MAX_SEEDS = 1000  # seeds_needed searches 2..MAX_SEEDS seeds per arm


@dataclass(frozen=True, eq=False)
class ArmDifference:
    """B - A per figure (each array [n_figures]) and what its uncertainty is made of."""

    difference: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    p: np.ndarray
    df: np.ndarray
    se: np.ndarray
    seed_variance: np.ndarray  # V_seed, both arms: what other seeds would change
    question_variance: np.ndarray  # V_q: what other questions (clusters) would change
    a_single_run: bool  # A has one run: its seed variance is unknown and counted as 0
    b_single_run: bool

    @property
    def question_only(self) -> bool:
        """Neither arm's seed variance is known: the interval covers question sampling only."""
        return self.a_single_run and self.b_single_run


def difference(
    a_runs: Sequence[np.ndarray],
    b_runs: Sequence[np.ndarray],
    clusters: np.ndarray,
    figure_of: Callable[[np.ndarray], np.ndarray],
    resamples: int,
    rng: np.random.Generator,
    confidence: float = 0.95,
) -> ArmDifference:
    """Difference B - A of every figure of two arms, with seed and question variance (see the module doc).

    `a_runs`, `b_runs`: per-run matrices [n_rows, width] on the same rows in the same order (as
    `compare.matrices` builds them); `clusters`: [n_rows] the cluster (paragraph) of each row;
    `figure_of`: summed rows [..., width] -> figures [..., n_figures], vectorised over leading axes
    (`functools.partial(compare.macro, lay=layout)`). The same inputs and rng state give the same result."""
    a, b = _arm("A", a_runs), _arm("B", b_runs)
    if a.shape[1:] != b.shape[1:]:
        raise PipelineError(f"arm A's runs are {a.shape[1:]} and arm B's {b.shape[1:]}: both arms need the same rows and columns")
    n_rows, width = a.shape[1:]
    clusters = np.asarray(clusters)
    if clusters.shape != (n_rows,):
        raise PipelineError(f"clusters has shape {clusters.shape}, expected one cluster per row ({n_rows},)")
    cluster_of_row = np.unique(clusters, return_inverse=True)[1]
    n_clusters = cluster_of_row.max() + 1
    if n_clusters < 2:
        raise PipelineError("every row is in one cluster: question variance needs at least 2 clusters")
    if resamples < 2:
        raise PipelineError(f"resamples: {resamples} is too few for a variance (use >= 2, ideally >= 1000)")

    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    estimate = figure_of(mean_b.sum(axis=0)) - figure_of(mean_a.sum(axis=0))
    seed_a, seed_b = _seed_variance(a, figure_of), _seed_variance(b, figure_of)
    per_cluster = np.zeros((n_clusters, 2 * width))
    np.add.at(per_cluster, cluster_of_row, np.hstack([mean_a, mean_b]))
    boot = np.concatenate([figure_of(t[:, width:]) - figure_of(t[:, :width]) for t in _cluster_resamples(per_cluster, resamples, rng)])
    question = boot.var(axis=0, ddof=1)

    variance = seed_a + seed_b + question
    se = np.sqrt(variance)
    components = [(seed_a, len(a) - 1), (seed_b, len(b) - 1), (question, n_clusters - 1)]
    with np.errstate(divide="ignore", invalid="ignore"):  # se = 0 is handled below
        df = variance**2 / sum(v**2 / dof for v, dof in components if dof > 0)
        t_ratio = np.abs(estimate) / se
    half_width = stats.t.ppf(0.5 + confidence / 2, df) * se
    p = 2 * stats.t.sf(t_ratio, df)
    # No chance left at all (e.g. two single runs differing by a constant, or identical): D is exact.
    exact = se == 0
    half_width = np.where(exact, 0.0, half_width)
    p = np.where(exact, (estimate == 0).astype(float), p)
    return ArmDifference(
        difference=estimate,
        ci_low=estimate - half_width,
        ci_high=estimate + half_width,
        p=p,
        df=df,
        se=se,
        seed_variance=seed_a + seed_b,
        question_variance=question,
        a_single_run=len(a) == 1,
        b_single_run=len(b) == 1,
    )


def _arm(name: str, runs: Sequence[np.ndarray]) -> np.ndarray:
    """An arm's runs stacked [n_runs, n_rows, width], or one line saying why they cannot be."""
    if len(runs) == 0:
        raise PipelineError(f"arm {name} has no runs")
    shapes = {np.shape(run) for run in runs}
    if len(shapes) > 1:
        raise PipelineError(f"arm {name}'s runs have different shapes {sorted(shapes)}: every run needs the same rows and columns")
    shape = shapes.pop()
    if len(shape) != 2:
        raise PipelineError(f"arm {name}'s runs have shape {shape}, expected a [rows, columns] matrix per run")
    if shape[0] == 0:
        raise PipelineError(f"arm {name}'s runs have no rows (no question id shared by every run?)")
    return np.asarray(runs, dtype=float)


def _seed_variance(runs: np.ndarray, figure_of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Variance of the arm's seed-averaged figure from its runs' own figures; 0 for a single run,
    whose seed variance is unknown (the result flags it)."""
    figures = figure_of(runs.sum(axis=1))
    if len(runs) == 1:
        return np.zeros_like(figures[0])
    return figures.var(axis=0, ddof=1) / len(runs)


def _cluster_resamples(per_cluster: np.ndarray, resamples: int, rng: np.random.Generator):
    """Batches of column totals [batch, width] over clusters drawn with replacement: one count
    matrix (how often each cluster was drawn) times the per-cluster sums per batch."""
    n = len(per_cluster)
    for start in range(0, resamples, BATCH):
        size = min(BATCH, resamples - start)
        draws = rng.integers(n, size=(size, n)) + n * np.arange(size)[:, None]
        counts = np.bincount(draws.ravel(), minlength=size * n).reshape(size, n)
        yield counts @ per_cluster


def adjust(p_values, method: str = "holm") -> np.ndarray:
    """p-values adjusted over the whole family given (every comparison x figure of one report), same
    shape: a report of 10 comparisons x 5 figures makes 50 tests, and at 0.05 each, some "significant"
    results would be chance. 'holm' bounds the family-wise error, 'fdr_bh' the false discovery rate."""
    if method not in ADJUSTMENTS:
        raise PipelineError(f"unknown multiplicity adjustment '{method}' (use one of: {', '.join(ADJUSTMENTS)})")
    p = np.asarray(p_values, dtype=float)
    return multipletests(p.ravel(), method=method)[1].reshape(p.shape)


def pooled_seed_sd(figures: pd.DataFrame, arm: str) -> dict[str, float]:
    """Each figure's sd across seeds within an arm, pooled over the arms of two or more runs (weighted
    by degrees of freedom): the seed noise a report's own runs measured. `figures`: one row per run,
    the arm's name in column `arm`, a column per figure. Empty where no arm has two runs."""
    numeric = figures.drop(columns=[arm]).select_dtypes("number")
    groups = [rows for _, rows in numeric.groupby(figures[arm]) if len(rows) >= 2]
    if not groups:
        return {}
    dof = sum(len(rows) - 1 for rows in groups)
    return {column: float(np.sqrt(sum(rows[column].var(ddof=1) * (len(rows) - 1) for rows in groups) / dof)) for column in numeric}


def power_table(seed_sd: Mapping[str, float], seeds=(2, 3, 4, 5, 8, 10), power: float = 0.8, alpha: float = 0.05) -> pd.DataFrame:
    """The smallest true difference of each figure that n seeds per arm detect with `power` at
    two-sided `alpha`: rows seeds per arm, columns figures. `seed_sd`: figure -> sd of its per-run
    values across seeds (measured on an arm of several seeds). It is the t-test's standardized effect
    times the sd: to halve the detectable difference takes about four times the seeds."""
    if min(seeds) < 2:
        raise PipelineError(f"seeds: {min(seeds)} per arm cannot estimate a seed variance (use >= 2)")
    solver = TTestIndPower()
    effect = pd.Series(
        {n: solver.solve_power(effect_size=None, nobs1=n, alpha=alpha, power=power, ratio=1.0, alternative="two-sided") for n in seeds},
        dtype=float,
    )
    return pd.DataFrame({figure: effect * sd for figure, sd in seed_sd.items()}).rename_axis("seeds per arm")


def seeds_needed(difference: float, seed_sd: float, power: float = 0.8, alpha: float = 0.05) -> int:
    """The fewest seeds per arm that detect a true `difference` of a figure whose per-run values have
    sd `seed_sd` across seeds, with `power` at two-sided `alpha` (the inverse of `power_table`)."""
    if seed_sd <= 0:
        raise PipelineError(f"seed_sd: {seed_sd} must be positive")
    if difference == 0:
        raise PipelineError("difference: 0 cannot be detected with any number of seeds")
    candidates = np.arange(2, MAX_SEEDS + 1)
    powers = TTestIndPower().power(abs(difference) / seed_sd, nobs1=candidates, alpha=alpha, ratio=1.0, alternative="two-sided")
    enough = np.flatnonzero(powers >= power)
    if not enough.size:
        raise PipelineError(f"a difference of {difference} at seed sd {seed_sd} needs more than {MAX_SEEDS} seeds per arm")
    return int(candidates[enough[0]])
