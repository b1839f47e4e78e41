"""Significance and uncertainty for the data-efficiency table.

- `mcnemar(a, b)`: paired test of two models' correctness on the same CLOSED questions. Exact
  two-sided binomial test on the discordant pairs when there are fewer than 25 of them, the
  continuity-corrected chi-square otherwise (the usual rule).
- `paired_bootstrap(a, b, clusters)`: paired test of per-question OPEN scores (e.g. token recall),
  resampling images (questions about one image are not independent), two-sided p from the
  bootstrap distribution of the mean difference re-centred under the null.
- `seed_mean_ci(values)`: mean ± Student-t 95% interval over seeds; with one seed there is no spread
  to measure, and the caller shows that seed's bootstrap CI and says n_seeds = 1.
- `seed_paired_t(a, b)`: paired t-test over seeds (per seed A − B, same seed, benchmark and metric).
  The seed is the unit of replication (one training run): the item-level tests say whether a
  difference holds over the questions of these runs, this one whether it holds over runs.
- `paired_rows(...)`: match `scored.jsonl` rows of two runs by (seed, question id).
- `holm(ps)`: Holm's step-down adjustment of a report's p-values (a table of many tests finds
  "significant" differences by chance; Holm controls the family-wise error without assuming
  independence).
- `min_detectable_effect(n, sd)`: the smallest difference a benchmark of n questions can detect
  (two-sided α = 0.05, 80% power, two independent runs), so a reader knows what "no significant
  difference" can and cannot mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput
from medvqa.io import iter_jsonl

EXACT_BELOW = 25  # discordant pairs: exact binomial below this, chi-square with continuity at or above


@dataclass(frozen=True)
class TestResult:
    """A paired comparison of A against B: A − B, its p-value, and which test produced it."""

    test: str
    diff: float  # mean(A) − mean(B), in the metric's unit (percent points)
    p: float
    n: int  # paired items
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"test": self.test, "diff": self.diff, "p": self.p, "n": self.n, "detail": self.detail}


def _binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n fair coin flips (doubling the smaller tail)."""
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> TestResult:
    """McNemar's test of paired binary outcomes (A correct vs B correct on the same items)."""
    if len(a) != len(b):
        raise ValueError("mcnemar: both sides need the same items")
    n01 = sum(1 for x, y in zip(a, b) if x and not y)  # A right, B wrong
    n10 = sum(1 for x, y in zip(a, b) if y and not x)  # B right, A wrong
    disc = n01 + n10
    n = len(a)
    diff = 100.0 * (n01 - n10) / n if n else 0.0
    detail = f"A-only {n01}, B-only {n10}"
    if disc == 0:
        return TestResult("mcnemar-exact", diff, 1.0, n, detail)
    if disc < EXACT_BELOW:
        return TestResult("mcnemar-exact", diff, _binom_two_sided(n01, disc), n, detail)
    chi2 = (abs(n01 - n10) - 1) ** 2 / disc
    return TestResult("mcnemar-chi2", diff, math.erfc(math.sqrt(chi2 / 2)), n, detail)


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    clusters: Sequence[str] | None = None,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> TestResult:
    """Paired bootstrap of mean(A − B), resampling clusters (images) with replacement (the scorer's
    own cluster bootstrap, `medvqa.scoring.cluster_bootstrap_means`)."""
    import numpy as np
    from medvqa.scoring import cluster_bootstrap_means

    if len(a) != len(b):
        raise ValueError("paired_bootstrap: both sides need the same items")
    n = len(a)
    if n == 0:
        return TestResult("paired-bootstrap", 0.0, 1.0, 0)
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    observed = float(d.mean())
    if clusters is None:
        clusters = [str(i) for i in range(n)]
    index: dict[str, int] = {}
    ids = np.array([index.setdefault(c, len(index)) for c in clusters])
    boot = cluster_bootstrap_means(d, ids, n_boot=n_boot, rng=np.random.default_rng(seed))[:, 0]
    if np.allclose(d, d[0]):
        p = 1.0 if observed == 0 else 0.0
        p = max(p, 1.0 / (n_boot + 1)) if observed != 0 else 1.0
    else:
        centred = boot - observed
        p = float((1 + np.sum(np.abs(centred) >= abs(observed) - 1e-12)) / (n_boot + 1))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return TestResult("paired-bootstrap", observed, min(1.0, p), n, f"95% CI of diff [{lo:.2f}, {hi:.2f}]")


@dataclass(frozen=True)
class SeedSummary:
    mean: float
    ci_low: float | None
    ci_high: float | None
    n_seeds: int
    method: str  # "t-interval over seeds" | "bootstrap (1 seed)" | "none"


def t_quantile(df: int, q: float = 0.975) -> float:
    from scipy.stats import t  # a declared dependency; imported here so `import stats` stays fast

    return float(t.ppf(q, df))


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's T with `df` degrees of freedom."""
    from scipy.stats import t as student_t

    return float(min(1.0, 2.0 * student_t.sf(abs(t), df)))


MIN_PAIRED_SEEDS = 2  # a t-test needs a spread, so at least two differences
NO_SPREAD = 1e-9  # points: a spread of the differences below this is rounding, not variation


@dataclass(frozen=True)
class SeedTest:
    """Paired t-test over seeds of A − B (percent points); without a test, `note` says why."""

    diffs: tuple[tuple[int, float], ...]  # (seed, A − B), seeds ascending
    mean: float | None = None
    ci_low: float | None = None  # 95% Student-t interval of the mean difference, df = n − 1
    ci_high: float | None = None
    t: float | None = None
    p: float | None = None  # two-sided
    note: str = ""

    @property
    def n(self) -> int:
        return len(self.diffs)


