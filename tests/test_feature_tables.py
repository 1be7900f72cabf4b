"""Feature tables at scale: frozen rows out of checkpoints (digest-checked), one copy when loading, feature_width."""
import numpy as np
import pytest
import torch
from torch import nn

import reveal_recbole.data.features as features_module
from reveal_recbole.config import Config
from reveal_recbole.data.features import align_item_features, principal_directions, reduce_features
from reveal_recbole.errors import ConfigError, FeatureFileError
from reveal_recbole.model import REVEALItemEncoder
from reveal_recbole.model.item_encoder import DIGEST_SUFFIX, FeatureDropout
from reveal_recbole.pipeline import build_model, load_run, prepare_data, prepare_run

from conftest import random_features

TABLE = "item_embedding.feature_tables.{}"


def built(config: dict, model: str = "SASRecREVEAL"):
    cfg = Config(model=model, dataset="scientific", config_dict=config)
    dataset, train_data, _, _ = prepare_data(cfg)
    return cfg, train_data, build_model(cfg, train_data)


def state_bytes(state: dict) -> int:
    return sum(value.numel() * value.element_size() for value in state.values())


def test_frozen_tables_stay_out_of_the_state_dict_and_leave_a_digest(tiny_config):
    _, train_data, frozen = built(tiny_config | {"feature_trainable": False})
    _, _, trained = built(tiny_config | {"feature_trainable": True})
    _, _, sasrec = built(tiny_config, model="SASRec")
    state = frozen.state_dict()
    for modality in ("image", "text"):
        assert TABLE.format(modality) not in state
        digest = state[TABLE.format(modality) + DIGEST_SUFFIX]
        assert digest.dtype == torch.uint8 and digest.shape == (16,)
        assert TABLE.format(modality) in trained.state_dict()
        assert TABLE.format(modality) + DIGEST_SUFFIX not in trained.state_dict()
    # the one per-item matrix left is SASRec's own ID table; the rest are projections, digests, presence masks
    n_items = train_data._dataset.item_num
    per_item = [k for k, v in state.items() if v.dim() == 2 and v.shape[0] == n_items]
    assert per_item == ["item_embedding.id_embedding.weight"]
    table_bytes = sum(trained.state_dict()[TABLE.format(m)].numel() * 4 for m in ("image", "text"))
    assert state_bytes(state) < state_bytes(sasrec.state_dict()) + table_bytes / 10
    # the optimiser sees no frozen table either
    assert all(p.shape[0] != n_items or p is frozen.item_embedding.id_embedding.weight
               for p in frozen.parameters())


def test_a_checkpoint_loads_only_onto_the_features_it_was_trained_with(tiny_config, tiny_data):
    _, _, model = built(tiny_config)
    state = model.state_dict()
    _, _, same = built(tiny_config)
    same.load_state_dict(state)  # same files: the digests match
    npy = tiny_data / "scientific" / "scientific.image.npy"
    values = np.load(npy)
    values[3] += 1.0
    np.save(npy, values)
    _, _, other = built(tiny_config)
    with pytest.raises(FeatureFileError, match="other image features"):
        other.load_state_dict(state)


def test_checkpoints_that_stored_frozen_rows_still_load_and_are_checked(tiny_config):
    """Checkpoints written before the digest held the frozen rows themselves (nn.Parameter, requires_grad False)."""
    _, _, model = built(tiny_config)
    old_format = {k: v for k, v in model.state_dict().items() if not k.endswith(DIGEST_SUFFIX)}
    for modality in ("image", "text"):
        old_format[TABLE.format(modality)] = model.item_embedding.feature_tables[modality].clone()
    _, _, fresh = built(tiny_config)
    fresh.load_state_dict(old_format)  # strict: the stored rows are recognised, not unexpected keys
    torch.testing.assert_close(fresh.item_embedding.id_embedding.weight, model.item_embedding.id_embedding.weight)
    old_format[TABLE.format("text")] = old_format[TABLE.format("text")] * 2
    with pytest.raises(FeatureFileError, match="other text features"):
        fresh.load_state_dict(old_format)


def test_load_run_refuses_a_checkpoint_whose_feature_files_changed(tiny_config, tiny_data):
    run = prepare_run(Config(model="SASRecREVEAL", dataset="scientific", config_dict=tiny_config))
    run.trainer.fit(run.train_data, run.valid_data, saved=True)
    assert load_run(run.trainer.saved_model_file).model.item_embedding.modalities == ("image", "text")
    npy = tiny_data / "scientific" / "scientific.text.npy"
    np.save(npy, np.load(npy)[:, ::-1].copy())
    with pytest.raises(FeatureFileError, match="restore the files it was trained with"):
        load_run(run.trainer.saved_model_file)


