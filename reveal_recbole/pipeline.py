"""The one setup sequence every entry point, the FVE loop, the tests and the benchmarks use.

It is ``recbole.quick_start.run_recbole``'s order: seed, dataset, split, seed again (plus the
DDP rank), model, trainer. Written once so that every way of running a model builds it the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from logging import getLogger
from typing import Any

import torch
from recbole.data import data_preparation
from recbole.utils import init_seed

from reveal_recbole import recbole_seam
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
    size_eval_batch(config, dataset.item_num, getattr(get_model(config["model"]), "eval_score_buffers", 1))
    train_data, valid_data, test_data = data_preparation(config, dataset)
    return dataset, train_data, valid_data, test_data


def build_model(config, train_data, checkpoint: dict | None = None):
    """The configured model on the training split, seeded per DDP rank as RecBole does, ``checkpoint`` loaded."""
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    if checkpoint is not None:
        model.load_state_dict(checkpoint["state_dict"])
        model.load_other_parameter(recbole_seam.other_parameter_on(checkpoint.get("other_parameter"), config["device"]))
    return model


def build_trainer(config, model):
    return get_trainer(config["MODEL_TYPE"], config["model"])(config, model)


def prepare_run(config, dataset=None, checkpoint: dict | None = None) -> PreparedRun:
    """Data, model and trainer for ``config`` (a :class:`~reveal_recbole.config.Config`)."""
    dataset, train_data, valid_data, test_data = prepare_data(config, dataset)
    model = build_model(config, train_data, checkpoint)
    return PreparedRun(config, dataset, train_data, valid_data, test_data, model, build_trainer(config, model))


HOST_KEYS = ("single_spec", "local_rank", "device", "use_gpu", "gpu_id")


def on_this_host(config) -> dict[str, tuple[Any, Any]]:
    """Make a saved run's config one process on this host's device; return the changes, ``{key: (saved, now)}``.

    A checkpoint keeps the config of the run that saved it: a DDP rank's ``single_spec: False`` and
    rank, a GPU run's ``device`` and ``gpu_id``. Reopened as they are, RecBole expects a process
    group that does not exist, or a GPU this host may lack. The run stays on CUDA (torch's current
    device) where it used CUDA and this host has it, else it moves to the CPU.
    """
    saved = {key: config[key] for key in HOST_KEYS}
    cuda = saved["device"].type == "cuda" and torch.cuda.is_available()
    recbole_seam.as_single_process(config)
    config["device"] = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        config["use_gpu"], config["gpu_id"] = False, ""
    return {key: (saved[key], config[key]) for key in HOST_KEYS if saved[key] != config[key]}


def load_run(model_file) -> PreparedRun:
    """Rebuild config, data, model (with its weights) and trainer from a checkpoint we saved (trusted files only).

    The run is rebuilt as one process on this host (:func:`on_this_host`), whatever host and
    processes saved it; what that changes is logged.
    """
    checkpoint = load_checkpoint(model_file, map_location="cpu")
    config = checkpoint["config"]
    changes = on_this_host(config)
    if changes:
        getLogger().info(f"{model_file} reopened as one process on this host: "
                         + ", ".join(f"{key} {saved!r} -> {now!r}" for key, (saved, now) in changes.items()))
    return prepare_run(config, checkpoint=checkpoint)
