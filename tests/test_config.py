"""Config: RecBole's backbone yaml, then our overall/reveal_base/model/dataset yaml, then user overrides."""
import os
from pathlib import Path

import pytest
import recbole
import torch
import yaml

from reveal_recbole import Config
from reveal_recbole.resources import bundled_datasets_dir, properties_dir

# RecBole rewrites these into per-split / fully spelled-out dicts after loading
EXPANDED_BY_RECBOLE = ("eval_args", "train_neg_sample_args", "show_progress")  # show_progress: ~ = auto
PROTOCOL_KEYS = ("metrics", "topk", "valid_metric", "seed", "repeatable", "MAX_ITEM_LIST_LENGTH", "load_col")


def load_yaml(config, path: Path) -> dict:
    """Read a yaml file with RecBole's loader (it parses ``1e-12`` as a float, as Config does)."""
    with open(path, encoding="utf-8") as handle:
        return yaml.load(handle, Loader=config.yaml_loader) or {}


def recbole_yaml(name: str) -> Path:
    return Path(recbole.__file__).parent / "properties" / "model" / f"{name}.yaml"


@pytest.fixture(scope="module")
def reveal_config():
    return Config(model="SASRecREVEAL", dataset="scientific")


def test_backbone_yaml_keys_are_loaded(reveal_config):
    backbone = load_yaml(reveal_config, recbole_yaml("SASRec"))
    assert {"hidden_size", "n_layers", "n_heads", "inner_size", "loss_type"} <= set(backbone)
    for key, value in backbone.items():
        assert reveal_config[key] == value, key


def test_protocol_from_overall_yaml(reveal_config):
    assert reveal_config["metrics"] == ["Recall", "NDCG"]
    assert reveal_config["topk"] == [10, 20]
    eval_args = reveal_config["eval_args"]
    assert eval_args["split"] == {"LS": "valid_and_test"}
    assert eval_args["order"] == "TO"
    assert eval_args["mode"] in ("full", {"valid": "full", "test": "full"})


def test_our_yaml_files_load_in_order(reveal_config):
    """overall -> reveal_base -> model -> dataset, later files winning, for every key they set."""
    props = properties_dir()
    expected = {}
    for path in (
        props / "overall.yaml",
        props / "reveal_base.yaml",
        props / "model" / "SASRecREVEAL.yaml",
        props / "dataset" / "scientific.yaml",
    ):
        assert path.is_file(), path
        expected.update(load_yaml(reveal_config, path))
    assert {"fusion", "modalities", "feature_trainable", "prepare_commands"} <= set(expected)
    for key, value in expected.items():
        if key not in EXPANDED_BY_RECBOLE:
            assert reveal_config[key] == value, key
    assert reveal_config["train_neg_sample_args"]["distribution"] == "none"  # CE: no negatives


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_follow_the_terminal_unless_set(tiny_config, monkeypatch, terminal):
    monkeypatch.setattr("sys.stderr.isatty", lambda: terminal)
    auto = {k: v for k, v in tiny_config.items() if k != "show_progress"}
    assert Config("SASRecREVEAL", "scientific", config_dict=auto)["show_progress"] is terminal
    assert Config("SASRecREVEAL", "scientific", config_dict={**auto, "show_progress": False})["show_progress"] is False


def test_bundled_data_path_by_default(reveal_config):
    assert Path(reveal_config["data_path"]) == bundled_datasets_dir() / "scientific"
    assert (Path(reveal_config["data_path"]) / "scientific.inter").is_file()


def test_given_data_path_wins(tmp_path):
    config = Config(model="SASRecREVEAL", dataset="scientific", config_dict={"data_path": str(tmp_path)})
    assert Path(config["data_path"]) == tmp_path / "scientific"


def test_config_dict_overrides_win():
    overrides = {"fusion": "gated", "hidden_size": 8, "epochs": 3, "topk": [5], "modalities": ["text"]}
    config = Config(model="SASRecREVEAL", dataset="scientific", config_dict=overrides)
    for key, value in overrides.items():
        assert config[key] == value, key


