"""FVE step 3: per-item ranking feedback from a trained recommender.

REVEAL rewrites the prompts of the items the recommender handles worst, and "worst" is read
from full-ranking results: how an item ranks when it is a user's target, how often it sits
in a user's top K when it is not, and how often it is shown at all. This module computes
those statistics from full-ranking score matrices, batch by batch, with vectorised torch ops.

Ranking convention (also for ties): items are ordered by score, highest first, ties broken
by the lower item id first; ranks are 1-based. Items scored ``-inf`` (RecBole's padding
column and masked history items) are not ranked: they never count as shown or as wrong
answers, even when fewer than K items are left.

The statistics must come from the **validation** split (:func:`collect_valid_feedback`): the
authors' code ranks the test split, which lets the test targets steer which prompts change.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, fields
from typing import Iterable, Tuple, Union

import numpy as np
import torch

# Target ranks are also summarised at these cut-offs (pos_top10_rate, pos_top20_rate), and
# wrong answers at the first one (wrong_top10_rate), whatever K is, as in the paper.
TOP10, TOP20 = 10, 20

Targets = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RankFeedback:
    """Per-item statistics, arrays of shape ``(n_items,)`` indexed by internal item id.

    Averages and rates are 0 for items with no count behind them.
    """

    hit_count: np.ndarray  # times the item was a target
    avg_pos_rank: np.ndarray  # its mean rank as a target
    pos_top10_rate: np.ndarray  # share of those ranks <= 10
    pos_top20_rate: np.ndarray  # share of those ranks <= 20
    wrong_hit_topK: np.ndarray  # times it sat in a top K while not a target of that row
    wrong_avg_rank_topK: np.ndarray  # its mean rank there
    wrong_top10_rate: np.ndarray  # share of those ranks <= 10
    exposure_count_topK: np.ndarray  # times it sat in a top ``exposure_k``
    avg_exposure_rank_topK: np.ndarray  # its mean rank there
    k: int
    exposure_k: int
    n_rows: int  # ranked rows (users, or sequences, of the split)

    @property
    def n_items(self) -> int:
        return len(self.hit_count)

    def item(self, item_id: int) -> dict[str, float]:
        """One item's statistics as plain numbers (for logs and the critic request)."""
        return {
            f.name: float(getattr(self, f.name)[item_id])
            for f in fields(self)
            if isinstance(getattr(self, f.name), np.ndarray)
        }


def _as_pairs(targets: Targets, n_rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row, item)`` pairs from one target per row or RecBole's ``(positive_u, positive_i)``."""
    if isinstance(targets, torch.Tensor):
        if targets.shape != (n_rows,):
            raise ValueError(f"expected one target per row ({n_rows}), got shape {tuple(targets.shape)}")
        return torch.arange(n_rows, device=device), targets.to(device=device, dtype=torch.long)
    rows, items = targets
    return rows.to(device=device, dtype=torch.long), items.to(device=device, dtype=torch.long)


