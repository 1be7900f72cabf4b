"""Every reach into RecBole's internals, in one module, for the one RecBole version it was written against.

A RecBole upgrade should touch this file and nothing else. The package extends RecBole by
subclassing (``Config``, the trainers, the dataset class) and reaches past its public API only here:

1. :func:`publish_model`: a REVEAL model, its dataset class and trainer are added to RecBole's own
   lookups (a ``recbole.model.sequential_recommender.<name>`` module alias, ``recbole.data.dataset.
   <Model>Dataset``, ``recbole.trainer.<Model>Trainer``), so ``run_recbole``, ``objective_function`` and
   ``HyperTuning`` find them by name. :func:`dataset_class_in_use`: RecBole's ``create_dataset`` builds
   our dataset class for a model that keeps a RecBole name (the feature peers' ``SASRecF``), which is
   published nowhere in RecBole, so RecBole's own runs of its ``SASRecF`` stay RecBole's.
2. :func:`add_defaults_to_recbole_config`: RecBole's own ``Config`` loads the REVEAL models' yaml
   defaults (``_load_internal_config_dict``), so ``run_recbole(model="SASRecREVEAL")`` needs no
   extra keys; negative sampling follows the loss type (:func:`sampling_for_loss`).
3. :func:`load_checkpoint`: the one checkpoint-loading policy. RecBole's trainer loads its own
   checkpoints with ``torch.load``, whose ``weights_only`` default (torch >= 2.6) refuses them, and
   with ``map_location=<the GPU>``; its module sees a torch whose ``load`` is this function, to the
   CPU (no process-wide rebinding of ``torch.load``).
4. :func:`without_ddp_wrapper`: RecBole's ``Trainer.__init__`` wraps the model for DDP with
   ``device_ids=[rank]``, which only CUDA modules accept, re-broadcasting every buffer at each step;
   our trainer builds the wrapper itself. :func:`as_single_process`: a saved DDP run's config reopened
   as one process.
5. :func:`count_flops`: RecBole's FLOPs count runs ``predict`` on a sample, which some models
   assert against (SASRecCPR, GRU4RecCPR); a failure is logged, never fatal.
6. :func:`numpy_str_alias`: RecBole's ``HyperTuning.plot_hyper`` uses ``np.str`` (gone in numpy 1.24).
7. :func:`quiet_third_party_warnings`: deprecation noise from RecBole's pandas and torch.amp calls.
8. :func:`undo_recbole_anomaly_detection`: importing RecBole's models (``sine.py``) switches autograd
   anomaly detection on for the whole process.

Our trainer mixins also override these RecBole ``Trainer`` methods, checked at import by
:func:`check_recbole`: ``fit``, ``evaluate``, ``resume_checkpoint``, ``_train_epoch``,
``_valid_epoch`` and ``_save_checkpoint``.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.machinery
import inspect
import logging
import sys
import types
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import recbole
import torch

SUPPORTED_RECBOLE = "1.2.1"

# RecBole Trainer methods our mixins override, with the parameters they rely on
TRAINER_HOOKS = {
    "fit": ("train_data", "valid_data", "verbose", "saved", "show_progress", "callback_fn"),
    "evaluate": ("eval_data", "load_best_model", "model_file", "show_progress"),
    "resume_checkpoint": ("resume_file",),
    "_train_epoch": ("train_data", "epoch_idx", "loss_func", "show_progress"),
    "_valid_epoch": ("valid_data", "show_progress"),
    "_save_checkpoint": ("epoch", "verbose"),
}


def check_recbole(version: str | None = None) -> None:
    """Warn when RecBole is not the version this package supports; fail when a hook we override is gone."""
    from recbole.trainer import Trainer

    version = version or recbole.__version__
    if version != SUPPORTED_RECBOLE:
        warnings.warn(
            f"reveal-recbole supports RecBole {SUPPORTED_RECBOLE}; RecBole {version} is installed: its internals "
            f"(reveal_recbole/recbole_seam.py) may differ. Install recbole=={SUPPORTED_RECBOLE}.",
            RuntimeWarning, stacklevel=2,
        )
    for name, params in TRAINER_HOOKS.items():
        method = getattr(Trainer, name, None)
        missing = [] if method is None else [p for p in params if p not in inspect.signature(method).parameters]
        if method is None or missing:
            raise ImportError(
                f"RecBole {version}'s Trainer.{name} lacks {missing or 'the method'}: reveal-recbole needs "
                f"RecBole {SUPPORTED_RECBOLE} (pip install recbole=={SUPPORTED_RECBOLE})"
            )


# ----------------------------------------------------------------------------- 1. lookups
def publish_model(model_class: type, dataset_class: type | None = None, trainer_class: type | None = None) -> str:
    """Make ``model_class`` (with its dataset class and trainer) visible to RecBole's lookups.

    Returns the alias module's name, which is also what the class's ``__module__`` should be so
    that checkpoints can pickle it. A subclass under one of RecBole's own model names (the feature
    peers' ``SASRecF``) is not published: RecBole's lookups keep RecBole's model, dataset class and
    trainer (our lookups and :func:`dataset_class_in_use` find ours).
    """
    name = model_class.__name__
    alias = f"recbole.model.sequential_recommender.{name.lower()}"
    if hasattr(importlib.import_module("recbole.model.sequential_recommender"), name):
        return alias
    module = types.ModuleType(alias, f"RecBole alias of {name}")
    module.__spec__ = importlib.machinery.ModuleSpec(alias, None)  # RecBole's get_model uses find_spec
    setattr(module, name, model_class)
    sys.modules[alias] = module
    if dataset_class is not None:
        setattr(importlib.import_module("recbole.data.dataset"), f"{name}Dataset", dataset_class)
    if trainer_class is not None:
        setattr(importlib.import_module("recbole.trainer"), f"{name}Trainer", trainer_class)
    return alias


@contextlib.contextmanager
def dataset_class_in_use(model_name: str, dataset_class: type) -> Iterator[None]:
    """Within the block, RecBole's ``create_dataset`` builds (and caches) ``dataset_class`` for ``model_name``.

    RecBole picks the class by ``<model>Dataset`` in ``recbole.data.dataset``; a model that keeps a
    RecBole name (the feature peers) is not published there (:func:`publish_model`), so its class is
    put in place for the one call and the previous binding restored. A no-op when RecBole would
    pick ``dataset_class`` anyway.
    """
    module = importlib.import_module("recbole.data.dataset")
    attr = f"{model_name}Dataset"
    previous = getattr(module, attr, None)
    if previous is dataset_class or previous is None and dataset_class in (module.SequentialDataset, module.Dataset):
        yield
        return
    setattr(module, attr, dataset_class)
    try:
        yield
    finally:
        if previous is None:
            delattr(module, attr)
        else:
            setattr(module, attr, previous)


# ----------------------------------------------------------------------------- 2. RecBole's Config
RECBOLE_TRAIN_NEG_SAMPLE_ARGS = {"distribution": "uniform", "sample_num": 1, "alpha": 1.0, "dynamic": False,
                                 "candidate_num": 0}


def sampling_for_loss(config) -> None:
    """Set ``train_neg_sample_args`` from the loss type, unless the user set it.

    RecBole refuses sampling with ``CE`` and needs it for ``BPR`` (without it a BPR run dies with
    ``KeyError: 'neg_item_id'``); its defaults fit neither sequential case. ``config`` is a RecBole
    ``Config`` between loading its internal yaml and merging them with the user's keys.
    """
    if "train_neg_sample_args" in config.external_config_dict:
        return
    loss = config.external_config_dict.get("loss_type", config.internal_config_dict.get("loss_type"))
    if loss == "CE":
        config.internal_config_dict["train_neg_sample_args"] = None
    elif loss is not None:
        config.internal_config_dict["train_neg_sample_args"] = dict(RECBOLE_TRAIN_NEG_SAMPLE_ARGS)


def add_defaults_to_recbole_config(yaml_files: Callable[[str, type], Iterable[Path]],
                                   is_ours: Callable[[type], bool]) -> None:
    """After RecBole's own yaml, RecBole's ``Config`` loads ``yaml_files(model, model_class)`` for our models.

    Our ``Config`` subclass loads the same files itself; this makes RecBole's own entry points
    (``run_recbole``, ``objective_function``, ``HyperTuning``) agree with it. Installed once.
    """
    from recbole.config import Config

    original = Config._load_internal_config_dict
    if getattr(original, "reveal_defaults", False):
        return

    @functools.wraps(original)
    def load_internal_config_dict(self, model, model_class, dataset):
        original(self, model, model_class, dataset)
        if is_ours(model_class) and not getattr(self, "loads_reveal_defaults", False):
            for path in yaml_files(model, model_class):
                self._update_internal_config_dict(path)
            sampling_for_loss(self)

    load_internal_config_dict.reveal_defaults = True
    Config._load_internal_config_dict = load_internal_config_dict


# ----------------------------------------------------------------------------- 3. checkpoints
def load_checkpoint(path, map_location=None):
    """Load a RecBole or reveal-recbole checkpoint: the one way this package reads checkpoints.

    They pickle the config and optimiser state, which torch's ``weights_only=True`` default refuses.
    Unpickling runs code: load only checkpoints you wrote or trust.
    """
    return torch.load(path, map_location=map_location, weights_only=False)


def other_parameter_on(other_parameter: dict | None, device) -> dict | None:
    """A checkpoint's ``other_parameter`` with its tensors on ``device``.

    Checkpoints load to the CPU (``load_state_dict`` then copies each tensor onto the model's
    device; loading onto the GPU would hold a second copy of every table until it ends), but
    ``load_other_parameter`` sets these attributes as given, so they must be on the model's device.
    """
    if other_parameter is None:
        return None
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in other_parameter.items()}


def load_checkpoint_for(path, device):
    """A RecBole checkpoint for a model on ``device``: tensors on the CPU, ``other_parameter`` on ``device``."""
    checkpoint = load_checkpoint(path, map_location="cpu")
    if isinstance(checkpoint, dict) and checkpoint.get("other_parameter") is not None:
        checkpoint["other_parameter"] = other_parameter_on(checkpoint["other_parameter"], device)
    return checkpoint


class _TorchWithCheckpointLoader(types.ModuleType):
    """``torch`` as RecBole's trainer module sees it: every attribute torch's, ``load`` ours (to the CPU)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(path, map_location=None):
        """RecBole passes ``map_location=self.device``: the checkpoint goes to the CPU instead."""
        return load_checkpoint_for(path, map_location or "cpu")


