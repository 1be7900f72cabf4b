"""FVE step 6: per-user validation metrics from target ranks, and the paired keep test."""
import math

import numpy as np
import pytest
from scipy import stats

from reveal_recbole.fve.feedback import TargetRanks
from reveal_recbole.fve.keep import keep_round, paired_p_value, parse_metric, user_metric


def test_user_metric_matches_hand_computation():
    # row 0: one target at rank 3; row 1: targets at ranks 1 and 12; row 2: one target at rank 11
    targets = TargetRanks(row=np.array([0, 1, 1, 2]), rank=np.array([3, 1, 12, 11]), n_rows=3)
    log2 = math.log2
    assert user_metric(targets, "ndcg", 10) == pytest.approx([1 / log2(4), 1 / (1 + 1 / log2(3)), 0])
    assert user_metric(targets, "recall", 10) == pytest.approx([1, 0.5, 0])
    assert user_metric(targets, "hit", 10) == pytest.approx([1, 1, 0])
    assert user_metric(targets, "mrr", 10) == pytest.approx([1 / 3, 1, 0])
    assert user_metric(targets, "precision", 10) == pytest.approx([0.1, 0.1, 0])
    assert user_metric(targets, "ndcg", 12)[1] == pytest.approx((1 + 1 / log2(13)) / (1 + 1 / log2(3)))
    lonely = TargetRanks(row=np.array([1]), rank=np.array([1]), n_rows=2)  # row 0 has no target
    assert user_metric(lonely, "ndcg", 10).tolist() == [0.0, 1.0]


def test_parse_metric():
    assert parse_metric("NDCG@10") == ("ndcg", 10) and parse_metric("mrr@20") == ("mrr", 20)
    for bad in ("AUC", "GAUC@10", "ndcg", "ndcg@0"):
        with pytest.raises(ValueError, match="valid_metric"):
            parse_metric(bad)


def test_p_value_is_the_one_sided_paired_t_test():
    rng = np.random.default_rng(0)
    kept, new = rng.random(50), rng.random(50) + 0.1
    expected = stats.ttest_rel(new, kept, alternative="greater").pvalue
    assert paired_p_value(new - kept) == pytest.approx(expected, rel=1e-9)
    assert paired_p_value(np.full(5, 0.1)) == 0.0 and paired_p_value(np.zeros(5)) == 1.0
    assert paired_p_value(np.array([0.5])) == 1.0 and paired_p_value(np.zeros(0)) == 1.0


def per_user_ndcg(rng, users):
    """NDCG@10-like per-user scores: most users miss the top 10 (0), the others 1 / log2(1 + rank)."""
    ranks = rng.integers(1, 60, users)
    return np.where(ranks <= 10, 1 / np.log2(1 + ranks), 0.0)


def noise_only(rng, kept, share=0.5, scale=0.15):
    """A retrained model that only adds noise: a share of the users move by a zero-mean random amount."""
    moved = rng.random(len(kept)) < share
    return kept + moved * rng.normal(0.0, scale, len(kept))


def test_noise_only_gain_is_discarded_and_a_real_gain_kept():
    rng = np.random.default_rng(7)  # a seed whose noise happens to gain about +0.002, as in issue 12
    kept = per_user_ndcg(rng, 1586)
    noise = noise_only(rng, kept)
    decision = keep_round(kept, noise)
    assert 0.001 < decision.gain < 0.005 and decision.p_value > 0.05 and not decision.keep
    assert "not significant" in decision.reason and "1586 validation users" in decision.reason
    assert keep_round(kept, noise, alpha=1.0).keep  # alpha 1, margin 0: the old rule, any gain

    better = kept.copy()
    lifted = rng.choice(len(kept), 200, replace=False)  # 200 users' targets move up a few ranks
    better[lifted] = np.maximum(better[lifted], 1 / np.log2(1 + rng.integers(1, 4, 200)))
    real = keep_round(kept, better)
    assert real.keep and real.gain > 0.02 and real.p_value < 1e-6 and real.users == 1586
    assert real.kept_score == pytest.approx(kept.mean()) and real.new_score == pytest.approx(better.mean())
    assert not keep_round(kept, better, margin=0.5).keep  # significant, but below the margin
    assert "not above the margin 0.5" in keep_round(kept, better, margin=0.5).reason
    assert not keep_round(better, kept).keep  # a loss is never kept
    assert keep_round(better, kept, bigger_is_better=False).keep  # smaller-better metrics flip the sign


def test_noise_only_rounds_are_kept_at_about_alpha():
    """Over many noise-only rounds the old rule keeps about half, the paired test about alpha."""
    rng = np.random.default_rng(0)
    kept = per_user_ndcg(rng, 1586)
    decisions = [keep_round(kept, noise_only(rng, kept)) for _ in range(400)]
    assert 0.4 < np.mean([d.gain > 0 for d in decisions]) < 0.6
    assert np.mean([d.keep for d in decisions]) < 0.09


def test_keep_round_refuses_unpaired_scores_and_bad_settings():
    with pytest.raises(ValueError, match="pair up"):
        keep_round(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="fve_keep_alpha"):
        keep_round(np.zeros(3), np.zeros(3), alpha=0)
    with pytest.raises(ValueError, match="fve_keep_margin"):
        keep_round(np.zeros(3), np.zeros(3), margin=-0.1)
    same = keep_round(np.ones(4), np.ones(4))
    assert not same.keep and same.gain == 0 and same.p_value == 1.0