def top_ranked(scores: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` items of each row and their scores, ties broken by the lower item id.

    ``torch.topk`` finds the n-th largest score; every item above it is in, and the items equal
    to it fill the remaining places in id order. Only these ``n`` items are then sorted (stably,
    so equal scores keep id order), which stays cheap for large catalogues.
    """
    n_rows = scores.shape[0]
    threshold = torch.topk(scores, n, dim=1).values[:, -1:]
    above = scores > threshold
    tied = scores == threshold
    places_left = n - above.sum(dim=1, keepdim=True)
    member = above | (tied & (tied.cumsum(dim=1) <= places_left))
    items = member.nonzero()[:, 1].view(n_rows, n)  # row-major, so ascending id within a row
    top_scores = scores.gather(1, items)
    order = torch.sort(top_scores, dim=1, descending=True, stable=True).indices
    return items.gather(1, order), top_scores.gather(1, order)


def target_ranks(scores: torch.Tensor, rows: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """1-based rank of ``items[j]`` in row ``rows[j]``: items scoring higher, plus equal ones of lower id, plus 1."""
    row_scores = scores[rows]
    target_scores = row_scores.gather(1, items.unsqueeze(1))
    ids = torch.arange(scores.shape[1], device=scores.device)
    ahead = (row_scores > target_scores) | ((row_scores == target_scores) & (ids < items.unsqueeze(1)))
    return ahead.sum(dim=1) + 1


class RankFeedbackAccumulator:
    """Accumulates :class:`RankFeedback` over batches of full-ranking scores.

    Counts and rank sums live on the scores' device in float64 (exact for any realistic count),
    so memory is O(n_items) whatever the number of users.
    """

    def __init__(self, n_items: int, k: int = 10, exposure_k: int = 50):
        if k < 1 or exposure_k < 1:
            raise ValueError(f"k and exposure_k must be positive, got k={k}, exposure_k={exposure_k}")
        self.n_items, self.k, self.exposure_k = n_items, k, exposure_k
        self.n_rows = 0
        self._sums: dict[str, torch.Tensor] | None = None

    def _zeros(self, device: torch.device) -> dict[str, torch.Tensor]:
        names = (
            "hit", "pos_rank", "pos_top10", "pos_top20",
            "wrong", "wrong_rank", "wrong_top10", "exposure", "exposure_rank",
        )
        return {name: torch.zeros(self.n_items, dtype=torch.float64, device=device) for name in names}

    def update(self, scores: torch.Tensor, targets: Targets) -> None:
        """Add one batch: ``scores`` is ``(rows, n_items)``; ``targets`` one item id per row, or
        ``(positive_u, positive_i)`` pairs (row index, item id) as RecBole's eval loaders give them."""
        scores = scores.detach()
        if scores.dim() != 2 or scores.shape[1] != self.n_items:
            raise ValueError(f"scores must have shape (rows, {self.n_items}), got {tuple(scores.shape)}")
        if torch.isnan(scores).any():
            raise ValueError("scores contain NaN; rank feedback needs comparable scores")
        if self._sums is None:
            self._sums = self._zeros(scores.device)
        sums, n_rows = self._sums, scores.shape[0]
        rows, items = _as_pairs(targets, n_rows, scores.device)

        ranks = target_ranks(scores, rows, items).double()
        sums["hit"].index_add_(0, items, torch.ones_like(ranks))
        sums["pos_rank"].index_add_(0, items, ranks)
        sums["pos_top10"].index_add_(0, items, (ranks <= TOP10).double())
        sums["pos_top20"].index_add_(0, items, (ranks <= TOP20).double())

        depth = min(max(self.k, self.exposure_k), self.n_items)
        top_items, top_scores = top_ranked(scores, depth)
        positions = torch.arange(1, depth + 1, device=scores.device, dtype=torch.float64).expand(n_rows, depth)
        ranked = top_scores > float("-inf")

        shown = ranked[:, : self.exposure_k]
        shown_items = top_items[:, : self.exposure_k][shown]
        sums["exposure"].index_add_(0, shown_items, torch.ones_like(shown_items, dtype=torch.float64))
        sums["exposure_rank"].index_add_(0, shown_items, positions[:, : self.exposure_k][shown])

        is_target = torch.zeros_like(scores, dtype=torch.bool)
        is_target[rows, items] = True
        head_items = top_items[:, : self.k]
        wrong = ranked[:, : self.k] & ~is_target.gather(1, head_items)
        wrong_positions = positions[:, : self.k][wrong]
        sums["wrong"].index_add_(0, head_items[wrong], torch.ones_like(wrong_positions))
        sums["wrong_rank"].index_add_(0, head_items[wrong], wrong_positions)
        sums["wrong_top10"].index_add_(0, head_items[wrong], (wrong_positions <= TOP10).double())
        self.n_rows += n_rows

    def result(self) -> RankFeedback:
        sums = {name: s.cpu().numpy() for name, s in (self._sums or self._zeros(torch.device("cpu"))).items()}

        def mean(total: str, count: str) -> np.ndarray:
            return np.divide(sums[total], sums[count], out=np.zeros(self.n_items), where=sums[count] > 0)

        return RankFeedback(
            hit_count=sums["hit"].astype(np.int64),
            avg_pos_rank=mean("pos_rank", "hit"),
            pos_top10_rate=mean("pos_top10", "hit"),
            pos_top20_rate=mean("pos_top20", "hit"),
            wrong_hit_topK=sums["wrong"].astype(np.int64),
            wrong_avg_rank_topK=mean("wrong_rank", "wrong"),
            wrong_top10_rate=mean("wrong_top10", "wrong"),
            exposure_count_topK=sums["exposure"].astype(np.int64),
            avg_exposure_rank_topK=mean("exposure_rank", "exposure"),
            k=self.k,
            exposure_k=self.exposure_k,
            n_rows=self.n_rows,
        )


def rank_feedback(
    score_batches: Iterable[torch.Tensor], targets: Iterable[Targets], k: int = 10, exposure_k: int = 50
) -> RankFeedback:
    """Per-item feedback from batches of full-ranking scores and their targets (zipped in order).

    Scores already carry ``-inf`` where items must not be recommended (see the module docstring).
    """
    accumulator, end = None, object()
    for scores, batch_targets in itertools.zip_longest(score_batches, targets, fillvalue=end):
        if scores is end or batch_targets is end:
            raise ValueError("score_batches and targets have different lengths")
        if accumulator is None:
            accumulator = RankFeedbackAccumulator(scores.shape[1], k, exposure_k)
        accumulator.update(scores, batch_targets)
    if accumulator is None:
        raise ValueError("rank_feedback needs at least one batch of scores")
    return accumulator.result()


def mask_history(scores: torch.Tensor, history_index: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """RecBole's full-sort masking, in place: the padding item 0 and already-seen items get ``-inf``.

    Mirrors ``recbole.trainer.Trainer._full_sort_batch_eval`` so the feedback ranks exactly the
    lists RecBole's metrics score (sequential loaders give ``history_index=None``).
    """
    scores[:, 0] = float("-inf")
    if history_index is not None:
        scores[history_index] = float("-inf")
    return scores


@torch.no_grad()
def collect_valid_feedback(
    model: torch.nn.Module, valid_data, k: int = 10, exposure_k: int = 50, show_progress: bool = False
) -> RankFeedback:
    """Rank every item for every row of the **validation** loader and return the feedback.

    ``valid_data`` must be the validation ``FullSortEvalDataLoader`` of ``data_preparation``.
    It is a parameter, never derived from a config, so the caller states which split steers
    FVE; pass the test loader and the test targets would choose the prompts to rewrite (the
    leak in the authors' code). Scores come from ``model.full_sort_predict``, masked as RecBole
    masks them for its metrics (:func:`mask_history`). The model's train/eval mode is restored.
    """
    from recbole.data.dataloader import FullSortEvalDataLoader
    from tqdm import tqdm

    if not isinstance(valid_data, FullSortEvalDataLoader):
        raise TypeError(
            f"collect_valid_feedback needs the validation FullSortEvalDataLoader (eval_args mode 'full'), "
            f"got {type(valid_data).__name__}"
        )
    device = next(model.parameters()).device
    accumulator = RankFeedbackAccumulator(valid_data._dataset.item_num, k, exposure_k)
    was_training = model.training
    model.eval()
    try:
        for interaction, history_index, positive_u, positive_i in tqdm(
            valid_data, desc="rank feedback (valid)", disable=not show_progress
        ):
            scores = model.full_sort_predict(interaction.to(device)).view(-1, accumulator.n_items)
            accumulator.update(mask_history(scores, history_index), (positive_u, positive_i))
    finally:
        model.train(was_training)
    return accumulator.result()
