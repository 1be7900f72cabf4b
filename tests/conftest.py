"""Shared fixtures: a tiny real subset of the bundled Scientific set and a tiny, fast config.

Every run writes only under pytest's tmp_path (data, checkpoints, RecBole's ./log and
./log_tensorboard), never into the repository.
"""
from __future__ import annotations

import importlib.util
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import reveal_recbole  # noqa: F401  (registers the REVEAL models with RecBole)
from reveal_recbole.data import ItemFeatures, write_item_features
from reveal_recbole.resources import bundled_datasets_dir

TINY_USERS = 150
DATASET = "scientific"
MODALITIES = ("image", "text")
REPORT_METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")


def _read_tiny_subset() -> tuple[list[str], dict[str, tuple[list[str], np.ndarray]]]:
    """The first TINY_USERS users' interaction lines and the feature rows of their items."""
    source = bundled_datasets_dir() / DATASET
    lines = (source / f"{DATASET}.inter").read_text(encoding="utf-8").splitlines()
    header, body = lines[0], lines[1:]
    users, kept = [], []
    for line in body:
        user = line.split("\t", 1)[0]
        if not users or users[-1] != user:
            if len(users) == TINY_USERS:
                break
            users.append(user)
        kept.append(line)
    items = {line.split("\t")[1] for line in kept}
    features = {}
    for modality in MODALITIES:
        tokens = (source / f"{DATASET}.{modality}.items").read_text(encoding="utf-8").splitlines()
        array = np.load(source / f"{DATASET}.{modality}.npy")
        rows = [i for i, token in enumerate(tokens) if token in items]
        features[modality] = ([tokens[i] for i in rows], np.asarray(array[rows], dtype=np.float32))
    return [header, *kept], features


ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """Import a script of the repository (``run_reveal``, ``benchmarks/bench_scale``: no ``.py``) as a module."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", "ignore::FutureWarning")  # RecBole's pandas/amp deprecations
    config.addinivalue_line("filterwarnings", "ignore:pkg_resources is deprecated:UserWarning")  # ray, via RecBole
    torch.set_num_threads(1)  # two shared cores: one intra-op thread avoids oversubscription


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """RecBole's Config reads ``--key=value`` from sys.argv: keep pytest's own arguments out of it."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> Path:
    """A read-only master copy of the tiny subset, written once per session."""
    inter_lines, features = _read_tiny_subset()
    root = tmp_path_factory.mktemp("tiny_source")
    folder = root / DATASET
    folder.mkdir()
    (folder / f"{DATASET}.inter").write_text("\n".join(inter_lines) + "\n", encoding="utf-8")
    for modality, (tokens, values) in features.items():
        write_item_features(folder, DATASET, modality, tokens, values)
    return root


@pytest.fixture
def tiny_data(tiny_source, tmp_path) -> Path:
    """A fresh, writable copy of the tiny subset: ``<data_path>/scientific/scientific.*``."""
    data_path = tmp_path / "data"
    shutil.copytree(tiny_source, data_path)
    return data_path


def make_tiny_config(data_path: Path, checkpoint_dir: Path) -> dict:
    """Tiny model, one epoch, quiet logs; REVEAL keys not given here keep their yaml defaults."""
    return {
        "data_path": str(data_path),
        "checkpoint_dir": str(checkpoint_dir),
        "hidden_size": 16,
        "embedding_size": 16,
        "n_layers": 1,
        "num_layers": 1,
        "n_heads": 1,
        "inner_size": 32,
        "MAX_ITEM_LIST_LENGTH": 10,
        "epochs": 1,
        "train_batch_size": 256,
        "eval_batch_size": 256,
        "show_progress": False,
        "state": "WARNING",
    }


@pytest.fixture
def tiny_config(tiny_data, tmp_path, monkeypatch) -> dict:
    """The tiny config on a fresh data copy; RecBole's log folders land in tmp_path (it writes them to the cwd)."""
    monkeypatch.chdir(tmp_path)
    return make_tiny_config(tiny_data, tmp_path / "saved")


def assert_report_metrics(test_result) -> None:
    """The four reported metrics exist, are finite and lie in [0, 1]."""
    for metric in REPORT_METRICS:
        value = float(test_result[metric])
        assert math.isfinite(value), (metric, value)
        assert 0.0 <= value <= 1.0, (metric, value)


def random_features(n_items: int, dim: int, missing=(), seed: int = 0) -> ItemFeatures:
    """Random aligned features for ``n_items`` ids; id 0 (padding) and ``missing`` ids lack a row."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(n_items, dim, generator=generator)
    present = torch.ones(n_items, dtype=torch.bool)
    present[0] = False
    for item in missing:
        present[item] = False
    values[~present] = 0.0
    return ItemFeatures(values=values, present=present, source=f"random-{seed}")
