"""Full ranking at catalogue scale: target ranks and top-K lists on the scores' device, and the
evaluation batch that keeps a ``(users, n_items)`` score matrix within a memory budget.

Ranking convention (ties too): items are ordered by score, highest first, equal scores by the
lower item id first; ranks are 1-based. RecBole's Recall@K and NDCG@K read positions off
``torch.topk`` (``recbole.evaluator.collector``), whose order among equal scores torch leaves
unspecified; its only tie-aware rank, ``_average_rank`` (GAUC), averages tied positions. Lower
id first is the deterministic choice that agrees with RecBole wherever its order is defined;
trained float scores rarely tie, except the ``-inf`` of masked items, which rank after every
scored item under any rule.

Ranks are two comparison-and-count passes over the batch (no sort), lists one ``torch.topk``:
only B-length ranks and ``(B, K)`` lists leave the device, never the score matrix. The buckets
(``target_buckets``) and FVE's ranking feedback (``fve.feedback``) both rank with these.
"""
from __future__ import annotations

from logging import getLogger

import numpy as np
import torch
from recbole.utils import ModelType

from reveal_recbole.config import user_given

SCORE_BYTES = 4  # RecBole's full-sort scores are float32


def _check_comparable(scores: torch.Tensor) -> None:
    if scores.numel() and torch.isnan(scores.max()):  # max propagates NaN: one reduction, no temporary
        raise ValueError("scores contain NaN; ranking needs comparable scores")


def _count_true(mask: torch.Tensor) -> torch.Tensor:
    """True entries per row. On the CPU numpy counts (torch's bool sum widens every entry to int64,
    several times slower); elsewhere torch sums on the device."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.count_nonzero(mask.numpy(), axis=1))
    return mask.sum(1)


def target_ranks(scores: torch.Tensor, rows: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """1-based rank of ``items[j]`` in row ``rows[j]``: items scoring higher, plus equal ones of lower id, plus 1.

    ``rows`` may repeat a row (several positives per user, RecBole's ``positive_u``). The result
    lies on the scores' device; the work is two ``(len(rows), n_items)`` comparisons and counts,
    and a third only for the rows where another item ties with the target.
    """
    _check_comparable(scores)
    rows = rows.to(device=scores.device, dtype=torch.long)
    items = items.to(device=scores.device, dtype=torch.long)
    one_per_row = torch.equal(rows, torch.arange(len(scores), device=scores.device))
    row_scores = scores if one_per_row else scores.index_select(0, rows)
    target = scores[rows, items].unsqueeze(1)
    ranks = 1 + _count_true(row_scores > target).to(scores.device)
    tied = (_count_true(row_scores == target) > 1).nonzero().squeeze(1)  # the target equals itself
    if len(tied):
        lower_id = torch.arange(scores.shape[1], device=scores.device) < items[tied].unsqueeze(1)
        ranks[tied] += _count_true((row_scores[tied] == target[tied]) & lower_id).to(scores.device)
    return ranks


def top_k_items(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's first ``min(k, n_items)`` item ids in rank order, ``(rows, k)`` on the scores' device.

    ``torch.topk`` finds the k highest scores but may take any of the items tied with the k-th one,
    in any order. The list is put in (score, lower id) order, and the rows where a tied item was
    left out (ties at the cut: rare, e.g. fewer than k unmasked items) take the lowest tied ids.
    """
    _check_comparable(scores)
    k = min(k, scores.shape[1])
    values, items = torch.topk(scores, k, dim=1)
    cut = values[:, -1:]
    ties_left_out = _count_true(scores == cut).to(scores.device) > (values == cut).sum(1)
    if ties_left_out.any():
        rows = ties_left_out.nonzero().squeeze(1)
        row_scores, row_cut = scores[rows], cut[rows]
        above, tied = row_scores > row_cut, row_scores == row_cut
        room = k - _count_true(above).to(scores.device).unsqueeze(1)
        kept = above | (tied & (tied.cumsum(1) <= room))
        items[rows] = kept.nonzero()[:, 1].view(-1, k)  # k per row, in id order
    items = items.sort(dim=1).values
    order = scores.gather(1, items).argsort(dim=1, descending=True, stable=True)
    return items.gather(1, order)


def size_eval_batch(config, n_items: int, score_buffers: int = 1) -> None:
    """Cap ``eval_batch_size`` so a full-sort batch's scores fit ``eval_score_budget_mb``, unless the user set it.

    RecBole's full ranking scores ``eval_batch_size`` users at once for a sequential model (one row
    per user, ``FullSortEvalDataLoader``): ``overall.yaml``'s 4096 users x 1M items is 16 GB of
    float32. ``score_buffers``: how many ``(users, items)`` float32 matrices the model's
    ``full_sort_predict`` holds at once (a model's ``eval_score_buffers``: 1 for a plain product,
    more for the peers that mix several score matrices). A general model's loader already takes
    ``eval_batch_size // n_items`` users, so only sequential models are capped. One log line says
    what was chosen and why.
    """
    if config["MODEL_TYPE"] != ModelType.SEQUENTIAL or config["eval_score_budget_mb"] is None:
        return
    rows = config["eval_batch_size"]
    row_bytes = SCORE_BYTES * n_items * score_buffers
    budget_rows = max(1, int(config["eval_score_budget_mb"] * 2**20) // row_bytes)
    if rows <= budget_rows:
        return
    budget, scores_gb = config["eval_score_budget_mb"], rows * row_bytes / 2**30
    held = "" if score_buffers == 1 else f" ({score_buffers} score matrices held at once by {config['model']})"
    if "eval_batch_size" in user_given(config):
        getLogger().warning(
            f"eval_batch_size {rows} (set by you) scores {rows} users x {n_items:,} items at once: {scores_gb:.1f} GB "
            f"of float32 per evaluation batch{held} (eval_score_budget_mb {budget} would take {budget_rows})"
        )
        return
    config["eval_batch_size"] = budget_rows
    getLogger().info(
        f"eval_batch_size {budget_rows} (sized to the catalogue: {rows} users x {n_items:,} items would be "
        f"{scores_gb:.1f} GB of float32 scores per evaluation batch{held}, over eval_score_budget_mb {budget}; "
        "set eval_batch_size to choose)"
    )
