"""Cold-start items (issue 15): the hold-out, the per-target buckets and the encoder's cold_items option."""
import logging

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reveal_recbole import run_reveal
from reveal_recbole.config import Config
from reveal_recbole.data.cold_start import (
    choose_cold_items,
    hold_out_cold_items,
    hold_out_interactions,
    training_item_counts,
)
from reveal_recbole.errors import ConfigError
from reveal_recbole.model import REVEALItemEncoder
from reveal_recbole.pipeline import build_model, prepare_data
from reveal_recbole.target_buckets import bucket_metrics, target_buckets

from conftest import REPORT_METRICS, random_features

COLD = 3, 6


def test_hold_out_keeps_cold_items_only_as_evaluation_targets():
    """Rows by user, time; cold items 3 and 6. RecBole's leave-one-out of n interactions: the last
    min(2, n - 2) are targets (test last), the rest training (n = 3: no validation; n = 2: none)."""
    rows = [  # user, item, time
        # 3 is training: dropped; 6 is the test target
        (1, 1, 0), (1, 2, 1), (1, 3, 2), (1, 4, 3), (1, 5, 4), (1, 6, 5),
        (2, 1, 0), (2, 3, 1), (2, 2, 2), (2, 4, 3), (2, 3, 4), (2, 6, 5),  # valid 3 and test 6 stay, the first 3 goes
        (3, 2, 0), (3, 3, 1), (3, 5, 2), (3, 6, 3),  # left [2, 5, 6]: 6 is the test target, no validation
        (4, 1, 0), (4, 3, 1), (4, 6, 2),  # [1, 3, 6] has 3 at a training place, then [1, 6] has 6 there: [1]
        (5, 6, 0), (5, 1, 1),  # the cold item comes first: training, dropped
    ]
    users, items, times = map(np.array, zip(*rows))
    order = np.random.default_rng(0).permutation(len(rows))  # any row order
    split = hold_out_interactions(users[order], items[order], times[order], COLD)
    kept = sorted(zip(users[order][split.keep], times[order][split.keep], items[order][split.keep]))
    by_user = {u: [i for v, _, i in kept if v == u] for u in range(1, 6)}
    assert by_user == {1: [1, 2, 4, 5, 6], 2: [1, 2, 4, 3, 6], 3: [2, 5, 6], 4: [1], 5: [1]}
    assert (split.cold_test_targets, split.cold_valid_targets, split.test_targets) == (3, 1, 3)
    assert split.dropped == 6 and list(split.cold_items) == [3, 6]


def test_time_ties_keep_file_order_as_recbole_does():
    # items with equal times keep their file order: 3 then 6 at time 1 are the validation and test targets...
    split = hold_out_interactions(np.array([1, 1, 1, 1, 1]), np.array([1, 2, 4, 3, 6]), np.array([0, 0, 0, 1, 1]), COLD)
    assert split.keep.tolist() == [True, True, True, True, True]
    # ...and 3, 4, 6 at time 1 make 3 a training interaction
    split = hold_out_interactions(np.array([1, 1, 1, 1, 1]), np.array([1, 2, 3, 4, 6]), np.array([0, 0, 1, 1, 1]), COLD)
    assert split.keep.tolist() == [True, True, False, True, True]


def test_cold_items_are_drawn_from_the_seed():
    items = np.arange(1, 101)
    first = choose_cold_items(items, 0.2, seed=2020)
    assert len(first) == 20 and set(first) <= set(items)
    assert np.array_equal(first, choose_cold_items(items[::-1], 0.2, seed=2020))  # order of the input is irrelevant
    assert not np.array_equal(first, choose_cold_items(items, 0.2, seed=2021))


@pytest.mark.parametrize("share", [-0.1, 1.0, 1.5, "a fifth", True])
def test_a_share_outside_0_1_is_a_config_error(tiny_config, share):
    config = Config(model="SASRec", dataset="scientific", config_dict=tiny_config | {"cold_item_share": share})
    with pytest.raises(ConfigError, match=r"cold_item_share must be a number in \[0, 1\)"):
        prepare_data(config)


class FrameDataset:
    """The part of a RecBole dataset the hold-out reads, before RecBole's split."""

    uid_field, iid_field, time_field = "user_id", "item_id", "timestamp"

    def __init__(self, rows):
        self.inter_feat = pd.DataFrame(rows, columns=[self.uid_field, self.iid_field, self.time_field])


