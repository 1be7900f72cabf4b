"""One tiny epoch of every REVEAL model on a real Scientific subset, through run_reveal and by hand."""
import pickle
from pathlib import Path

import pytest
import torch

from reveal_recbole import Config
from reveal_recbole.pipeline import build_model, build_trainer, prepare_data
from reveal_recbole.quick_start import run_reveal

from conftest import REPORT_METRICS, assert_report_metrics

REVEAL_MODELS = ["SASRecREVEAL", "GRU4RecREVEAL", "BERT4RecREVEAL", "NARMREVEAL"]
TORCH_WEIGHTS_ONLY_DEFAULT = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 6)


def build(model_name, tiny_config, **overrides):
    """Config, dataset, split and model exactly as run_reveal builds them."""
    config = Config(model=model_name, dataset="scientific", config_dict={**tiny_config, **overrides})
    dataset, train_data, valid_data, test_data = prepare_data(config)
    return config, dataset, build_model(config, train_data), (train_data, valid_data, test_data)


@pytest.mark.parametrize("model_name", REVEAL_MODELS)
def test_one_epoch_per_reveal_model(tiny_config, model_name):
    result = run_reveal(model_name, "scientific", config_dict=tiny_config)
    assert_report_metrics(result["test_result"])
    assert set(REPORT_METRICS) <= set(result["best_valid_result"])
    assert result["valid_score_bigger"] is True
    assert list(Path(tiny_config["checkpoint_dir"]).glob(f"{model_name}-*.pth"))


def test_reveal_models_use_the_encoder_with_dataset_features(tiny_config):
    config, dataset, model, _ = build("SASRecREVEAL", tiny_config)
    encoder = model.item_embedding
    assert encoder.modalities == tuple(config["modalities"]) == ("image", "text")
    assert encoder.num_embeddings == dataset.item_num
    for modality, features in dataset.item_features.items():
        assert torch.equal(getattr(encoder, f"present_{modality}"), features.present)
        assert encoder.feature_tables[modality].shape == features.values.shape


def test_bert4rec_full_sort_and_mask_token(tiny_config):
    config, dataset, model, (_, _, test_data) = build("BERT4RecREVEAL", tiny_config)
    model.eval()
    encoder = model.item_embedding
    mask = model.mask_token
    assert mask == model.n_items == dataset.item_num
    assert encoder.num_embeddings == model.n_items + 1
    for modality in encoder.modalities:
        assert not bool(getattr(encoder, f"present_{modality}")[mask])
        assert torch.count_nonzero(encoder.feature_tables[modality][mask]) == 0
    with torch.no_grad():
        table = encoder.weight
        no_feature = encoder.id_embedding.weight[mask] + sum(p.bias for p in encoder.projections.values())
        torch.testing.assert_close(table[mask], no_feature)
        interaction = next(iter(test_data))[0]
        scores = model.full_sort_predict(interaction)
    assert scores.shape == (len(interaction), model.n_items)
    assert torch.isfinite(scores).all()


def test_sasrec_reveal_trains_with_bpr_and_sampled_negatives(tiny_config):
    result = run_reveal("SASRecREVEAL", "scientific", config_dict={**tiny_config, "loss_type": "BPR"})
    assert_report_metrics(result["test_result"])


@pytest.mark.parametrize("trainable", [False, True])
def test_feature_trainable_controls_feature_tables(tiny_config, trainable):
    config, _, model, (train_data, valid_data, _) = build("SASRecREVEAL", tiny_config, feature_trainable=trainable)
    encoder = model.item_embedding
    tables = {m: encoder.feature_tables[m].detach().clone() for m in encoder.modalities}
    projection = encoder.projections["image"].weight.detach().clone()
    trainer = build_trainer(config, model)
    trainer.fit(train_data, valid_data, saved=False, show_progress=False)
    assert not torch.equal(encoder.projections["image"].weight, projection)  # training did happen
    for modality, before in tables.items():
        assert encoder.feature_tables[modality].requires_grad is trainable
        assert torch.equal(encoder.feature_tables[modality].detach(), before) is (not trainable), modality


@pytest.mark.parametrize("model_name", ["SASRecREVEAL", "SASRec"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_best_model_reload_works_under_weights_only_default(tiny_config, monkeypatch, model_name):
    """Trainer.evaluate(load_best_model=True) reads RecBole's pickled checkpoint despite torch>=2.6."""
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    original_load = torch.load
    config, _, model, (train_data, valid_data, test_data) = build(model_name, tiny_config)
    trainer = build_trainer(config, model)
    trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    checkpoint = Path(trainer.saved_model_file)
    assert checkpoint.is_file() and checkpoint.parent == Path(tiny_config["checkpoint_dir"])
    if TORCH_WEIGHTS_ONLY_DEFAULT:  # the plain default refuses RecBole's checkpoints: the workaround is needed
        with pytest.raises(pickle.UnpicklingError):
            torch.load(checkpoint)
    reloaded = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    assert_report_metrics(reloaded)
    with torch.no_grad():  # spoil the weights: a real reload restores them and the metrics
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    again = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    assert again == reloaded
    assert torch.load is original_load  # torch.load itself is never rebound (recbole_seam.load_checkpoint)


def test_run_reveal_reloads_best_baseline(tiny_config, monkeypatch):
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    result = run_reveal("SASRec", "scientific", config_dict=tiny_config)
    assert_report_metrics(result["test_result"])
    assert list(Path(tiny_config["checkpoint_dir"]).glob("SASRec-*.pth"))
