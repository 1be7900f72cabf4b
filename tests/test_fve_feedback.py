"""FVE step 3: rank feedback against a per-user Python reference, and on a RecBole valid loader."""
import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from reveal_recbole.fve.feedback import (
    RankFeedbackAccumulator,
    collect_valid_feedback,
    mask_history,
    rank_feedback,
)
from reveal_recbole.ranking import target_ranks, top_k_items


def reference_feedback(scores, positives, k, exposure_k):
    """Brute force: sort each row by (score desc, item id asc), skip -inf, read ranks off the list."""
    n_items = len(scores[0])
    pos, wrong, shown = defaultdict(list), defaultdict(list), defaultdict(list)
    for row, targets in zip(scores, positives):
        ranked = [j for j in sorted(range(n_items), key=lambda j: (-row[j], j)) if row[j] != -math.inf]
        full = sorted(range(n_items), key=lambda j: (-row[j], j))
        for target in targets:
            pos[target].append(full.index(target) + 1)
        for rank, item in enumerate(ranked[:k], start=1):
            if item not in targets:
                wrong[item].append(rank)
        for rank, item in enumerate(ranked[:exposure_k], start=1):
            shown[item].append(rank)

    def stats(ranks, cut=None):
        if not ranks:
            return 0, 0.0, 0.0
        return len(ranks), float(np.mean(ranks)), float(np.mean([r <= cut for r in ranks])) if cut else 0.0

    expected = {}
    for item in range(n_items):
        hit, avg, top10 = stats(pos[item], 10)
        top20 = stats(pos[item], 20)[2]
        w_hit, w_avg, w_top10 = stats(wrong[item], 10)
        e_count, e_avg, _ = stats(shown[item])
        expected[item] = dict(
            hit_count=hit, avg_pos_rank=avg, pos_top10_rate=top10, pos_top20_rate=top20,
            wrong_hit_topK=w_hit, wrong_avg_rank_topK=w_avg, wrong_top10_rate=w_top10,
            exposure_count_topK=e_count, avg_exposure_rank_topK=e_avg,
        )
    return expected


def random_scores(generator, n_rows, n_items):
    # Few distinct values, so ties are frequent; some items masked as RecBole masks history.
    scores = torch.randint(0, 6, (n_rows, n_items), generator=generator).float()
    scores[torch.rand(n_rows, n_items, generator=generator) < 0.2] = -math.inf
    scores[:, 0] = -math.inf
    return scores


@pytest.mark.parametrize("k, exposure_k", [(10, 50), (3, 5), (5, 3)])
def test_rank_feedback_matches_brute_force_with_ties(k, exposure_k):
    generator = torch.Generator().manual_seed(0)
    n_items = 40
    batches = [random_scores(generator, 7, n_items), random_scores(generator, 5, n_items)]
    targets = [torch.randint(1, n_items, (n,), generator=generator) for n in (7, 5)]
    for scores, target in zip(batches, targets):  # targets are never masked in RecBole's eval
        scores[torch.arange(len(target)), target] = torch.randint(0, 6, (len(target),), generator=generator).float()
    feedback = rank_feedback(batches, targets, k=k, exposure_k=exposure_k)

    rows = torch.cat(batches).tolist()
    expected = reference_feedback(rows, [[t] for t in torch.cat(targets).tolist()], k, exposure_k)
    assert feedback.n_rows == 12 and feedback.n_items == n_items
    for item in range(n_items):
        assert feedback.item(item) == pytest.approx(expected[item]), item
    assert feedback.exposure_count_topK[0] == 0  # masked column never shown


def test_several_positives_per_row_as_recbole_pairs():
    generator = torch.Generator().manual_seed(1)
    scores = random_scores(generator, 4, 25)
    positives = [[3, 7], [5], [1, 2, 24], [9]]
    for row, items in enumerate(positives):
        scores[row, items] = torch.tensor([4.0] * len(items))
    positive_u = torch.tensor([u for u, items in enumerate(positives) for _ in items])
    positive_i = torch.tensor([i for items in positives for i in items])
    accumulator = RankFeedbackAccumulator(25, k=5, exposure_k=8)
    accumulator.update(scores, (positive_u, positive_i))
    feedback = accumulator.result()
    expected = reference_feedback(scores.tolist(), positives, 5, 8)
    for item in range(25):
        assert feedback.item(item) == pytest.approx(expected[item]), item


