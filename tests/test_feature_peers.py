"""RecBole's SASRecF, FDSA and GRU4RecF reading our image and text features as float_seq item fields.

They train an epoch and score with their features; the fields hold exactly the feature files' rows,
matched by item token; the split is SASRec's; a dense field is embedded as one ``W x + b``; AVL
and the masked-modality diagnostics reach them; the ``peers`` suite expands to what is installed.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from recbole.config import Config as RecBoleConfig
from recbole.model.sequential_recommender import SASRecF as RecBoleSASRecF
from recbole.utils import FeatureType
from recbole.utils import get_model as recbole_get_model

from reveal_recbole.comparison import SUITES, expand_suites, relative_improvement
from reveal_recbole.config import Config
from reveal_recbole.data import feature_paths, read_feature_file, write_item_features
from reveal_recbole.data.feature_fields import FeatureFieldsDataset
from reveal_recbole.errors import ConfigError
from reveal_recbole.model.feature_peers import DenseFeatureSeqEmbLayer, FeatureAwareItemTable
from reveal_recbole.pipeline import prepare_data, prepare_run
from reveal_recbole.quick_start import run_reveal
from reveal_recbole.registry import get_model, get_trainer
from reveal_recbole.resources import properties_dir
from reveal_recbole.trainer import REVEALTrainer
from reveal_recbole.trainer.avl import AdaptiveVisualLearning, masked_losses

from conftest import DATASET, assert_report_metrics, load_script

PEERS = ["SASRecF", "FDSA", "GRU4RecF"]


def prepared(tiny_config, model: str, **keys):
    return prepare_run(Config(model=model, dataset=DATASET, config_dict=tiny_config | keys))


@pytest.mark.parametrize("name", PEERS)
def test_peer_trains_and_its_own_score_column_follows_its_features(tiny_config, name):
    run = prepared(tiny_config, name)
    assert type(run.model) is get_model(name) and isinstance(run.model, recbole_get_model(name))
    assert run.model.feature_embed_layer.dense_field_names == ["image_feature", "text_feature"]
    before = {k: p.detach().clone() for k, p in run.model.named_parameters()}
    loss = run.trainer._train_epoch(run.train_data, 0)
    assert np.isfinite(float(loss))
    moved = [k for k, p in run.model.named_parameters() if not torch.equal(before[k], p)]
    assert any(k.startswith("feature_embed_layer.dense_projections.image_feature") for k in moved)

    model = run.model.eval()
    interaction = next(iter(run.test_data))[0]
    sequences, lengths = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
    user = 0
    item = int(sequences[user, lengths[user] - 1])
    layer = model.feature_embed_layer
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
        assert torch.equal(scores, model.full_sort_predict(interaction))  # any change below is the feature's
        table = layer.item_feat["image_feature"].clone()  # the dataset's tensor stays as loaded
        table[item] += torch.randn(table.shape[1], generator=torch.Generator().manual_seed(0))
        layer.item_feat.interaction["image_feature"] = table
        after = model.full_sort_predict(interaction)
    assert after[user, item] != scores[user, item], "the item's own score column ignores its features"
    unseen = [u for u in range(len(sequences)) if not (sequences[u] == item).any()]
    assert torch.equal(after[unseen], scores[unseen])  # scored by ID: features enter through the sequence only


def test_float_seq_fields_hold_the_feature_rows_matched_by_token(tiny_config):
    """Rows in reverse order, one item without an image row, feature_norm: none: exact rows, zeros where none."""
    folder = Path(tiny_config["data_path"]) / DATASET
    tokens, array = read_feature_file(*feature_paths(folder, DATASET, "image"))
    tokens, array = tokens[::-1], np.asarray(array)[::-1]
    dropped = tokens[0]
    write_item_features(folder, DATASET, "image", tokens[1:], array[1:])
    config = Config(model="SASRecF", dataset=DATASET, config_dict=tiny_config | {"feature_norm": "none"})
    dataset, train_data, _, _ = prepare_data(config)
    assert type(dataset) is FeatureFieldsDataset
    item_feat = train_data._dataset.item_feat
    for modality in ("image", "text"):
        field = f"{modality}_feature"
        assert dataset.field2type[field] == FeatureType.FLOAT_SEQ and field not in (config["numerical_features"] or [])
        assert item_feat[field] is dataset.item_features[modality].values  # shared with the REVEAL tables, no copy
    field_tokens, field_rows = read_feature_file(*feature_paths(folder, DATASET, "image"))
    rows = item_feat["image_feature"]
    assert rows.shape == (dataset.item_num, array.shape[1]) and dataset.field2seqlen["image_feature"] == array.shape[1]
    for token, row in zip(field_tokens, field_rows):
        assert torch.equal(rows[dataset.token2id(dataset.iid_field, token)], torch.from_numpy(np.array(row)))
    assert not rows[dataset.token2id(dataset.iid_field, dropped)].any()  # no row: zeros, as the REVEAL input
    assert not rows[0].any()  # padding
    text_tokens, text_rows = read_feature_file(*feature_paths(folder, DATASET, "text"))
    ids = [dataset.token2id(dataset.iid_field, t) for t in text_tokens]
    assert torch.equal(item_feat["text_feature"][ids], torch.from_numpy(np.array(text_rows)))


def test_l2_rows_are_the_reveal_models_rows(tiny_config):
    peer = prepare_data(Config(model="SASRecF", dataset=DATASET, config_dict=dict(tiny_config)))[0]
    reveal = prepare_data(Config(model="SASRecREVEAL", dataset=DATASET, config_dict=dict(tiny_config)))[0]
    for modality in ("image", "text"):
        assert torch.equal(peer.item_features[modality].values, reveal.item_features[modality].values)


@pytest.mark.parametrize("name", ["SASRecF", "GRU4RecF"])
def test_split_is_sasrecs(tiny_config, name):
    def splits(model):
        _, *loaders = prepare_data(Config(model=model, dataset=DATASET, config_dict=dict(tiny_config)))
        return [{k: data._dataset.inter_feat[k] for k in ("user_id", "item_id", "item_id_list", "item_length")}
                for data in loaders]

    for ours, sasrec in zip(splits(name), splits("SASRec")):
        assert ours.keys() == sasrec.keys()
        for key in ours:
            assert torch.equal(ours[key], sasrec[key]), key


def test_dense_field_is_one_linear_map_of_the_rows(tiny_config):
    run = prepared(tiny_config, "FDSA")
    layer = run.model.feature_embed_layer
    assert isinstance(layer, DenseFeatureSeqEmbLayer) and layer.num_feature_field["item"] == 2
    items = torch.tensor([[3, 1, 3, 0], [2, 2, 5, 7]])
    sparse, dense = layer(None, items)
    assert sparse["item"] is None and dense["item"].shape == (2, 4, 2, layer.embedding_size)
    for k, field in enumerate(("image_feature", "text_feature")):
        linear = layer.dense_projections[field]
        expected = layer.item_feat[field][items] @ linear.weight.T + linear.bias
        assert torch.allclose(dense["item"][:, :, k], expected, atol=1e-6)
    with layer.masking(["image"]):
        masked = layer(None, items)[1]["item"]
    assert torch.allclose(masked[:, :, 0], layer.dense_projections["image_feature"].bias.expand(2, 4, -1))
    assert torch.equal(masked[:, :, 1], dense["item"][:, :, 1])
    assert sum(p.numel() for p in layer.parameters()) == sum(
        (dim + 1) * layer.embedding_size for dim in layer.dense_field_dims)  # no per-dimension embedding tables


def test_modality_and_field_keys(tiny_config):
    run = prepared(tiny_config, "SASRecF", modalities=["text"])
    assert run.config["selected_features"] == ["text_feature"]
    assert run.model.concat_layer.in_features == 2 * run.config["hidden_size"]  # ID + one field
    assert "image_feature" not in run.dataset.field2type
    with pytest.raises(ConfigError, match=r"selected_features names \['image_feature'\]"):
        prepared(tiny_config, "SASRecF", modalities=["text"], selected_features=["image_feature"])


def test_recboles_own_lookups_keep_recboles_models(tiny_config):
    """RecBole's run_recbole(model="SASRecF") stays RecBole's: model, dataset class, trainer and defaults."""
    assert recbole_get_model("SASRecF") is RecBoleSASRecF
    for name in PEERS:
        assert not hasattr(importlib.import_module("recbole.data.dataset"), f"{name}Dataset")
        assert not hasattr(importlib.import_module("recbole.trainer"), f"{name}Trainer")
    config = RecBoleConfig(model="SASRecF", dataset=DATASET, config_dict=tiny_config | {"train_neg_sample_args": None})
    assert config["modalities"] is None and config["selected_features"] == ["class"]


@pytest.mark.parametrize("name", ["SASRecF", "GRU4RecF"])
def test_avl_reaches_the_image_projection(tiny_config, name):
    run = prepared(tiny_config, name, avl=True, utilisation_per_epoch=False)
    assert get_trainer(run.config["MODEL_TYPE"], name) is REVEALTrainer and run.trainer.avl is not None
    model = run.model
    assert isinstance(model.item_embedding, FeatureAwareItemTable)
    assert model.item_embedding.modalities == ["image", "text"] and model.item_embedding.score_with == "id"
    batch = next(iter(run.train_data))
    loss_v, loss_t = masked_losses(model, batch)
    assert torch.isfinite(loss_v) and torch.isfinite(loss_t) and loss_v != loss_t
    avl = AdaptiveVisualLearning(model)
    with avl.gradient_hooks():
        loss = avl.training_loss(batch)
        loss.backward()
    assert model.feature_embed_layer.dense_projections["image_feature"].weight.grad.abs().sum() > 0
    assert int(model.avl_running_losses[2]) == 1


def test_run_reveal_reports_masked_drops(tiny_config):
    result = run_reveal("SASRecF", DATASET, config_dict=tiny_config | {"utilisation_per_epoch": False})
    assert_report_metrics(result["test_result"])
    assert set(result["utilisation"]["drop"]) == {"image", "text"}


def test_peers_suite_expands_to_the_installed_models(caplog):
    assert expand_suites(["SASRec", "GRU4Rec"]) == ["SASRec", "GRU4Rec"]
    expanded = expand_suites(["peers"])
    for name in ("SASRec", "SASRecREVEAL", "FeatureKNN", "SASRecF", "FDSA", "GRU4RecF", "SASRecF[avl=True]"):
        assert name in expanded
    assert expanded == [s for s in SUITES["peers"] if s in expanded]  # the suite's order
    assert expand_suites(["SASRec", "peers"]).count("SASRec") == 1
    suites = dict(SUITES)
    try:
        SUITES["peers"] = (*SUITES["peers"], "NoSuchPeer")
        with caplog.at_level(logging.WARNING):
            assert "NoSuchPeer" not in expand_suites(["peers"])
        assert "NoSuchPeer" in caplog.text
    finally:
        SUITES.clear()
        SUITES.update(suites)


def test_run_reveal_command_line_expands_the_suite(monkeypatch):
    script = load_script("run_reveal")
    calls = []
    monkeypatch.setattr(script, "compare", lambda models, dataset, *args, **kwargs: calls.append((models, dataset)))
    script.main(["--model=peers", "--dataset=synthetic_sparse", "--seeds=1,2"])
    assert calls == [(expand_suites(["peers"]), "synthetic_sparse")]


def test_a_peer_with_reveal_parts_is_measured_against_the_peer():
    rows = [{"model": m, "ndcg@10": v} for m, v in
            (("SASRec", 0.1), ("SASRecREVEAL[avl=False]", 0.11), ("SASRecF", 0.2), ("SASRecF[avl=True]", 0.22))]
    gains = relative_improvement(rows, "ndcg@10")
    assert gains == pytest.approx({"SASRecREVEAL[avl=False]": 0.1, "SASRecF[avl=True]": 0.1})


def test_sasrecf_yaml_carries_the_fve_keys_so_peer_plus_fve_reaches_the_loop():
    """SASRecF + FVE (issue 21) read fve_select_fraction & co., absent from its yaml before (a TypeError)."""
    base = yaml.safe_load((properties_dir() / "reveal_base.yaml").read_text(encoding="utf-8"))
    ours = yaml.safe_load((properties_dir() / "model" / "SASRecF.yaml").read_text(encoding="utf-8"))
    keys = [k for k in base if k.startswith("fve_") or k == "image_dir"]
    assert len(keys) > 15
    assert {k: ours.get(k, "missing") for k in keys} == {k: base[k] for k in keys}


def test_a_rounds_features_replace_their_own_field_and_never_an_item_files_field(tiny_config):
    """set_item_features (FVE's rounds) rewrites the field this class made; an .item column of that name is refused."""
    import dataclasses

    from reveal_recbole.errors import ConfigError

    config = Config(model="SASRecF", dataset=DATASET, config_dict=tiny_config)
    dataset, train_data, _, _ = prepare_data(config)
    split = train_data._dataset
    image = split.item_features["image"]
    doubled = dataclasses.replace(image, values=image.values * 2)
    split.set_item_features("image", doubled)  # a new round's rows: the field follows
    assert torch.equal(split.item_feat["image_feature"], image.values * 2)
    split.field2type["brand_feature"] = FeatureType.TOKEN  # as a .item column named so would be
    with pytest.raises(ConfigError, match=r"already has field\(s\) \['brand_feature'\], the names the brand features"):
        split.set_item_features("brand", doubled)
    assert split.field2type["brand_feature"] == FeatureType.TOKEN and "brand" not in split.item_features