def frame_config(share, split="valid_and_test", seed=0):
    return {"cold_item_share": share, "seed": seed, "dataset": "hand", "benchmark_filename": None,
            "eval_args": {"split": {"LS": split}, "order": "TO"}}


def test_a_split_that_leaves_no_cold_target_is_a_config_error():
    # item 5 is only ever a first interaction: holding it out leaves nothing cold to test
    rows = [(u, 5 if u == 1 else 1, 0) for u in range(1, 3)]
    rows += [(u, i, t) for u in range(1, 3) for t, i in enumerate((2, 3, 4), 1)]
    dataset = FrameDataset(rows)
    with pytest.raises(ConfigError, match="no cold target"):
        hold_out_cold_items(dataset, frame_config(0.2, seed=_seed_choosing(5, dataset)))
    with pytest.raises(ConfigError, match="holds out no item"):
        hold_out_cold_items(dataset, frame_config(0.01))
    with pytest.raises(ConfigError, match="leave-one-out"):
        random_split = {"eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO"}}
        hold_out_cold_items(dataset, frame_config(0.2) | random_split)
    assert hold_out_cold_items(dataset, frame_config(0.0)) is None and len(dataset.inter_feat) == len(rows)


def _seed_choosing(item: int, dataset) -> int:
    items = dataset.inter_feat["item_id"].to_numpy()
    return next(s for s in range(100) if list(choose_cold_items(items, 0.2, s)) == [item])


@pytest.fixture
def cold_config(tiny_config):
    return tiny_config | {"cold_item_share": 0.3, "learning_rate": 0.01, "epochs": 15, "visual_utilisation": False}


def test_cold_items_never_reach_the_training_split(cold_config):
    config = Config(model="SASRec", dataset="scientific", config_dict=cold_config)
    dataset, train_data, _, test_data = prepare_data(config)
    train = train_data._dataset.inter_feat
    cold = choose_cold_items(np.arange(1, dataset.item_num), 0.3, config["seed"])
    seen = torch.cat([train["item_id"], train["item_id_list"].flatten()]).numpy()
    assert not np.isin(seen, cold).any()
    assert np.isin(test_data._dataset.inter_feat["item_id"].numpy(), cold).sum() > 0
    counts = training_item_counts(train_data._dataset)
    assert set(np.flatnonzero(counts[1:] == 0) + 1) >= set(cold)

    plain = Config(model="SASRec", dataset="scientific", config_dict=cold_config | {"cold_item_share": 0.0})
    _, _, _, plain_test = prepare_data(plain)

    def user_item_pairs(loader):
        columns = [loader._dataset.inter_feat[f] for f in ("user_id", "item_id")]
        return {tuple(p) for p in torch.stack(columns, 1).tolist()}

    pairs, cold_pairs = user_item_pairs(plain_test), user_item_pairs(test_data)
    # each user's last interaction stays its test target
    assert cold_pairs <= pairs and len(cold_pairs) >= 0.95 * len(pairs)


def test_buckets_split_warm_targets_by_training_count():
    counts = np.array([0, 0, 1, 1, 2, 5, 9, 20])
    buckets = target_buckets(counts, np.array([1, 2, 3, 4, 5, 6, 7, 1]))
    assert buckets["cold"].tolist() == [True, False, False, False, False, False, False, True]
    assert buckets["tail"].sum() + buckets["torso"].sum() + buckets["head"].sum() == buckets["warm"].sum() == 6
    assert buckets["head"].tolist() == [False, False, False, False, False, True, True, False]
    metrics = bucket_metrics(np.array([1, 3, 30, 2, 10, 11, 1, 50]), buckets, topk=(10, 20))
    assert metrics["cold"] == {"n": 2, "recall@10": 0.5, "ndcg@10": 0.5, "recall@20": 0.5, "ndcg@20": 0.5}
    assert metrics["all"]["ndcg@10"] == pytest.approx((1 + 1 / np.log2(4) + 1 / np.log2(3) + 1 / np.log2(11) + 1) / 8)
    empty = bucket_metrics(np.array([1]), {"cold": np.array([False])})
    assert empty["cold"] == {"n": 0, "recall@10": None, "ndcg@10": None, "recall@20": None, "ndcg@20": None}