def test_top_k_items_break_ties_by_item_id():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, -math.inf]])
    items = top_k_items(scores, 4)
    assert items.tolist() == [[1, 2, 4, 3]]
    assert scores.gather(1, items).tolist() == [[3.0, 3.0, 3.0, 2.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_ranking_orders_rows_like_a_sort_by_score_then_id(dtype):
    special = [0.0, -0.0, math.inf, -math.inf, -1e-30, 1e-30, -3.5, 3.5, 2.0 ** 100, -(2.0 ** 100)]
    generator = torch.Generator().manual_seed(2)
    scores = torch.tensor(special * 3)[torch.randperm(30, generator=generator)].repeat(4, 1)
    scores[1:] = torch.randn(3, 30, generator=generator).round(decimals=1)
    scores = scores.to(dtype)
    before = scores.clone()
    rows, items = torch.arange(4).repeat_interleave(30), torch.arange(30).repeat(4)
    ranks = target_ranks(scores, rows, items).view(4, 30)
    for row, row_items, row_ranks in zip(scores.tolist(), top_k_items(scores, 30), ranks):
        expected = sorted(range(30), key=lambda j: (-row[j], j))
        assert row_items.tolist() == expected
        assert row_ranks[expected].tolist() == list(range(1, 31))
    assert torch.equal(scores, before)  # the scores were not changed in place


def test_float64_scores_closer_than_float32_are_not_ties():
    scores = torch.tensor([[1.0, 1.0 + 1e-12, 1.0 - 1e-12, 1.0]], dtype=torch.float64)
    assert top_k_items(scores, 4).tolist() == [[1, 0, 3, 2]]
    assert target_ranks(scores, torch.tensor([0, 0]), torch.tensor([3, 2])).tolist() == [3, 4]


def test_masked_target_ranks_among_the_masked_by_id_and_full_depth():
    scores = torch.tensor([[-math.inf, 2.0, -math.inf, 1.0, -math.inf]])
    assert target_ranks(scores, torch.tensor([0, 0]), torch.tensor([2, 4])).tolist() == [4, 5]
    items = top_k_items(scores, 5)
    assert items.tolist() == [[1, 3, 0, 2, 4]] and scores[0, items[0, :2]].tolist() == [2.0, 1.0]
    feedback = rank_feedback([scores], [torch.tensor([4])], k=3, exposure_k=5)
    assert feedback.avg_pos_rank[4] == 5 and feedback.exposure_count_topK.tolist() == [0, 1, 0, 1, 0]
    assert feedback.wrong_hit_topK.tolist() == [0, 1, 0, 1, 0]


def test_rank_feedback_errors():
    with pytest.raises(ValueError, match="NaN"):
        rank_feedback([torch.tensor([[0.0, float("nan")]])], [torch.tensor([1])])
    with pytest.raises(ValueError, match="at least one batch"):
        rank_feedback([], [])
    with pytest.raises(ValueError, match="different lengths"):
        rank_feedback([torch.zeros(2, 3)], [])
    with pytest.raises(ValueError, match="one target per row"):
        rank_feedback([torch.zeros(2, 3)], [torch.tensor([1])])


def test_mask_history_mirrors_recbole():
    scores = torch.ones(2, 4)
    mask_history(scores, (torch.tensor([0, 1]), torch.tensor([2, 3])))
    assert torch.isinf(scores[:, 0]).all() and scores[0, 2] == -math.inf and scores[1, 3] == -math.inf
    assert scores[0, 1] == 1 and scores[1, 2] == 1


@pytest.fixture(scope="module")
def tiny_sasrec(tmp_path_factory):
    """An untrained tiny SASRec and its RecBole loaders on a generated 12-user, 30-item set."""
    from recbole.config import Config

    from reveal_recbole.pipeline import build_model, prepare_data

    root = tmp_path_factory.mktemp("fve_feedback")
    rng = np.random.default_rng(0)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for user in range(12):
        for t, item in enumerate(rng.choice(30, size=6, replace=False)):
            lines.append(f"u{user}\ti{item}\t{t}")
    (root / "tiny").mkdir()
    (root / "tiny" / "tiny.inter").write_text("\n".join(lines) + "\n")
    config = Config(model="SASRec", dataset="tiny", config_dict={
        "data_path": str(root), "checkpoint_dir": str(root / "saved"), "hidden_size": 8, "inner_size": 16,
        "n_layers": 1, "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 5, "train_neg_sample_args": None,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "metrics": ["Recall", "NDCG"], "topk": [10], "valid_metric": "NDCG@10", "eval_batch_size": 5,
        "show_progress": False, "save_dataset": False, "save_dataloaders": False, "seed": 1, "reproducibility": True,
    })
    _, train_data, valid_data, _ = prepare_data(config)
    return config, build_model(config, train_data), train_data, valid_data


def test_collect_valid_feedback_agrees_with_recbole_recall(tiny_sasrec):
    from recbole.trainer import Trainer

    config, model, train_data, valid_data = tiny_sasrec
    model.train()
    feedback = collect_valid_feedback(model, valid_data, k=10, exposure_k=20)
    assert model.training  # mode restored
    assert feedback.n_rows == 12 and feedback.hit_count.sum() == 12
    assert feedback.exposure_count_topK.sum() == 12 * 20 and feedback.exposure_count_topK[0] == 0
    hits_at_10 = float((feedback.pos_top10_rate * feedback.hit_count).sum())
    recall = Trainer(config, model).evaluate(valid_data, load_best_model=False)["recall@10"]
    assert hits_at_10 / 12 == pytest.approx(recall, abs=1e-4)


def test_collect_valid_feedback_refuses_a_train_loader(tiny_sasrec):
    _, model, train_data, _ = tiny_sasrec
    with pytest.raises(TypeError, match="validation FullSortEvalDataLoader"):
        collect_valid_feedback(model, train_data)


def test_target_ranks_give_recboles_per_user_metrics(tiny_sasrec):
    """The feedback pass keeps every validation user's target rank; their mean NDCG@10 and Recall@10
    are RecBole's (fve.keep tests the per-user values)."""
    from recbole.trainer import Trainer

    from reveal_recbole.fve.keep import user_metric

    config, model, train_data, valid_data = tiny_sasrec
    targets = collect_valid_feedback(model, valid_data).targets
    assert targets.n_rows == len(targets) == 12 and sorted(targets.row.tolist()) == list(range(12))
    users = valid_data._dataset.field2id_token["user_id"][targets.users]
    assert sorted(users.tolist()) == sorted(f"u{u}" for u in range(12))
    assert collect_valid_feedback(model, valid_data).targets.rank.tolist() == targets.rank.tolist()  # same pass
    result = Trainer(config, model).evaluate(valid_data, load_best_model=False)
    assert user_metric(targets, "ndcg", 10).mean() == pytest.approx(result["ndcg@10"], abs=1e-4)
    assert user_metric(targets, "recall", 10).mean() == pytest.approx(result["recall@10"], abs=1e-4)