def test_frozen_tables_share_the_datasets_rows_and_trained_ones_copy_them(tiny_config):
    _, train_data, frozen = built(tiny_config | {"feature_trainable": False})
    dataset_rows = train_data._dataset.item_features["image"].values
    assert frozen.item_embedding.feature_tables["image"].data_ptr() == dataset_rows.data_ptr()
    before = dataset_rows.clone()
    _, train_data, trained = built(tiny_config | {"feature_trainable": True})
    table = trained.item_embedding.feature_tables["image"]
    assert table.data_ptr() != train_data._dataset.item_features["image"].values.data_ptr()
    with torch.no_grad():
        table.add_(1.0)
    torch.testing.assert_close(train_data._dataset.item_features["image"].values, before)


def test_loading_in_chunks_equals_one_gather(monkeypatch):
    rng = np.random.default_rng(0)
    array = rng.standard_normal((11, 4)).astype(np.float32)
    tokens = [f"t{i}" for i in range(11)]
    token_to_id = {f"t{i}": (i * 7) % 13 + 1 for i in range(11)}  # ids 1..13, scattered
    whole = align_item_features(tokens, array, token_to_id, 14, "whole", normalise=True)
    monkeypatch.setattr(features_module, "LOAD_CHUNK_ROWS", 3)
    chunked = align_item_features(tokens, array, token_to_id, 14, "chunked", normalise=True)
    assert torch.equal(whole.values, chunked.values) and torch.equal(whole.present, chunked.present)
    for row, token in enumerate(tokens):
        expected = torch.from_numpy(array[row]) / np.linalg.norm(array[row])
        torch.testing.assert_close(chunked.values[token_to_id[token]], expected)
    array[9, 2] = np.inf  # in the last chunk
    with pytest.raises(FeatureFileError, match="t9"):
        align_item_features(tokens, array, token_to_id, 14, "chunked")


def test_reduce_features_projects_on_the_leading_principal_components():
    features = random_features(40, 6, missing=(5, 9), seed=3)
    values = features.values * torch.tensor([5.0, 1.0, 3.0, 0.5, 2.0, 0.1])  # distinct variances
    values[~features.present] = 0
    reduced = reduce_features(values, features.present, 3)
    present = values[features.present].double().numpy()
    centred = present - present.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:3].T
    got = reduced[features.present].double().numpy()
    for column in range(3):  # principal directions are defined up to sign
        sign = np.sign(got[:, column] @ expected[:, column])
        np.testing.assert_allclose(got[:, column], sign * expected[:, column], atol=1e-4)
    assert torch.count_nonzero(reduced[~features.present]) == 0
    # a sample of the rows gives the same directions every time (seeded)
    first = principal_directions(values, features.present, 2, max_rows=20)[1]
    assert torch.equal(first, principal_directions(values, features.present, 2, max_rows=20)[1])


def test_feature_width_sets_the_table_and_projection_width():
    features = {"image": random_features(12, 6, seed=1), "text": random_features(12, 5, seed=2)}
    encoder = REVEALItemEncoder(nn.Embedding(12, 8, padding_idx=0), features, feature_width=4)
    assert encoder.feature_tables["image"].shape == (12, 4) and encoder.projections["image"].in_features == 4
    assert encoder.feature_tables["text"].shape == (12, 4)
    assert encoder.weight.shape == (12, 8)
    wide = REVEALItemEncoder(nn.Embedding(12, 8, padding_idx=0), features, feature_width=64)  # wider than dim
    assert wide.feature_tables["image"].shape == (12, 6)
    for bad in (0, -1, 2.5, True, "64"):
        with pytest.raises(ConfigError, match="feature_width"):
            REVEALItemEncoder(nn.Embedding(12, 8, padding_idx=0), features, feature_width=bad)


def test_feature_dropout_drops_a_share_p_and_rescales_the_rest():
    x = torch.full((400, 500), 2.0, requires_grad=True)
    dropout = FeatureDropout(0.1).train()
    y = dropout(x)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.1) < 0.005  # 200,000 draws: the share dropped is p
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 2.0 / 0.9))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.9)  # the gradient passes the same mask and scale
    assert torch.equal(dropout.eval()(x), x)
    assert torch.equal(FeatureDropout(0.0).train()(x), x)
    assert torch.count_nonzero(FeatureDropout(1.0).train()(x)) == 0