def route_recbole_checkpoint_loads() -> None:
    """RecBole's ``evaluate(load_best_model=True)`` and ``resume_checkpoint`` load via :func:`load_checkpoint`."""
    module = importlib.import_module("recbole.trainer.trainer")
    if not isinstance(module.torch, _TorchWithCheckpointLoader):
        module.torch = _TorchWithCheckpointLoader("torch")


# ----------------------------------------------------------------------------- 4. DDP wrapper
@contextlib.contextmanager
def without_ddp_wrapper(config) -> Iterator[None]:
    """Hide DDP from RecBole's trainer constructor, which would build its own wrapper (see ``trainer.base``)."""
    config["single_spec"] = True
    try:
        yield
    finally:
        config["single_spec"] = False


def as_single_process(config) -> None:
    """Give ``config`` (saved by a DDP rank) RecBole's single-process keys, so no process group is expected."""
    config["single_spec"] = True
    config["local_rank"] = 0


# ----------------------------------------------------------------------------- 5. FLOPs
def count_flops(model, dataset, device, logger, transform) -> float | None:
    """RecBole's FLOPs count, or None (with a warning) when the model cannot be profiled that way."""
    from recbole.utils import get_flops

    try:
        return get_flops(model, dataset, device, logger, transform)
    except Exception as error:  # a diagnostic: never worth losing the run for
        logger.warning(f"FLOPs not counted for {type(model).__name__}: {type(error).__name__}: {error}")
        return None