def seed_paired_t(a: Mapping[int, float], b: Mapping[int, float]) -> SeedTest:
    """Pair the seeds both sides have (seed with seed, never a stand-in) and test mean(A − B) = 0."""
    diffs = tuple((s, float(a[s]) - float(b[s])) for s in sorted(set(a) & set(b)))
    n = len(diffs)
    if n < MIN_PAIRED_SEEDS:
        return SeedTest(
            diffs,
            mean=diffs[0][1] if diffs else None,
            note=f"{n} paired seed{'' if n == 1 else 's'}, a seed-level test needs {MIN_PAIRED_SEEDS}",
        )
    vals = [d for _, d in diffs]
    mean = math.fsum(vals) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
    if sd < NO_SPREAD:
        return SeedTest(diffs, mean=mean, note="the same difference on every seed, no spread to test against")
    se = sd / math.sqrt(n)
    half = t_quantile(n - 1) * se
    t = mean / se
    return SeedTest(diffs, mean, mean - half, mean + half, t, t_two_sided_p(t, n - 1))


def seed_mean_ci(
    values: Sequence[float], single_ci: tuple[float | None, float | None] = (None, None)
) -> SeedSummary:
    """Mean over seeds with a 95% t-interval; one seed → its own bootstrap CI (`single_ci`)."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return SeedSummary(float("nan"), None, None, 0, "none")
    mean = sum(vals) / n
    if n == 1:
        lo, hi = single_ci
        return SeedSummary(mean, lo, hi, 1, "bootstrap (1 seed)" if lo is not None else "none")
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return SeedSummary(mean, mean - half, mean + half, n, "t-interval over seeds")


def load_scored(eval_dir: str | Path) -> list[dict[str, Any]]:
    """The per-question rows of one eval (`scored.jsonl`); empty if the file is missing.

    Each row must be an object with a text or integer `id` (what pairs questions across runs) and,
    where present, a text `answer_type`, `image_id` and an object `meta`: else a BadInput naming the line.
    """
    path = Path(eval_dir) / "scored.jsonl"
    if not path.is_file():
        return []
    rows = []
    for lineno, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise BadInput(
                f"expected a JSON object, got {type(row).__name__}", path=path, record=f"line {lineno}"
            )
        rid = row.get("id")
        if isinstance(rid, bool) or not isinstance(rid, str | int):
            raise BadInput("expected a text or integer id", path=path, record=f"line {lineno}", field="id")
        for key, kind in (("answer_type", str), ("image_id", str | int), ("meta", dict)):
            if row.get(key) is not None and not isinstance(row[key], kind):
                raise BadInput(
                    f"expected {'an object' if kind is dict else 'text'}, got {type(row[key]).__name__}",
                    path=path,
                    record=f"line {lineno}",
                    field=key,
                )
        rows.append(row)
    return rows


def _row_value(row: dict[str, Any], scorer: str, metric: str) -> float | None:
    table = row.get(scorer)
    if not isinstance(table, dict):
        return None
    v = table.get(metric)
    return float(v) if isinstance(v, int | float) else None


def paired_rows(
    side_a: dict[Any, list[dict[str, Any]]],
    side_b: dict[Any, list[dict[str, Any]]],
    scorer: str,
    metric: str,
) -> tuple[list[float], list[float], list[str]]:
    """Values of `metric` for questions both sides answered, matched by (seed, id).

    `side_a`/`side_b` map a seed to that seed's scored rows. Seeds both sides have are paired
    seed with seed; a side with seeds the other lacks is paired with the other's first seed (so a
    reference row with one run still pairs with every seed of a swept row).
    """
    a_vals: list[float] = []
    b_vals: list[float] = []
    clusters: list[str] = []
    common = sorted(set(side_a) & set(side_b), key=str)
    if common:
        pairs = [(s, s) for s in common]
    elif side_a and side_b:
        first_b = sorted(side_b, key=str)[0]
        pairs = [(s, first_b) for s in sorted(side_a, key=str)]
    else:
        pairs = []
    for sa, sb in pairs:
        b_index = {r["id"]: r for r in side_b[sa if sa in side_b else sb] if "id" in r}
        for r in side_a[sa]:
            other = b_index.get(r.get("id"))
            if other is None:
                continue
            va, vb = _row_value(r, scorer, metric), _row_value(other, scorer, metric)
            if va is None or vb is None:
                continue
            a_vals.append(va)
            b_vals.append(vb)
            clusters.append(f"{sa}\x00{r.get('image_id', r.get('id'))}")
    return a_vals, b_vals, clusters


def paired_test(
    side_a: dict[Any, list[dict[str, Any]]],
    side_b: dict[Any, list[dict[str, Any]]],
    scorer: str,
    metric: str,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> TestResult | None:
    """McNemar for `closed_accuracy` (0/100 per question), paired bootstrap for the open metrics."""
    a, b, clusters = paired_rows(side_a, side_b, scorer, metric)
    if not a:
        return None
    if metric == "closed_accuracy":
        return mcnemar([x >= 50 for x in a], [y >= 50 for y in b])
    return paired_bootstrap(a, b, clusters, n_boot=n_boot, seed=seed)


def holm(ps: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order: sort ascending, p_(i) × (m − i + 1), running max, ≤ 1."""
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    out = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def min_detectable_effect(n: int, sd: float, *, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """Smallest true difference of two means (same unit as `sd`) that a two-sided z-test on two
    independent runs of `n` items detects with the given power: (z_{1-α/2} + z_power)·sd·√(2/n)."""
    from statistics import NormalDist

    if n <= 0:
        return None
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return z * sd * math.sqrt(2.0 / n)


def format_p(p: float | None) -> str:
    if p is None:
        return ""
    if p < 0.001:
        return "<0.001"
    return f"{p:.3f}"
