"""A thin RecBole ``Config`` that resolves reveal-recbole's models and yaml files first.

Internal defaults load in this order (later wins), then files, dicts and the command line
override them exactly as in RecBole:

1. RecBole's own overall/model/dataset/quick-start yaml (for ``XREVEAL``: the backbone X's yaml);
2. ``properties/overall.yaml``: the shared protocol (split, metrics, training), for every model,
   so baselines and REVEAL models run on the same data, split and seed;
3. ``properties/reveal_base.yaml`` (REVEAL models), then ``properties/model/<Model>.yaml`` (our models);
4. ``properties/dataset/<dataset>.yaml``.

``train_neg_sample_args`` follows ``loss_type`` unless given (``recbole_seam.sampling_for_loss``).
After ``import reveal_recbole``, RecBole's own ``Config`` loads steps 1-3 for our models too.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
import yaml
from recbole.config import Config as RecBoleConfig

from reveal_recbole import recbole_seam
from reveal_recbole.distributed import init_cpu_process_group, uses_cuda
from reveal_recbole.errors import ConfigError
from reveal_recbole.registry import get_model, is_registered
from reveal_recbole.resources import bundled_datasets_dir, properties_dir


def backbone_of(model_class) -> type | None:
    """The RecBole backbone a registered REVEAL model wraps (None for any other model)."""
    return getattr(model_class, "backbone", None) if is_registered(model_class) else None


def recbole_model_yaml(model_class) -> Path:
    import recbole

    return Path(recbole.__file__).parent / "properties" / "model" / f"{model_class.__name__}.yaml"


def reveal_yaml_files(model_name: str, model_class) -> list[Path]:
    """The yaml files ``Config`` adds after RecBole's own, in load order (missing files skipped).

    For ``XREVEAL``: backbone X's RecBole yaml, then ``overall.yaml``, ``reveal_base.yaml`` and
    ``model/<Model>.yaml``; for our other models (FeatureKNN) ``overall.yaml`` and ``model/<Model>.yaml``;
    for RecBole's just ``overall.yaml``.
    """
    props = properties_dir()
    backbone = backbone_of(model_class)
    files = [props / "overall.yaml"]
    if backbone is not None:
        files = [recbole_model_yaml(backbone), *files, props / "reveal_base.yaml"]
    if is_registered(model_class):
        files.append(props / "model" / f"{model_name}.yaml")
    return [f for f in files if f.is_file()]


class Config(RecBoleConfig):
    """RecBole's Config, resolving our models and loading our properties/ yaml files."""

    loads_reveal_defaults = True  # RecBole's own Config gets them from recbole_seam; this class loads them itself

    def _load_config_files(self, file_list):
        """RecBole's loader, after checking each file exists and parses, so errors name the file."""
        for path in file_list or []:
            if not os.path.isfile(path):
                raise ConfigError(f"config file not found: {path}")
            try:
                with open(path, encoding="utf-8") as handle:
                    yaml.load(handle.read(), Loader=self.yaml_loader)
            except yaml.YAMLError as error:
                raise ConfigError(f"{path}: not valid yaml: {error}") from None
        return super()._load_config_files(file_list)

    def _get_model_and_dataset(self, model, dataset):
        if isinstance(model, str) or model is None:
            model = model or self.external_config_dict.get("model")
            if model is None:
                raise KeyError("model must be given: argument, config file, config dict or --model on the command line")
            model = get_model(model)
        return super()._get_model_and_dataset(model, dataset)

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        for path in reveal_yaml_files(model, model_class):
            self._update_internal_config_dict(path)
        dataset_file = properties_dir() / "dataset" / f"{dataset}.yaml"
        if dataset_file.is_file():
            loaded = self._update_internal_config_dict(dataset_file) or {}
            self.parameters["Dataset"] += [k for k in loaded if k not in self.parameters["Dataset"]]
        recbole_seam.sampling_for_loss(self)

    def _set_default_parameters(self):
        super()._set_default_parameters()
        if self.final_config_dict.get("show_progress") is None:  # progress bars where someone watches
            self.final_config_dict["show_progress"] = sys.stderr.isatty()
        bundled = bundled_datasets_dir() / self.dataset
        if "data_path" not in self.external_config_dict and bundled.is_dir():
            self.final_config_dict["data_path"] = str(bundled)
        else:
            self.final_config_dict["data_path"] = os.path.expanduser(self.final_config_dict["data_path"])

    def _init_device(self):
        """RecBole's device set-up; a multi-process run without GPUs joins a gloo group (NCCL needs CUDA).

        ``uses_cuda`` sets ``CUDA_VISIBLE_DEVICES`` from ``gpu_id`` before it asks torch about CUDA:
        asked first, CUDA would keep every GPU visible and rank r would run on physical GPU r.
        """
        if "local_rank" in self.final_config_dict and not uses_cuda(self.final_config_dict):
            init_cpu_process_group(self.final_config_dict)
        else:
            super()._init_device()
        if self.final_config_dict["device"].type == "cpu" and self._gpu_requested():
            # RecBole falls back to the CPU silently; a GPU the user asked for by name deserves a word
            warnings.warn(
                f"use_gpu/gpu_id ask for CUDA device {self.final_config_dict['gpu_id']!r}, but torch sees no CUDA "
                f"device (torch {torch.__version__}, cuda available: {torch.cuda.is_available()}): running on CPU",
                RuntimeWarning, stacklevel=2,
            )

    def _gpu_requested(self) -> bool:
        """The user (a file, dict or command line, not RecBole's defaults) set use_gpu: True or a gpu_id."""
        given = user_given(self)
        return bool(given.get("use_gpu", "gpu_id" in given)) and str(given.get("gpu_id", "0")).strip() != ""


def user_given(config) -> dict:
    """The keys a RecBole config holds because the user gave them (config files, the config dict, the
    command line), not from RecBole's or this package's yaml defaults."""
    return {**config.file_config_dict, **config.variable_config_dict, **config.cmd_config_dict}


def known_datasets() -> dict[str, str]:
    """Dataset names with a properties yaml or a bundled copy, and where each comes from."""
    names = {p.stem: "needs dataset_prep" for p in (properties_dir() / "dataset").glob("*.yaml")}
    names.update({p.name: "bundled" for p in bundled_datasets_dir().iterdir() if p.is_dir()})
    return dict(sorted(names.items()))


recbole_seam.add_defaults_to_recbole_config(reveal_yaml_files, is_ours=is_registered)