# ----------------------------------------------------------------------------- 6. hyper tuning plot
@contextlib.contextmanager
def numpy_str_alias() -> Iterator[None]:
    """RecBole 1.2.1's ``plot_hyper`` uses ``np.str``, which numpy 1.24 removed; lend it for the call."""
    had_alias = "str" in np.__dict__
    if not had_alias:
        np.str = str
    try:
        yield
    finally:
        if not had_alias:
            del np.str


# ----------------------------------------------------------------------------- 7. console noise
def quiet_third_party_warnings() -> None:
    """Hide deprecation warnings that RecBole's own calls raise in pandas and torch.amp (our own stay).

    Called by the command-line entry points only: a library user keeps Python's defaults.
    """
    for module in ("recbole", "pandas", "torch.cuda.amp", "torch.amp"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.GradScaler.*deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    logging.getLogger("numexpr").setLevel(logging.WARNING)


# ----------------------------------------------------------------------------- 8. a debugging switch left on
def undo_recbole_anomaly_detection() -> None:
    """Switch off the autograd anomaly detection that RecBole 1.2.1's ``sine.py`` turns on when imported.

    RecBole imports every model, so every run (baselines included) paid for it: each backward checks
    every gradient for NaN (17 full passes over the item tables per REVEAL step, 16 % of a step at
    100k items) and each forward op records a Python traceback. ``torch.autograd.set_detect_anomaly(True)``
    after importing reveal_recbole turns it back on for debugging; a NaN loss still stops RecBole's trainer.
    """
    importlib.import_module("recbole.model.sequential_recommender")  # sine.py runs its switch now, not later
    torch.autograd.set_detect_anomaly(False)


check_recbole()  # at import: every module that reaches into RecBole imports this one first
route_recbole_checkpoint_loads()
undo_recbole_anomaly_detection()
