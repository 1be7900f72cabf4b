"""run_hyper.py: RecBole's HyperTuning over our objective_function, on a 2-point space of the tiny set."""
from __future__ import annotations

from pathlib import Path

import yaml

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_example_params_files_parse():
    from recbole.trainer import HyperTuning

    for path in sorted((ROOT / "properties" / "hyper").glob("*.hyper")):
        space = HyperTuning._build_space_from_file(str(path))
        assert space, path
    grid = HyperTuning._build_space_from_file(str(ROOT / "properties" / "hyper" / "SASRecREVEAL-grid.hyper"))
    assert {"fusion", "feature_trainable", "avl_alpha", "learning_rate", "feature_dropout"} <= set(grid)


def test_run_hyper_exhaustive_two_points(tiny_config, tmp_path):
    config_file = tmp_path / "tune.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config | {"model": "SASRecREVEAL", "dataset": "scientific"}))
    params_file = tmp_path / "two.hyper"
    params_file.write_text("fusion choice ['sum','gated']\n")
    output = tmp_path / "hyper.result"

    hp = load_script("run_hyper").main([
        f"--config_files={config_file}", f"--params_file={params_file}",
        f"--output_file={output}", "--algo=exhaustive",
    ])

    assert len(hp.params2result) == 2
    text = output.read_text()
    assert text.count("Valid result:") == 2 and text.count("Test result:") == 2
    assert "fusion:sum" in text and "fusion:gated" in text
    for result in hp.params2result.values():
        assert result["model"] == "SASRecREVEAL"
        assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0


def test_results_of_finished_trials_survive_a_crash(tiny_config, tmp_path, monkeypatch):
    import pytest

    import reveal_recbole.quick_start as quick_start

    script = load_script("run_hyper")
    trials = []

    def objective(config_dict=None, config_file_list=None, saved=True):
        trials.append(config_dict)
        if len(trials) == 2:
            raise KeyboardInterrupt  # killed during the second trial
        return quick_start.objective_function(config_dict, config_file_list, saved)

    monkeypatch.setattr(script, "objective_function", objective)
    config_file = tmp_path / "tune.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config | {"model": "SASRecREVEAL", "dataset": "scientific"}))
    params_file = tmp_path / "two.hyper"
    params_file.write_text("fusion choice ['sum','gated']\n")
    output = tmp_path / "hyper.result"
    with pytest.raises(KeyboardInterrupt):
        script.main([f"--config_files={config_file}", f"--params_file={params_file}", f"--output_file={output}"])
    text = output.read_text()
    assert text.count("Test result:") == 1 and f"fusion:{trials[0]['fusion']}" in text
    assert not list(tmp_path.glob(".*.tmp"))


def test_seeds_run_each_trial_once_per_seed_and_score_it_by_the_mean(tmp_path, monkeypatch):
    """--seeds: every trial runs at each seed; its score, valid and test results are the means over them."""
    script = load_script("run_hyper")
    calls = []

    def objective(config_dict=None, config_file_list=None, saved=True):
        calls.append((config_dict["learning_rate"], config_dict["seed"]))
        score = config_dict["learning_rate"] + config_dict["seed"] / 1000  # seeds 1, 2 -> +.001, +.002
        return {"model": "SASRec", "best_valid_score": score, "valid_score_bigger": True,
                "best_valid_result": {"ndcg@10": score}, "test_result": {"ndcg@10": score / 2}}

    monkeypatch.setattr(script, "objective_function", objective)
    params_file = tmp_path / "lr.hyper"
    params_file.write_text("learning_rate choice [0.01,0.02]\n")
    output = tmp_path / "hyper.result"
    hp = script.main([f"--params_file={params_file}", f"--output_file={output}", "--algo=exhaustive",
                      "--seeds=1,2"])
    assert sorted(calls) == [(0.01, 1), (0.01, 2), (0.02, 1), (0.02, 2)]
    assert hp.best_params == {"learning_rate": 0.02}
    best = hp.params2result[hp.params2str(hp.best_params)]
    assert best["best_valid_result"]["ndcg@10"] == 0.0215 and best["test_result"]["ndcg@10"] == round(0.0215 / 2, 4)
    assert "ndcg@10 : 0.0215" in output.read_text()
