"""FVE step 6: keep a round only when its validation gain is real.

A retrained round differs from the kept one in a few prompts, and its validation score moves by
noise as well: an encoder whose prompt-dependent part was pure noise once gained +0.002 NDCG@10,
and "any improvement" kept it. So the decision is a test over the validation users instead.

For every validation user u, ``m(u)`` is the ``valid_metric`` (NDCG@10 by default) of that user's
target(s) under a model, computed from the target ranks of the feedback pass
(:class:`~reveal_recbole.fve.feedback.TargetRanks`; same ranking and tie rule, no other ranker).
With ``d(u) = m_new(u) - m_kept(u)`` over the n users (sign flipped when the metric is smaller-better):

    gain = mean(d),  t = gain / (sd(d) / sqrt(n)),  p = P(T(n - 1) >= t)   (one-sided paired t-test)
    keep  <=>  gain > fve_keep_margin  and  p <= fve_keep_alpha

Defaults: ``fve_keep_alpha: 0.05``, ``fve_keep_margin: 0.0``. ``fve_keep_alpha: 1`` with margin 0
is the old rule (keep any gain). Per-user metrics are heavy-tailed (most users score 0), but
the test is on their mean difference over hundreds or thousands of users, where the t
approximation holds; it is also exact when every user gains the same amount.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from reveal_recbole.fve.feedback import TargetRanks

DEFAULT_ALPHA = 0.05
DEFAULT_MARGIN = 0.0
USER_METRICS = ("ndcg", "recall", "hit", "mrr", "precision")
_METRIC = re.compile(r"^\s*([a-z]+)\s*@\s*(\d+)\s*$", re.IGNORECASE)


def parse_metric(valid_metric: str) -> tuple[str, int]:
    """``"NDCG@10"`` -> ``("ndcg", 10)``; a ValueError names the metrics a per-user test supports."""
    match = _METRIC.match(str(valid_metric))
    if not match or match.group(1).lower() not in USER_METRICS or int(match.group(2)) < 1:
        raise ValueError(
            f"the FVE keep test scores each validation user, which needs valid_metric to be one of "
            f"{', '.join(m + '@K' for m in USER_METRICS)}; got {valid_metric!r}"
        )
    return match.group(1).lower(), int(match.group(2))


def user_metric(targets: TargetRanks, metric: str, k: int) -> np.ndarray:
    """``(n_rows,)`` per-user ``metric@k`` from the target ranks, as RecBole's metrics define them.

    With h = targets ranked <= k and P = the user's targets: recall = h / P, hit = [h > 0],
    precision = h / k, mrr = 1 / (best rank) if it is <= k, ndcg = sum over hits of
    1 / log2(rank + 1), divided by the ideal sum over min(P, k) positions. Users without a
    target score 0 (full-ranking loaders give every row one).
    """
    n = targets.n_rows
    rank = targets.rank.astype(np.float64)
    hit = rank <= k
    hits = np.bincount(targets.row, weights=hit, minlength=n)
    positives = np.bincount(targets.row, minlength=n).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric == "recall":
            values = hits / positives
        elif metric == "hit":
            values = (hits > 0).astype(np.float64)
        elif metric == "precision":
            values = hits / k
        elif metric == "mrr":
            best = np.full(n, np.inf)
            np.minimum.at(best, targets.row, rank)
            values = np.where(best <= k, 1.0 / best, 0.0)
        elif metric == "ndcg":
            dcg = np.bincount(targets.row, weights=np.where(hit, 1.0 / np.log2(rank + 1), 0.0), minlength=n)
            ideal_sums = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))])
            values = dcg / ideal_sums[np.minimum(positives, k).astype(np.int64)]
        else:
            raise ValueError(f"metric must be one of {USER_METRICS}, got {metric!r}")
    return np.nan_to_num(values, nan=0.0, posinf=0.0)


def paired_p_value(differences: np.ndarray) -> float:
    """One-sided paired t-test p-value for "the mean difference is > 0".

    Fewer than two users: 1 (nothing can be shown). All differences equal: 0 when they are
    positive, else 1 (the t statistic is infinite or undefined there).
    """
    d = np.asarray(differences, dtype=np.float64)
    if len(d) < 2:
        return 1.0
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0 or not math.isfinite(sd):
        return 0.0 if mean > 0 else 1.0
    return float(stats.t.sf(mean / (sd / math.sqrt(len(d))), len(d) - 1))


@dataclass(frozen=True)
class KeepDecision:
    """Whether a round is kept, with the numbers behind it (logged and saved in the round summary)."""

    keep: bool
    gain: float  # mean per-user gain of the metric (positive: the new round is better)
    p_value: float
    users: int
    metric: str
    kept_score: float  # mean per-user metric of the kept model
    new_score: float
    alpha: float
    margin: float
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def keep_round(
    kept: np.ndarray,
    new: np.ndarray,
    alpha: float = DEFAULT_ALPHA,
    margin: float = DEFAULT_MARGIN,
    bigger_is_better: bool = True,
    metric: str = "ndcg@10",
) -> KeepDecision:
    """Keep the new round when its mean per-user gain is above ``margin`` and significant at ``alpha``.

    ``kept`` and ``new`` are the per-user metric of the kept model and of the round's model over
    the same validation users, in the same order.
    """
    kept, new = np.asarray(kept, dtype=np.float64), np.asarray(new, dtype=np.float64)
    if kept.shape != new.shape or kept.ndim != 1:
        raise ValueError(f"per-user scores must pair up: shapes {kept.shape} and {new.shape}")
    if not 0 < alpha <= 1:
        raise ValueError(f"fve_keep_alpha must be in (0, 1], got {alpha}")
    if not margin >= 0:
        raise ValueError(f"fve_keep_margin must be >= 0, got {margin}")
    differences = (new - kept) if bigger_is_better else (kept - new)
    gain = float(differences.mean()) if len(differences) else 0.0
    p_value = paired_p_value(differences)
    numbers = (
        f"{metric} gain {gain:+.4f} over {len(differences)} validation users, "
        f"one-sided paired t-test p = {p_value:.3g}"
    )
    if not gain > margin:
        keep, why = False, f"{numbers}: gain not above the margin {margin:g}"
    elif p_value > alpha:
        keep, why = False, f"{numbers} > alpha {alpha:g}: not significant"
    else:
        keep, why = True, f"{numbers} <= alpha {alpha:g}, gain above the margin {margin:g}"
    return KeepDecision(
        keep=keep, gain=gain, p_value=p_value, users=len(differences), metric=metric,
        kept_score=float(kept.mean()) if len(kept) else 0.0, new_score=float(new.mean()) if len(new) else 0.0,
        alpha=float(alpha), margin=float(margin), reason=why,
    )