def test_baseline_gets_the_same_protocol(reveal_config):
    baseline = Config(model="SASRec", dataset="scientific")
    for key in PROTOCOL_KEYS + ("eval_args", "epochs", "train_batch_size", "learning_rate", "data_path"):
        assert baseline[key] == reveal_config[key], key
    assert baseline["fusion"] is None and baseline["modalities"] is None  # no REVEAL keys for a baseline
    assert baseline["hidden_size"] == load_yaml(baseline, recbole_yaml("SASRec"))["hidden_size"]


def test_model_is_required():
    with pytest.raises(KeyError, match="model"):
        Config(dataset="scientific")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_gpu_requested_on_a_cpu_only_machine_warns_and_runs_on_cpu(recwarn):
    quiet = Config(model="SASRec", dataset="scientific")
    assert quiet.final_config_dict["device"].type == "cpu"
    assert not [w for w in recwarn if "CUDA" in str(w.message)]  # RecBole's defaults alone: no warning

    with pytest.warns(RuntimeWarning, match="no CUDA device .*running on CPU"):
        config = Config(model="SASRec", dataset="scientific", config_dict={"use_gpu": True, "gpu_id": "0"})
    assert config.final_config_dict["device"].type == "cpu"


def test_eval_batch_size_is_sized_to_the_catalogue_unless_given(tiny_config, caplog):
    import logging

    from reveal_recbole.pipeline import prepare_data

    keys = {key: value for key, value in tiny_config.items() if key != "eval_batch_size"}
    keys["eval_score_budget_mb"] = 0.05  # 52,428 bytes: a few users of this catalogue
    config = Config(model="SASRec", dataset="scientific", config_dict=keys)
    with caplog.at_level(logging.INFO):
        dataset, _, valid_data, test_data = prepare_data(config)
    expected = int(0.05 * 2**20) // (4 * dataset.item_num)
    assert 1 < expected < 4096 and config["eval_batch_size"] == valid_data.step == test_data.step == expected
    assert f"eval_batch_size {expected} (sized to the catalogue: 4096 users x {dataset.item_num:,} items" in caplog.text

    given = Config(model="SASRec", dataset="scientific", config_dict=keys | {"eval_batch_size": 300})
    assert prepare_data(given)[2].step == given["eval_batch_size"] == 300


DDP_RANK_1 = {"local_rank": 1, "nproc": 2, "world_size": 2, "offset": 0, "ip": "localhost", "port": "1"}


@pytest.mark.parametrize("processes, device", [({}, torch.device("cuda")), (DDP_RANK_1, torch.device("cuda", 1))])
def test_gpu_id_is_made_visible_before_cuda_is_first_asked(monkeypatch, processes, device):
    """Before: a DDP rank asked ``torch.cuda.is_available()`` before RecBole set ``CUDA_VISIBLE_DEVICES``.

    CUDA reads the variable when first asked, so every GPU stayed visible and rank 1 ran on
    physical GPU 1. Here every CUDA query sees ``gpu_id`` already, and rank 1's ``cuda:1`` is the
    second GPU of ``gpu_id``: physical GPU 3.
    """
    import torch.distributed as dist

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored after the test (RecBole sets it)
    visible_when_asked, current = [], []

    def cuda_is_available() -> bool:  # a GPU host's answer, noting which GPUs CUDA would see
        visible_when_asked.append(os.environ["CUDA_VISIBLE_DEVICES"])
        return True

    monkeypatch.setattr(torch.cuda, "is_available", cuda_is_available)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: None)  # RecBole's NCCL group
    config = Config(model="SASRec", dataset="scientific", config_dict={"gpu_id": "2,3"} | processes)
    assert visible_when_asked and set(visible_when_asked) == {"2,3"}
    assert config["device"] == device
    assert current == ([1] if processes else [])
