"""FVE step 4: which items' prompts to rewrite, and why.

An item earns a rewrite when it is often shown (exposure) and either ranks badly when users
want it (``pos_diff``) or crowds users' top K when they want something else (``neg_over``):

    pos_diff = log(1 + hit_count) * (avg_pos_rank / max_rank
                                     + 0.5 * (1 - pos_top10_rate) + 0.5 * (1 - pos_top20_rate))
    neg_over = log(1 + wrong_hit_topK) * (0.5 * clip((K + 1 - wrong_avg_rank_topK) / K, 0, 1)
                                          + 0.5 * wrong_top10_rate)
    priority = log(1 + exposure_count_topK) * (pos_diff / max(pos_diff) + neg_over / max(neg_over))

A term whose maximum over items is 0 contributes 0. The items at or above the 75th percentile
of priority (the top 25 %) are selected, as in the authors' code.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reveal_recbole.fve.feedback import RankFeedback

UNDER_RANKED_POSITIVE = "under-ranked positive"
OVER_RANKED_NEGATIVE = "over-ranked negative"
# The authors' fallback for max_rank when no item was ever a target.
DEFAULT_MAX_RANK = 100.0


@dataclass
class ItemPriority:
    """Arrays of shape ``(n_items,)``: the two difficulty terms and the resulting priority."""

    pos_diff: np.ndarray
    neg_over: np.ndarray
    priority: np.ndarray


def pos_diff(stats: RankFeedback, max_rank: float | None = None) -> np.ndarray:
    """Difficulty as a target; ``max_rank=None`` uses the largest ``avg_pos_rank`` (the authors' choice),
    so the rank term lies in [0, 1]."""
    if max_rank is None:
        max_rank = float(stats.avg_pos_rank.max(initial=0.0)) or DEFAULT_MAX_RANK
    if max_rank <= 0:
        raise ValueError(f"max_rank must be positive, got {max_rank}")
    difficulty = stats.avg_pos_rank / max_rank + 0.5 * (1 - stats.pos_top10_rate) + 0.5 * (1 - stats.pos_top20_rate)
    return np.log1p(stats.hit_count) * difficulty  # 0 for items never a target


def neg_over(stats: RankFeedback, k: int | None = None) -> np.ndarray:
    """Over-exposure as a wrong answer in the top ``k`` (default: the K the statistics used)."""
    k = stats.k if k is None else k
    danger = np.clip((k + 1 - stats.wrong_avg_rank_topK) / k, 0.0, 1.0)
    return np.log1p(stats.wrong_hit_topK) * (0.5 * danger + 0.5 * stats.wrong_top10_rate)  # 0 if never wrong


def _share_of_max(values: np.ndarray) -> np.ndarray:
    top = values.max(initial=0.0)
    return values / top if top > 0 else np.zeros_like(values)


def priority(stats: RankFeedback, k: int | None = None, max_rank: float | None = None) -> ItemPriority:
    """The priority of every item, with the ``pos_diff`` and ``neg_over`` terms behind it."""
    positive, negative = pos_diff(stats, max_rank), neg_over(stats, k)
    score = np.log1p(stats.exposure_count_topK) * (_share_of_max(positive) + _share_of_max(negative))
    return ItemPriority(pos_diff=positive, neg_over=negative, priority=score)


def observed_items(stats: RankFeedback) -> np.ndarray:
    """Items with any feedback (a target, or shown in some top list): the population the authors'
    percentile is taken over. Never-seen items (the padding id 0 included) are not candidates."""
    return (stats.hit_count > 0) | (stats.exposure_count_topK > 0) | (stats.wrong_hit_topK > 0)


def select_hard_items(
    priority: np.ndarray, fraction: float = 0.25, candidates: np.ndarray | None = None
) -> np.ndarray:
    """Ids of the candidates at or above the ``1 - fraction`` quantile of their priority, highest first.

    The quantile is numpy's linear-interpolation percentile over the candidates (default: all
    items). Items of priority 0 are never selected: when most priorities are 0 the quantile is
    0 too, and "at or above" would otherwise select items with nothing to fix.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    priority = np.asarray(priority, dtype=np.float64)
    eligible = np.ones(len(priority), dtype=bool) if candidates is None else np.asarray(candidates, dtype=bool)
    if not eligible.any():
        return np.empty(0, dtype=np.int64)
    threshold = np.percentile(priority[eligible], 100 * (1 - fraction))
    chosen = np.flatnonzero(eligible & (priority >= threshold) & (priority > 0))
    return chosen[np.lexsort((chosen, -priority[chosen]))]


def feedback_type(pos_diff: float, neg_over: float) -> str:
    """Which failure the critic should fix: the paper's tie rule favours the positive side."""
    return UNDER_RANKED_POSITIVE if pos_diff >= neg_over else OVER_RANKED_NEGATIVE
