"""FVE step 4: priority and hard-item selection against hand-computed values."""
import math

import numpy as np
import pytest

from reveal_recbole.fve.feedback import RankFeedback
from reveal_recbole.fve.select import (
    OVER_RANKED_NEGATIVE,
    UNDER_RANKED_POSITIVE,
    feedback_type,
    observed_items,
    priority,
    select_hard_items,
)


def feedback(**columns):
    n_items = 4
    names = [
        "hit_count", "avg_pos_rank", "pos_top10_rate", "pos_top20_rate", "wrong_hit_topK",
        "wrong_avg_rank_topK", "wrong_top10_rate", "exposure_count_topK", "avg_exposure_rank_topK",
    ]
    arrays = {name: np.asarray(columns.get(name, [0] * n_items), dtype=float) for name in names}
    return RankFeedback(**arrays, k=10, exposure_k=50, n_rows=10)


# Item 0: no feedback. Item 1: a badly ranked target. Item 2: a well ranked target that is also
# a frequent wrong answer. Item 3: once a wrong answer at rank 10.
STATS = feedback(
    hit_count=[0, 3, 1, 0],
    avg_pos_rank=[0, 20, 5, 0],
    pos_top10_rate=[0, 1 / 3, 1, 0],
    pos_top20_rate=[0, 2 / 3, 1, 0],
    wrong_hit_topK=[0, 0, 2, 1],
    wrong_avg_rank_topK=[0, 0, 3, 10],
    wrong_top10_rate=[0, 0, 1, 1],
    exposure_count_topK=[0, 4, 9, 1],
)


def test_priority_by_hand():
    result = priority(STATS)  # max_rank = largest avg_pos_rank = 20, K = 10
    pos1 = math.log(4) * (20 / 20 + 0.5 * (2 / 3) + 0.5 * (1 / 3))
    pos2 = math.log(2) * (5 / 20)
    neg2 = math.log(3) * (0.5 * (11 - 3) / 10 + 0.5 * 1)
    neg3 = math.log(2) * (0.5 * (11 - 10) / 10 + 0.5 * 1)
    assert result.pos_diff == pytest.approx([0, pos1, pos2, 0])
    assert result.neg_over == pytest.approx([0, 0, neg2, neg3])
    assert result.priority == pytest.approx([
        0,
        math.log(5) * (pos1 / pos1),
        math.log(10) * (pos2 / pos1 + neg2 / neg2),
        math.log(2) * (neg3 / neg2),
    ])


def test_priority_explicit_max_rank_and_k():
    result = priority(STATS, k=5, max_rank=100)
    assert result.pos_diff[1] == pytest.approx(math.log(4) * (0.2 + 0.5))
    assert result.neg_over[2] == pytest.approx(math.log(3) * (0.5 * 3 / 5 + 0.5))
    assert result.neg_over[3] == pytest.approx(math.log(2) * 0.5)  # (5 + 1 - 10) / 5 clipped to 0
    with pytest.raises(ValueError, match="max_rank"):
        priority(STATS, max_rank=0)


def test_priority_guards_zero_maxima():
    only_wrong = feedback(wrong_hit_topK=[0, 2, 0, 0], wrong_avg_rank_topK=[0, 1, 0, 0],
                          wrong_top10_rate=[0, 1, 0, 0], exposure_count_topK=[0, 2, 0, 0])
    result = priority(only_wrong)
    assert np.isfinite(result.priority).all()
    assert result.priority == pytest.approx([0, math.log(3), 0, 0])
    assert priority(feedback()).priority.tolist() == [0, 0, 0, 0]


def test_select_hard_items_takes_the_top_quarter():
    scores = priority(STATS).priority
    candidates = observed_items(STATS)
    assert candidates.tolist() == [False, True, True, True]
    # percentile 75 of [0.267, 1.609, 2.494] is 1.609 + 0.5 * (2.494 - 1.609) = 2.05: only item 2.
    assert select_hard_items(scores, candidates=candidates).tolist() == [2]
    assert select_hard_items(scores, fraction=0.5, candidates=candidates).tolist() == [2, 1]
    assert select_hard_items(scores, fraction=1.0, candidates=candidates).tolist() == [2, 1, 3]


def test_select_hard_items_edge_cases():
    assert select_hard_items(np.array([0.0, 0.0, 0.0, 1.0])).tolist() == [3]  # quantile 0: zeros not taken
    assert select_hard_items(np.zeros(4)).tolist() == []
    assert select_hard_items(np.array([1.0, 2.0]), candidates=np.zeros(2, bool)).tolist() == []
    assert select_hard_items(np.array([2.0, 1.0, 2.0, 2.0])).tolist() == [0, 2, 3]  # ties: all at the threshold
    with pytest.raises(ValueError, match="fraction"):
        select_hard_items(np.ones(3), fraction=0)


def test_feedback_type():
    result = priority(STATS)
    assert feedback_type(result.pos_diff[1], result.neg_over[1]) == UNDER_RANKED_POSITIVE
    assert feedback_type(result.pos_diff[2], result.neg_over[2]) == OVER_RANKED_NEGATIVE
    assert feedback_type(0.0, 0.0) == UNDER_RANKED_POSITIVE
