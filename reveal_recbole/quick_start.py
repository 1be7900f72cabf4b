"""``run_reveal`` mirrors ``recbole.quick_start.run_recbole``; ``compare`` runs several models on one split."""
from __future__ import annotations

import csv
import io
import sys
import time
from logging import getLogger
from pathlib import Path

import torch
from recbole.data import data_preparation
from recbole.data.transform import construct_transform
from recbole.utils import get_flops, init_logger, init_seed, set_color

from reveal_recbole.config import Config
from reveal_recbole.data import create_dataset
from reveal_recbole.diagnostics import plot_diagnostics, visual_utilisation
from reveal_recbole.utils import atomic_write_text, get_model, get_trainer

REPORT_METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")


def run_reveal(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True):
    """Train and evaluate one model, as ``run_recbole`` does; returns the same dict."""
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)

    dataset = create_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    logger.info(model)
    transform = construct_transform(config)
    flops = get_flops(model, dataset, config["device"], logger, transform)
    logger.info(set_color("FLOPs", "blue") + f": {flops}")

    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"]
    )
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])

    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    result = {
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
    }
    if config["visual_utilisation"] and getattr(model.item_embedding, "modalities", ()):
        result["utilisation"] = report_utilisation(config, trainer, test_data, saved)
    return result


def report_utilisation(config, trainer, test_data, saved: bool) -> dict:
    """Test metrics with each modality masked, logged and (when saved) drawn next to the checkpoint."""
    utilisation = visual_utilisation(trainer, test_data)
    getLogger().info(set_color("visual utilisation (test, drop when masked)", "yellow") + f": {utilisation['drop']}")
    if saved and config["diagnostics_figure"]:
        avl_csv = getattr(trainer, "avl_csv_file", None)
        figure = Path(trainer.saved_model_file).with_suffix(".diagnostics.png")
        plot_diagnostics(avl_csv if avl_csv and Path(avl_csv).is_file() else None, utilisation, figure)
        getLogger().info(f"diagnostics figure: {figure}")
    return utilisation


def load_data_and_model(model_file):
    """Rebuild config, data and model from a checkpoint we saved (unpickling runs code: trusted files only)."""
    checkpoint = torch.load(model_file, map_location="cpu", weights_only=False)
    config = checkpoint["config"]
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model, dataset, train_data, valid_data, test_data


def objective_function(config_dict=None, config_file_list=None, saved=True):
    """``run_reveal`` for RecBole's ``HyperTuning``: same signature and return as RecBole's."""
    config = Config(config_dict=config_dict, config_file_list=config_file_list)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    best_valid_score, best_valid_result = trainer.fit(train_data, valid_data, verbose=False, saved=saved)
    test_result = trainer.evaluate(test_data, load_best_model=saved)
    return {
        "model": config["model"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
    }


def comparison_table(results: dict[str, dict], metrics=REPORT_METRICS) -> list[list[str]]:
    """Rows of model, test metrics and train time, best value per metric marked with ``*``."""
    best = {m: max(float(r["test_result"].get(m, float("-inf"))) for r in results.values()) for m in metrics}
    rows = [["model", *metrics, "train_s"]]
    for name, result in results.items():
        cells = []
        for metric in metrics:
            value = float(result["test_result"].get(metric, float("nan")))
            cells.append(f"{value:.4f}" + ("*" if value == best[metric] else ""))
        rows.append([name, *cells, f"{result.get('train_seconds', float('nan')):.1f}"])
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines) + "\n"


def compare(models, dataset, config_file_list=None, config_dict=None, output_dir="results", saved=True):
    """Run each model on the same dataset, config, split and seed; print and save one test-metric table."""
    results = {}
    for model in models:
        start = time.perf_counter()
        results[model] = run_reveal(model, dataset, config_file_list, dict(config_dict or {}), saved=saved)
        results[model]["train_seconds"] = time.perf_counter() - start
    rows = comparison_table(results)
    output = Path(output_dir)
    stem = output / f"compare-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    atomic_write_text(stem.with_suffix(".md"), markdown_table(rows))
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    atomic_write_text(stem.with_suffix(".csv"), buffer.getvalue())
    print(markdown_table(rows))
    print(f"saved {stem.with_suffix('.md')} and {stem.with_suffix('.csv')}")
    return results, rows