def test_baseline_buckets_agree_with_recbole_and_cold_targets_score_0(cold_config, caplog):
    with caplog.at_level(logging.WARNING):
        result = run_reveal("SASRec", "scientific", config_dict=cold_config, saved=False)
    buckets = result["buckets"]
    for metric in REPORT_METRICS:
        assert round(buckets["all"][metric], 4) == result["test_result"][metric], metric
    assert buckets["cold"]["n"] > 0 and buckets["warm"]["n"] + buckets["cold"]["n"] == buckets["all"]["n"]
    assert buckets["cold"]["ndcg@10"] == 0.0 and buckets["cold"]["recall@20"] == 0.0
    assert "SASRec scores items without features" in caplog.text


TRAINING_COUNTS = torch.tensor([-1, 3, 0, 2, 1, 0, 4, 5])  # row 0 is padding; items 2 and 5 are cold
COLD_ROWS, WARM_ROWS = [2, 5], [1, 3, 4, 6, 7]


def cold_encoder(cold_items="features", fusion="sum", modalities=("image", "text"), **kwargs):
    torch.manual_seed(0)
    features = {"image": random_features(8, 6, seed=1), "text": random_features(8, 5, seed=2)}
    return REVEALItemEncoder(nn.Embedding(8, 4, padding_idx=0), {m: features[m] for m in modalities}, fusion=fusion,
                             training_counts=TRAINING_COUNTS, cold_items=cold_items, **kwargs)


def feature_parts(encoder) -> list[torch.Tensor]:
    with torch.no_grad():
        return [encoder.projections[m](encoder.modality_input(m)) for m in encoder.modalities]


@pytest.mark.parametrize("fusion", ["sum", "gated"])
def test_features_mode_gives_cold_items_their_features_alone_at_evaluation(fusion):
    encoder = cold_encoder(fusion=fusion).eval()
    table, parts = encoder.weight, feature_parts(encoder)
    if fusion == "sum":
        torch.testing.assert_close(table[COLD_ROWS], (parts[0] + parts[1])[COLD_ROWS])
        torch.testing.assert_close(table[WARM_ROWS], (encoder.id_embedding.weight + parts[0] + parts[1])[WARM_ROWS])
    else:  # gated: the ID part is left out of the softmax, not weighed in as a zero
        with torch.no_grad():
            logits = torch.cat([encoder.gate_heads[n](p) for n, p in zip(encoder.modalities, parts)], -1)
            expected = (torch.stack(parts, -1) * torch.softmax(logits, -1).unsqueeze(-2)).sum(-1)
        torch.testing.assert_close(table[COLD_ROWS], expected[COLD_ROWS])


def test_cold_items_are_out_of_training_and_keep_their_loaded_features():
    encoder = cold_encoder().train()
    loaded = {m: encoder.feature_tables[m].detach().clone() for m in encoder.modalities}
    table = encoder.weight
    assert torch.count_nonzero(table[COLD_ROWS]) == 0 and torch.count_nonzero(table[0]) == 0
    assert torch.count_nonzero(table[WARM_ROWS].abs().sum(1)) == len(WARM_ROWS)
    (table * torch.randn_like(table)).sum().backward()
    torch.optim.SGD(encoder.parameters(), lr=1.0).step()
    assert torch.count_nonzero(encoder.id_embedding.weight.grad[COLD_ROWS]) == 0
    for modality in encoder.modalities:
        grad = encoder.feature_tables[modality].grad
        assert torch.count_nonzero(grad[COLD_ROWS]) == 0 and torch.count_nonzero(grad[WARM_ROWS]) > 0
        torch.testing.assert_close(encoder.modality_input(modality)[COLD_ROWS], loaded[modality][COLD_ROWS])


@pytest.mark.parametrize("k", [1, 2])
def test_neighbour_mode_lends_the_nearest_warm_items_id(k):
    encoder = cold_encoder("neighbour", cold_item_neighbours=k).eval()
    parts, ids = feature_parts(encoder), encoder.id_embedding.weight.detach()
    features_only = F.normalize(parts[0] + parts[1], dim=1)
    similarity = features_only[COLD_ROWS] @ features_only[WARM_ROWS].T
    nearest = torch.tensor(WARM_ROWS)[similarity.topk(k, dim=1).indices]  # (cold, k)
    lent = ids[nearest].mean(1)
    torch.testing.assert_close(encoder.weight[COLD_ROWS], lent + (parts[0] + parts[1])[COLD_ROWS])
    torch.testing.assert_close(encoder.weight[WARM_ROWS], (ids + parts[0] + parts[1])[WARM_ROWS])
    assert torch.count_nonzero(encoder.train().weight[COLD_ROWS]) == 0  # training: still out of the catalogue


