"""Lookups that resolve reveal-recbole's models, datasets and trainers first, then RecBole's.

Registering a REVEAL model also publishes it to RecBole's own lookups
(:func:`reveal_recbole.recbole_seam.publish_model`), so ``run_recbole``, ``objective_function``
and ``HyperTuning`` accept our model names too.
"""
from __future__ import annotations

import importlib

from reveal_recbole import recbole_seam
from reveal_recbole.errors import UnknownModelError

_MODELS: dict[str, type] = {}
_DATASETS: dict[str, type] = {}
_TRAINERS: dict[str, type] = {}


def register_model(model_class: type, dataset_class: type | None = None, trainer_class: type | None = None) -> type:
    """Make ``model_class`` visible to our lookups and to RecBole's, under its class name."""
    name = model_class.__name__
    _MODELS[name] = model_class
    if dataset_class is not None:
        _DATASETS[name] = dataset_class
    if trainer_class is not None:
        _TRAINERS[name] = trainer_class
    recbole_seam.publish_model(model_class, dataset_class, trainer_class)
    return model_class


def registered_models() -> list[str]:
    return sorted(_MODELS)


def is_registered(model_class: type) -> bool:
    return _MODELS.get(getattr(model_class, "__name__", None)) is model_class


def get_model(model_name: str) -> type:
    """Resolve a model name: ours first, then RecBole's; unknown names list what exists."""
    if model_name in _MODELS:
        return _MODELS[model_name]
    from recbole.utils import get_model as recbole_get_model

    try:
        return recbole_get_model(model_name)
    except (ValueError, AttributeError, ImportError):
        raise UnknownModelError(
            f"unknown model {model_name!r}: REVEAL models are {registered_models()}; "
            "any RecBole model name (e.g. SASRec, GRU4Rec, BERT4Rec, NARM) also works"
        ) from None


def get_trainer(model_type, model_name: str) -> type:
    """Our trainer for our models; otherwise RecBole's, with the run support every run here gets."""
    if model_name in _TRAINERS:
        return _TRAINERS[model_name]
    from recbole.utils import get_trainer as recbole_get_trainer

    from reveal_recbole.trainer.base import extended_trainer

    return extended_trainer(recbole_get_trainer(model_type, model_name))


def get_dataset_class(config) -> type:
    """``<Model>Dataset`` if one is registered or RecBole has one, else RecBole's class for the model type."""
    if config["model"] in _DATASETS:
        return _DATASETS[config["model"]]
    from recbole.utils import ModelType

    module = importlib.import_module("recbole.data.dataset")
    if hasattr(module, config["model"] + "Dataset"):
        return getattr(module, config["model"] + "Dataset")
    by_type = {ModelType.SEQUENTIAL: "SequentialDataset", ModelType.KNOWLEDGE: "KnowledgeBasedDataset"}
    return getattr(module, by_type.get(config["MODEL_TYPE"], "Dataset"))
