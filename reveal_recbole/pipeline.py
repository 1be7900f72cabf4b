"""The one setup sequence every entry point, the FVE loop, the tests and the benchmarks use.

It is ``recbole.quick_start.run_recbole``'s order: seed, dataset, split, seed again (plus the
DDP rank), model, trainer. Written once so that every way of running a model builds it the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from recbole.data import data_preparation
from recbole.utils import init_seed

from reveal_recbole.data import create_dataset
from reveal_recbole.ranking import size_eval_batch
from reveal_recbole.recbole_seam import load_checkpoint
from reveal_recbole.registry import get_model, get_trainer


@dataclass
class PreparedRun:
    """Everything ``run_recbole`` builds before ``fit``."""

    config: Any
    dataset: Any
    train_data: Any
    valid_data: Any
    test_data: Any
    model: Any
    trainer: Any


def prepare_data(config, dataset=None) -> tuple[Any, Any, Any, Any]:
    """Seed, then the dataset (``create_dataset`` unless one is given) and RecBole's split."""
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config) if dataset is None else dataset
    size_eval_batch(config, dataset.item_num)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    return dataset, train_data, valid_data, test_data


def build_model(config, train_data, checkpoint: dict | None = None):
    """The configured model on the training split, seeded per DDP rank as RecBole does, ``checkpoint`` loaded."""
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    if checkpoint is not None:
        model.load_state_dict(checkpoint["state_dict"])
        model.load_other_parameter(checkpoint.get("other_parameter"))
    return model


def build_trainer(config, model):
    return get_trainer(config["MODEL_TYPE"], config["model"])(config, model)


def prepare_run(config, dataset=None, checkpoint: dict | None = None) -> PreparedRun:
    """Data, model and trainer for ``config`` (a :class:`~reveal_recbole.config.Config`)."""
    dataset, train_data, valid_data, test_data = prepare_data(config, dataset)
    model = build_model(config, train_data, checkpoint)
    return PreparedRun(config, dataset, train_data, valid_data, test_data, model, build_trainer(config, model))


def load_run(model_file) -> PreparedRun:
    """Rebuild config, data, model (with its weights) and trainer from a checkpoint we saved (trusted files only)."""
    checkpoint = load_checkpoint(model_file, map_location="cpu")
    return prepare_run(checkpoint["config"], checkpoint=checkpoint)
