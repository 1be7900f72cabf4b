"""FVE step 3: per-item ranking feedback from a trained recommender.

REVEAL rewrites the prompts of the items the recommender handles worst, and "worst" is read
from full-ranking results: how an item ranks when it is a user's target, how often it sits
in a user's top K when it is not, and how often it is shown at all. This module computes
those statistics from full-ranking score matrices, batch by batch: targets' ranks and the top
lists come from :mod:`reveal_recbole.ranking` on the scores' device (its convention: by score,
ties to the lower item id, 1-based), and only those ``(rows,)`` and ``(rows, K)`` results reach
numpy. Items scored ``-inf`` (RecBole's padding column and masked history items) are not
ranked: they never count as shown or as wrong answers, even when fewer than K items are left.

The statistics must come from the **validation** split (:func:`collect_valid_feedback`): the
authors' code ranks the test split, which lets the test targets steer which prompts change.
The same pass also keeps each target's rank by row (:class:`TargetRanks`), from which
``fve.keep`` scores every validation user to decide whether a round's gain is real.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, fields
from typing import Iterable, Tuple, Union

import numpy as np
import torch

from reveal_recbole.ranking import target_ranks, top_k_items

# Target ranks are also summarised at these cut-offs (pos_top10_rate, pos_top20_rate), and
# wrong answers at the first one (wrong_top10_rate), whatever K is, as in the paper.
TOP10, TOP20 = 10, 20

Targets = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TargetRanks:
    """Every target's 1-based rank, by ranked row (a validation user): what per-user metrics need."""

    row: np.ndarray  # int64, the row (0-based, in loader order) each target belongs to
    rank: np.ndarray  # int64, its rank in that row
    n_rows: int
    users: np.ndarray | None = None  # (n_rows,) the row's user id, when the loader gives it

    def __len__(self) -> int:
        return len(self.rank)


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
    targets: TargetRanks | None = None  # per-row target ranks (not an item statistic)

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


class RankFeedbackAccumulator:
    """Accumulates :class:`RankFeedback` over batches of full-ranking scores.

    Counts and rank sums are float64 numpy arrays (exact for any realistic count), so host memory
    is O(n_items) plus two integers per target (its row and rank, for per-user metrics); a batch
    needs a few boolean temporaries of its size on its device.
    """

    NAMES = (
        "hit", "pos_rank", "pos_top10", "pos_top20",
        "wrong", "wrong_rank", "wrong_top10", "exposure", "exposure_rank",
    )

    def __init__(self, n_items: int, k: int = 10, exposure_k: int = 50):
        if k < 1 or exposure_k < 1:
            raise ValueError(f"k and exposure_k must be positive, got k={k}, exposure_k={exposure_k}")
        self.n_items, self.k, self.exposure_k = n_items, k, exposure_k
        self.n_rows = 0
        self._sums = {name: np.zeros(n_items) for name in self.NAMES}
        self._target_rows: list[np.ndarray] = []
        self._target_ranks: list[np.ndarray] = []
        self._users: list[np.ndarray] = []

    def _add(self, name: str, items: np.ndarray, weights: np.ndarray) -> None:
        self._sums[name] += np.bincount(items.ravel(), weights.ravel(), minlength=self.n_items)

    def update(self, scores: torch.Tensor, targets: Targets, users: torch.Tensor | None = None) -> None:
        """Add one batch: ``scores`` is ``(rows, n_items)``; ``targets`` one item id per row, or
        ``(positive_u, positive_i)`` pairs (row index, item id) as RecBole's eval loaders give them;
        ``users`` (optional) the user id of each row, kept with the target ranks."""
        if scores.dim() != 2 or scores.shape[1] != self.n_items:
            raise ValueError(f"scores must have shape (rows, {self.n_items}), got {tuple(scores.shape)}")
        n_rows = scores.shape[0]
        rows, items = _as_pairs(targets, n_rows, scores.device)
        row_ranks = target_ranks(scores, rows, items).cpu().numpy()
        rows, items = rows.cpu().numpy(), items.cpu().numpy()
        self._target_rows.append(rows + self.n_rows)
        self._target_ranks.append(row_ranks)
        if users is not None:
            self._users.append(users.detach().cpu().numpy().astype(np.int64).reshape(n_rows))
        ranks = row_ranks.astype(np.float64)
        self._add("hit", items, np.ones_like(ranks))
        self._add("pos_rank", items, ranks)
        self._add("pos_top10", items, ranks <= TOP10)
        self._add("pos_top20", items, ranks <= TOP20)

        # Items of the top lists count with weight 0 where they are not ranked (-inf).
        top = top_k_items(scores, max(self.k, self.exposure_k))
        ranked = (scores.gather(1, top) > float("-inf")).cpu().numpy().astype(np.float64)
        top_items, depth = top.cpu().numpy(), top.shape[1]
        positions = np.arange(1, depth + 1, dtype=np.float64)

        shown_items, shown = top_items[:, : self.exposure_k], ranked[:, : self.exposure_k]
        self._add("exposure", shown_items, shown)
        self._add("exposure_rank", shown_items, shown * positions[: self.exposure_k])

        head_items = top_items[:, : self.k]
        is_target = np.zeros(head_items.shape, dtype=bool)
        pair, column = np.nonzero(head_items[rows] == items[:, None])
        is_target[rows[pair], column] = True
        wrong, head_positions = ranked[:, : self.k] * ~is_target, positions[: self.k]
        self._add("wrong", head_items, wrong)
        self._add("wrong_rank", head_items, wrong * head_positions)
        self._add("wrong_top10", head_items, wrong * (head_positions <= TOP10))
        self.n_rows += n_rows

    def result(self) -> RankFeedback:
        sums = self._sums

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
            targets=self.target_ranks(),
        )

    def target_ranks(self) -> TargetRanks:
        """Every target's rank so far, by row (row numbers count across batches)."""
        empty = np.zeros(0, dtype=np.int64)
        users = np.concatenate(self._users) if self._users else None
        if users is not None and len(users) != self.n_rows:  # some batches came without user ids
            users = None
        return TargetRanks(
            row=np.concatenate(self._target_rows) if self._target_rows else empty,
            rank=np.concatenate(self._target_ranks) if self._target_ranks else empty,
            n_rows=self.n_rows,
            users=users,
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
    The result's ``targets`` holds each row's target ranks and user id (for ``fve.keep``).
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
    uid_field = valid_data._dataset.uid_field
    was_training = model.training
    model.eval()
    try:
        for interaction, history_index, positive_u, positive_i in tqdm(
            valid_data, desc="rank feedback (valid)", disable=not show_progress
        ):
            scores = model.full_sort_predict(interaction.to(device)).view(-1, accumulator.n_items)
            users = interaction[uid_field] if uid_field in interaction else None
            accumulator.update(mask_history(scores, history_index), (positive_u, positive_i), users)
    finally:
        model.train(was_training)
    return accumulator.result()
