"""Lookups that resolve reveal-recbole's models, datasets and trainers first, then RecBole's.

Registration also publishes each REVEAL model to RecBole's own lookups (``recbole.utils.get_model``,
``recbole.data.create_dataset``, ``recbole.utils.get_trainer``), so ``run_recbole``,
``objective_function`` and ``HyperTuning`` accept our model names too.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.machinery
import os
import sys
import tempfile
import types
from pathlib import Path
from typing import Iterator

import torch

from reveal_recbole.errors import UnknownModelError

PACKAGE_DIR = Path(__file__).resolve().parent

_UMASK = os.umask(0)
os.umask(_UMASK)

_MODELS: dict[str, type] = {}
_DATASETS: dict[str, type] = {}
_TRAINERS: dict[str, type] = {}


def properties_dir() -> Path:
    """The ``properties/`` folder: inside the package when installed as a wheel, beside it in a checkout."""
    for candidate in (PACKAGE_DIR / "properties", PACKAGE_DIR.parent / "properties"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"reveal-recbole's properties/ folder was not found next to {PACKAGE_DIR}; "
        "install the package from its source tree with `pip install -e .`"
    )


def bundled_datasets_dir() -> Path:
    return PACKAGE_DIR / "dataset_example"


def register_model(model_class: type, dataset_class: type | None = None, trainer_class: type | None = None) -> type:
    """Make ``model_class`` visible to our lookups and to RecBole's, under its class name."""
    name = model_class.__name__
    _MODELS[name] = model_class
    alias = f"recbole.model.sequential_recommender.{name.lower()}"
    module = types.ModuleType(alias, f"RecBole alias of {model_class.__module__}.{name}")
    module.__spec__ = importlib.machinery.ModuleSpec(alias, None)
    setattr(module, name, model_class)
    sys.modules[alias] = module
    if dataset_class is not None:
        _DATASETS[name] = dataset_class
        setattr(importlib.import_module("recbole.data.dataset"), f"{name}Dataset", dataset_class)
    if trainer_class is not None:
        _TRAINERS[name] = trainer_class
        setattr(importlib.import_module("recbole.trainer"), f"{name}Trainer", trainer_class)
    return model_class


def registered_models() -> list[str]:
    return sorted(_MODELS)


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
    """Our trainer for our models; otherwise RecBole's, extended by ``reveal_recbole.trainer.base``."""
    if model_name in _TRAINERS:
        return _TRAINERS[model_name]
    from recbole.utils import get_trainer as recbole_get_trainer

    from reveal_recbole.trainer.base import extend_trainer

    return extend_trainer(recbole_get_trainer(model_type, model_name))


def get_dataset_class(config) -> type:
    if config["model"] in _DATASETS:
        return _DATASETS[config["model"]]
    from recbole.utils import ModelType

    module = importlib.import_module("recbole.data.dataset")
    if hasattr(module, config["model"] + "Dataset"):
        return getattr(module, config["model"] + "Dataset")
    by_type = {ModelType.SEQUENTIAL: "SequentialDataset", ModelType.KNOWLEDGE: "KnowledgeBasedDataset"}
    return getattr(module, by_type.get(config["MODEL_TYPE"], "Dataset"))


@contextlib.contextmanager
def trusted_torch_load():
    """Let RecBole's own ``torch.load`` calls read full checkpoints under torch >= 2.6.

    RecBole checkpoints pickle the config and optimiser state, which the ``weights_only=True``
    default of torch >= 2.6 refuses. Only use this for checkpoints you wrote or trust:
    unpickling runs code.
    """
    original = torch.load
    torch.load = functools.partial(original, weights_only=False)
    try:
        yield
    finally:
        torch.load = original


@functools.lru_cache(maxsize=None)
def with_trusted_checkpoints(trainer_class: type) -> type:
    """A subclass of a RecBole trainer whose best-model reload and resume work under torch >= 2.6."""

    class TrustedCheckpointTrainer(trainer_class):
        def evaluate(self, *args, **kwargs):
            with trusted_torch_load():
                return super().evaluate(*args, **kwargs)

        def resume_checkpoint(self, resume_file):
            with trusted_torch_load():
                return super().resume_checkpoint(resume_file)

    TrustedCheckpointTrainer.__name__ = trainer_class.__name__
    TrustedCheckpointTrainer.__qualname__ = trainer_class.__qualname__
    return TrustedCheckpointTrainer


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path in ``path``'s folder to write to; when the block ends, the file is synced
    and renamed to ``path`` (readers never see half a file), or removed if the block raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_target`)."""
    with atomic_target(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
