"""RecBole's own entry points run REVEAL models after ``import reveal_recbole``, with no extra keys."""
import subprocess
import sys

import pytest
import yaml
from recbole.config import Config as RecBoleConfig
from recbole.quick_start import run_recbole

from reveal_recbole.config import Config, recbole_model_yaml
from reveal_recbole.model import BERT4RecREVEAL, SASRecREVEAL
from reveal_recbole.quick_start import run_reveal
from reveal_recbole.resources import properties_dir

from conftest import assert_report_metrics


def test_run_recbole_trains_a_reveal_model_like_run_reveal(tiny_config, monkeypatch):
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    native = run_recbole(model="SASRecREVEAL", dataset="scientific", config_dict=dict(tiny_config))
    assert_report_metrics(native["test_result"])  # evaluate(load_best_model=True) via REVEALTrainer
    ours = run_reveal("SASRecREVEAL", "scientific", config_dict=dict(tiny_config))
    assert native["test_result"] == ours["test_result"]
    assert native["best_valid_result"] == ours["best_valid_result"]


def test_recbole_config_loads_backbone_and_reveal_defaults(tiny_config):
    given = {**tiny_config, "fusion": "gated"}
    config = RecBoleConfig(model=SASRecREVEAL, dataset="scientific", config_dict=given)
    with open(recbole_model_yaml(SASRecREVEAL.backbone), encoding="utf-8") as handle:
        backbone = yaml.load(handle, Loader=config.yaml_loader)
    with open(properties_dir() / "reveal_base.yaml", encoding="utf-8") as handle:
        reveal_base = yaml.load(handle, Loader=config.yaml_loader)
    for key, value in {**backbone, **reveal_base}.items():
        assert config[key] == given.get(key, value), key
    assert config["fusion"] == "gated"  # what the user gave stays
    assert config["train_neg_sample_args"]["distribution"] == "none"  # CE: no sampling


def test_recbole_config_gives_bert4rec_its_transform(tiny_config):
    """RecBole's overall.yaml sets ``transform: ~``; BERT4Rec's own yaml (loaded later) sets ``mask_itemseq``."""
    config = RecBoleConfig(model=BERT4RecREVEAL, dataset="scientific", config_dict=dict(tiny_config))
    assert config["transform"] == "mask_itemseq"


def test_recbole_config_leaves_recbole_models_alone(tiny_config):
    """Only REVEAL models get our defaults in RecBole's own Config: a baseline stays RecBole's."""
    config = RecBoleConfig(
        model="SASRec", dataset="scientific", config_dict={**tiny_config, "train_neg_sample_args": None}
    )
    assert config["modalities"] is None and config["avl"] is None


@pytest.mark.parametrize("config_class", [Config, RecBoleConfig])
@pytest.mark.parametrize("loss_type, distribution", [("CE", "none"), ("BPR", "uniform")])
def test_negative_sampling_follows_the_loss(tiny_config, config_class, loss_type, distribution):
    config = config_class(
        model="SASRecREVEAL", dataset="scientific", config_dict={**tiny_config, "loss_type": loss_type}
    )
    assert config["train_neg_sample_args"]["distribution"] == distribution


def test_negative_sampling_given_by_the_user_wins(tiny_config):
    given = {"distribution": "popularity", "sample_num": 2}
    config = Config(model="SASRec", dataset="scientific", config_dict={**tiny_config, "loss_type": "BPR",
                                                                         "train_neg_sample_args": given})
    assert config["train_neg_sample_args"]["distribution"] == "popularity"
    assert config["train_neg_sample_args"]["sample_num"] == 2


def test_bpr_baseline_runs_through_run_reveal(tiny_config):
    """SASRecREVEAL with BPR: tests/test_end_to_end.py."""
    result = run_reveal("SASRec", "scientific", config_dict={**tiny_config, "loss_type": "BPR"})
    assert_report_metrics(result["test_result"])


def test_importing_the_package_switches_off_recboles_anomaly_detection():
    """RecBole's sine.py turns autograd anomaly detection on at import: every backward then scans every gradient."""
    def anomaly_after(imports: str) -> str:
        code = f"import torch, {imports}; print(torch.is_anomaly_enabled())"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return done.stdout.strip().splitlines()[-1]

    assert anomaly_after("recbole.model.sequential_recommender") == "True"  # RecBole alone
    assert anomaly_after("reveal_recbole, recbole.quick_start, recbole.model.sequential_recommender.sine") == "False"
