"""RecBole's own entry points run REVEAL models after ``import reveal_recbole``."""
import pytest
import yaml
from recbole.config import Config as RecBoleConfig
from recbole.quick_start import run_recbole

import reveal_recbole.config as reveal_config
from reveal_recbole.config import fill_missing_defaults, recbole_model_yaml
from reveal_recbole.model import SASRecREVEAL
from reveal_recbole.quick_start import run_reveal
from reveal_recbole.utils import properties_dir

from conftest import assert_report_metrics


def protocol() -> dict:
    """Our shared protocol (properties/overall.yaml), which RecBole's own Config does not load."""
    with open(properties_dir() / "overall.yaml", encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def native_config_dict(tiny_config) -> dict:
    # loss_type: RecBole's Config needs it (or a model input_type) before any of our code runs
    return {**protocol(), **tiny_config, "loss_type": "CE"}


def test_run_recbole_trains_a_reveal_model_like_run_reveal(tiny_config, monkeypatch):
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    native = run_recbole(model="SASRecREVEAL", dataset="scientific", config_dict=native_config_dict(tiny_config))
    assert_report_metrics(native["test_result"])  # evaluate(load_best_model=True) via REVEALTrainer
    ours = run_reveal("SASRecREVEAL", "scientific", config_dict=dict(tiny_config))
    assert native["test_result"] == ours["test_result"]
    assert native["best_valid_result"] == ours["best_valid_result"]


def test_fill_missing_defaults_gives_backbone_and_reveal_defaults(tiny_config):
    given = {**native_config_dict(tiny_config), "fusion": "gated"}
    config = RecBoleConfig(model=SASRecREVEAL, dataset="scientific", config_dict=given)
    assert config["modalities"] is None and config["hidden_dropout_prob"] is None
    fill_missing_defaults(config)

    with open(recbole_model_yaml(SASRecREVEAL.backbone), encoding="utf-8") as handle:
        backbone = yaml.load(handle, Loader=config.yaml_loader)
    with open(properties_dir() / "reveal_base.yaml", encoding="utf-8") as handle:
        reveal_base = yaml.load(handle, Loader=config.yaml_loader)
    for key, value in {**backbone, **reveal_base}.items():
        assert config[key] == given.get(key, value), key
    assert config["fusion"] == "gated"  # what the user gave stays


def test_fill_missing_defaults_later_files_win(tmp_path, tiny_config, monkeypatch):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("fusion: concat\nfeature_dropout: 0.3\n")
    second.write_text("fusion: gated\n")
    monkeypatch.setattr(reveal_config, "reveal_yaml_files", lambda name, model_class: [first, second])
    config = RecBoleConfig(model=SASRecREVEAL, dataset="scientific", config_dict=native_config_dict(tiny_config))
    fill_missing_defaults(config)
    assert config["fusion"] == "gated"
    assert config["feature_dropout"] == pytest.approx(0.3)


def test_fill_missing_defaults_gives_bert4rec_its_transform(tiny_config):
    """RecBole's overall.yaml sets ``transform: ~``; BERT4Rec needs its own ``mask_itemseq``."""
    from reveal_recbole.model import BERT4RecREVEAL

    config = RecBoleConfig(model=BERT4RecREVEAL, dataset="scientific", config_dict=native_config_dict(tiny_config))
    assert config["transform"] is None
    fill_missing_defaults(config)
    assert config["transform"] == "mask_itemseq"
    assert config["avl_momentum"] == 0.9
