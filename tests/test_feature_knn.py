"""FeatureKNN: scores are cosines computed by hand; it runs through run_reveal.py; bad keys are ConfigErrors."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import yaml
from recbole.config import Config as RecBoleConfig
from recbole.data.interaction import Interaction

from reveal_recbole.config import Config
from reveal_recbole.data import ItemFeatures
from reveal_recbole.errors import ConfigError
from reveal_recbole.model import FeatureKNN

from conftest import REPORT_METRICS, assert_report_metrics, load_script, random_features


class FeatureOnlyDataset:
    """What FeatureKNN reads from a dataset: the item count and the aligned features."""

    def __init__(self, features: dict[str, ItemFeatures]):
        self.item_features = features
        self.n_items = len(next(iter(features.values())).values)

    def num(self, field):
        return self.n_items


def build(tiny_config, features, **keys):
    keys = tiny_config | {"modalities": list(features)} | keys
    config = Config(model="FeatureKNN", dataset="scientific", config_dict=keys)
    return FeatureKNN(config, FeatureOnlyDataset(features)).eval()


def sequences(model, rows):
    """An interaction of left-aligned item sequences (0 = padding)."""
    lengths = [sum(1 for item in row if item) for row in rows]
    return Interaction({model.ITEM_SEQ: torch.tensor(rows), model.ITEM_SEQ_LEN: torch.tensor(lengths)})


def cosine(a, b) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def test_scores_are_the_recency_weighted_mean_cosine(tiny_config):
    features = {"image": random_features(8, 3, missing=(6,), seed=1), "text": random_features(8, 5, seed=2)}
    model = build(tiny_config, features, knn_last_items=2, knn_recency_decay=0.5)
    rows = [[1, 2, 3, 0], [4, 0, 0, 0]]
    with torch.no_grad():
        scores = model.full_sort_predict(sequences(model, rows))
    for user, (queries, weights) in enumerate([([3, 2], [1.0, 0.5]), ([4], [1.0])]):
        for item in range(1, 8):  # 0 is padding, -inf in RecBole's evaluator
            if item in queries:
                assert scores[user, item] == -math.inf
                continue
            by_hand = sum(
                w * np.mean([cosine(f.values[q].numpy(), f.values[item].numpy()) for f in features.values()])
                for q, w in zip(queries, weights)
            ) / sum(weights)
            assert float(scores[user, item]) == pytest.approx(by_hand, abs=1e-6), (user, item)


def test_predict_agrees_with_full_sort_predict(tiny_config):
    features = {"image": random_features(8, 3, seed=3), "text": random_features(8, 4, seed=4)}
    model = build(tiny_config, features, knn_last_items=3, knn_recency_decay=0.7)
    rows = [[5, 1, 2, 7], [6, 3, 0, 0]]
    interaction = sequences(model, rows)
    with torch.no_grad():
        full = model.full_sort_predict(interaction)
        for item in range(8):
            interaction.update(Interaction({model.ITEM_ID: torch.full((2,), item)}))
            torch.testing.assert_close(model.predict(interaction), full[:, item])


def crafted_features(modalities) -> dict[str, ItemFeatures]:
    """Item 1 is the query; text finds item 2 nearest, the image finds item 3, and item 4 is far in both."""
    vectors = {
        "text": [[0, 0], [1, 0], [1, 0.05], [0, 1], [-1, 0]],
        "image": [[0, 0], [1, 0], [0.6, 0.8], [1, 0.05], [-1, 0.1]],
    }
    present = torch.tensor([False, True, True, True, True])
    return {m: ItemFeatures(torch.tensor(vectors[m]), present, "crafted") for m in modalities}


@pytest.mark.parametrize("modalities, ranking", [
    (["text"], [2, 3, 4]),  # cosines 0.999, 0, -1
    (["image"], [3, 2, 4]),  # 0.999, 0.6, -0.995
    (["image", "text"], [2, 3, 4]),  # means 0.799, 0.499, -0.997
])
def test_ranking_of_a_crafted_case(tiny_config, modalities, ranking):
    model = build(tiny_config, crafted_features(modalities))
    with torch.no_grad():
        scores = model.full_sort_predict(sequences(model, [[4, 1]]))[0]
    assert scores[1] == -math.inf  # the last item itself
    assert scores[2:].argsort(descending=True).add(2).tolist() == ranking


def test_the_last_item_can_be_kept(tiny_config):
    model = build(tiny_config, crafted_features(["text"]), knn_exclude_query=False)
    with torch.no_grad():
        scores = model.full_sort_predict(sequences(model, [[4, 1]]))[0]
    assert float(scores[1]) == pytest.approx(1.0) and int(scores[1:].argmax()) + 1 == 1


@pytest.mark.parametrize("key, value", [
    ("knn_last_items", 0), ("knn_last_items", 1.5), ("knn_last_items", True),
    ("knn_recency_decay", 0), ("knn_recency_decay", 1.5), ("knn_recency_decay", "half"),
    ("knn_exclude_query", "yes"), ("modalities", []),
])
def test_bad_config_values_are_config_errors(tiny_config, key, value):
    features = crafted_features(["text"])
    with pytest.raises(ConfigError, match=key if key != "modalities" else "at least one modality"):
        build(tiny_config, features, **{key: value})


def test_recbole_config_loads_the_model_yaml(tiny_config):
    config = RecBoleConfig(model="FeatureKNN", dataset="scientific", config_dict=tiny_config)
    assert (config["knn_last_items"], config["knn_exclude_query"], config["modalities"]) == (1, True, ["image", "text"])
    assert config["train_neg_sample_args"]["distribution"] == "none"


def test_compare_runs_feature_knn_variants_through_run_reveal(tiny_config, tmp_path):
    """One no-op epoch per variant, whatever ``epochs`` says, and finite full-ranking test metrics."""
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config | {"epochs": 5}), encoding="utf-8")
    specs = ["FeatureKNN", "FeatureKNN[modalities=[text],knn_last_items=2]"]
    load_script("run_reveal").main([f"--model={','.join(specs)}", f"--config_files={config_file}",
                                    f"--output_dir={tmp_path / 'results'}"])
    runs_csv = next((tmp_path / "results").glob("*-runs.csv"))
    with open(runs_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["model"] for row in rows] == specs
    for row in rows:
        assert row["epochs"] == "1"
        assert_report_metrics({metric: row[metric] for metric in REPORT_METRICS})
    assert rows[0]["ndcg@10"] != rows[1]["ndcg@10"]
