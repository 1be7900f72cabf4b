"""Registration: importing reveal_recbole publishes its models, dataset class and trainer to RecBole."""
import importlib

import pytest
import recbole.data.dataset
import recbole.trainer
import recbole.utils
from recbole.model.general_recommender import BPR
from recbole.model.sequential_recommender import STAMP, SASRec

import reveal_recbole
from reveal_recbole.data import MultimodalSequentialDataset
from reveal_recbole.errors import UnknownModelError
from reveal_recbole.model import REVEALRecommender, make_reveal_model
from reveal_recbole.quick_start import run_reveal
from reveal_recbole.registry import get_model, get_trainer, registered_models
from reveal_recbole.trainer import REVEALTrainer

from conftest import assert_report_metrics

REVEAL_MODELS = ["BERT4RecREVEAL", "GRU4RecREVEAL", "NARMREVEAL", "SASRecREVEAL"]


def test_builtin_reveal_models_are_registered():
    assert set(REVEAL_MODELS) <= set(registered_models())
    for name in REVEAL_MODELS:
        assert getattr(reveal_recbole, name).__name__ == name


@pytest.mark.parametrize("name", REVEAL_MODELS)
def test_recbole_lookups_find_our_classes(name):
    model_class = getattr(reveal_recbole, name)
    assert recbole.utils.get_model(name) is model_class
    assert issubclass(model_class, REVEALRecommender) and issubclass(model_class, model_class.backbone)
    assert getattr(recbole.data.dataset, f"{name}Dataset") is MultimodalSequentialDataset
    assert getattr(recbole.trainer, f"{name}Trainer") is REVEALTrainer
    assert recbole.utils.get_trainer(model_class.type, name) is REVEALTrainer


def test_recbole_alias_module_holds_the_class():
    """Checkpoints pickle the class by module path: the alias module must resolve to it."""
    module = importlib.import_module("recbole.model.sequential_recommender.sasrecreveal")
    assert module.SASRecREVEAL is reveal_recbole.SASRecREVEAL


def test_our_get_model_resolves_ours_and_recboles():
    assert get_model("SASRecREVEAL") is reveal_recbole.SASRecREVEAL
    assert get_model("SASRec") is SASRec


def test_get_trainer_for_a_baseline_keeps_recboles_trainer():
    trainer_class = get_trainer(SASRec.type, "SASRec")
    assert issubclass(trainer_class, recbole.trainer.Trainer)
    assert trainer_class is not REVEALTrainer


def test_unknown_model_lists_reveal_models():
    with pytest.raises(UnknownModelError) as excinfo:
        get_model("NoSuchModel")
    message = str(excinfo.value)
    assert "NoSuchModel" in message
    for name in REVEAL_MODELS:
        assert name in message
    assert isinstance(excinfo.value, ValueError)


@pytest.mark.parametrize("not_a_backbone", [int, "SASRec", BPR], ids=["int", "a name", "general BPR"])
def test_make_reveal_model_rejects_non_backbones(not_a_backbone):
    with pytest.raises(TypeError):
        make_reveal_model(not_a_backbone)


def test_make_reveal_model_stamp_registers_and_trains(tiny_config):
    model_class = make_reveal_model(STAMP)
    assert model_class.__name__ == "STAMPREVEAL" and model_class.backbone is STAMP
    assert get_model("STAMPREVEAL") is model_class
    assert recbole.utils.get_model("STAMPREVEAL") is model_class
    assert "STAMPREVEAL" in registered_models()
    assert recbole.data.dataset.STAMPREVEALDataset is MultimodalSequentialDataset

    result = run_reveal("STAMPREVEAL", "scientific", config_dict=tiny_config)
    assert_report_metrics(result["test_result"])