def test_neighbour_mode_lends_the_feature_fine_tuning_of_the_nearest_warm_items():
    encoder = cold_encoder("neighbour").eval()
    loaded = encoder.feature_tables["image"].detach().clone()
    with torch.no_grad():  # as if training had fine-tuned the warm rows
        encoder.feature_tables["image"][WARM_ROWS] += torch.arange(len(WARM_ROWS)).unsqueeze(1) * 0.5
    neighbours = torch.tensor([[1, 3], [6, 7]])  # for cold items 2 and 5
    lent = encoder.modality_input("image", neighbours)[COLD_ROWS]
    torch.testing.assert_close(lent, loaded[COLD_ROWS] + torch.tensor([[0.25], [1.75]]))
    torch.testing.assert_close(encoder.modality_input("image")[COLD_ROWS], loaded[COLD_ROWS])  # its own: as loaded


def test_cold_item_settings_are_checked():
    with pytest.raises(ConfigError, match="cold_items: neighbour needs at least one modality"):
        cold_encoder("neighbour", modalities=())
    with pytest.raises(ConfigError, match="cold_items must be one of"):
        cold_encoder("drop")
    with pytest.raises(ConfigError, match="cold_item_neighbours must be an integer >= 1"):
        cold_encoder("neighbour", cold_item_neighbours=0)
    assert cold_encoder("train").cold_rows is None


@pytest.mark.parametrize("mode, expected", [("auto", "neighbour"), ("features", "features"), ("train", "train")])
def test_cold_items_option_follows_the_training_split(cold_config, caplog, mode, expected):
    config = Config(model="SASRecREVEAL", dataset="scientific", config_dict=cold_config | {"cold_items": mode})
    _, train_data, _, _ = prepare_data(config)
    with caplog.at_level(logging.INFO):
        model = build_model(config, train_data)
    encoder = model.item_embedding
    assert encoder.cold_items == expected
    if expected == "train":
        assert encoder.cold_rows is None and "cold_items: " not in caplog.text  # the tmp path names the test
        return
    counts = training_item_counts(train_data._dataset)
    assert encoder.cold_rows[1:].tolist() == (counts[1:] == 0).tolist() and not encoder.cold_rows[0]
    assert f"cold_items: {mode}" in caplog.text and "have no training interaction" in caplog.text


def test_a_model_without_features_cannot_represent_cold_items(cold_config):
    config = Config(model="SASRecREVEAL", dataset="scientific",
                    config_dict=cold_config | {"cold_items": "features", "modalities": []})
    _, train_data, _, _ = prepare_data(config)
    with pytest.raises(ConfigError, match="cold_items: features needs at least one modality"):
        build_model(config, train_data)


def fake_buckets(warm: float, cold: float | None, n_cold: int = 10) -> dict:
    def metrics(n, value):
        return {"n": n, "ndcg@10": value, "recall@20": None if value is None else 2 * value}

    return {"all": metrics(100, warm), "warm": metrics(100 - n_cold, warm), "cold": metrics(n_cold, cold),
            "head": metrics(30, warm), "torso": metrics(30, warm), "tail": metrics(100 - n_cold - 60, warm)}


def test_compare_tables_warm_and_cold_targets_with_counts():
    from reveal_recbole.comparison import bucket_table, summarise_buckets

    results = {"SASRec": [{"buckets": fake_buckets(0.08, 0.0)}, {"buckets": fake_buckets(0.10, 0.0, n_cold=12)}],
               "SASRecREVEAL": [{"buckets": fake_buckets(0.09, 0.06)}], "Old": [{"test_result": {}}]}
    rows = bucket_table(summarise_buckets(results))
    header, body = rows[0], rows[1:]
    assert [row[0] for row in body] == ["SASRec", "SASRecREVEAL"]  # runs without bucket results are left out
    column = dict(zip(header, body[0]))
    assert column["targets all / warm / cold"] == "100 / 89 / 11" and column["cold / warm NDCG@10"] == "0.00"
    assert column["ndcg@10 warm"] == f"0.0900 ± {np.std([0.08, 0.10], ddof=1):.4f}"
    assert dict(zip(header, body[1]))["cold / warm NDCG@10"] == "0.67"
    no_cold = bucket_table(summarise_buckets({"X": [{"buckets": fake_buckets(0.1, None, n_cold=0)}]}))[1]
    assert dict(zip(header, no_cold))["ndcg@10 cold"] == "–"  # no cold target: no number, not a 0
