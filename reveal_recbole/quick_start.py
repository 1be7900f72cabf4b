"""``run_reveal`` mirrors ``recbole.quick_start.run_recbole`` and ``run`` its multi-process ``run``;
``compare`` runs several models on one split."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import statistics
import sys
import time
from collections.abc import MutableMapping
from logging import getLogger
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from recbole.data import data_preparation
from recbole.data.transform import construct_transform
from recbole.utils import get_flops, init_logger, init_seed, set_color

from reveal_recbole.config import Config
from reveal_recbole.data import create_dataset
from reveal_recbole.diagnostics import plot_diagnostics, visual_utilisation
from reveal_recbole.errors import ConfigError, UserInputError
from reveal_recbole.utils import atomic_write_text, get_model, get_trainer

REPORT_METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")


def run(
    model,
    dataset,
    config_file_list=None,
    config_dict=None,
    saved=True,
    nproc=1,
    world_size=-1,
    ip="localhost",
    port="5678",
    group_offset=0,
):
    """``recbole.quick_start.run`` for our models: ``run_reveal`` in one process, or in ``nproc`` DDP processes.

    Multi-process runs use NCCL on GPUs (one ``gpu_id`` per process, RecBole's set-up) and gloo
    on CPU. Each process trains on its share of every batch (``train_batch_size / world_size``)
    and the gradients are averaged, so a step sees ``train_batch_size`` interactions as in one
    process. Returns rank 0's result.
    """
    if nproc == 1 and world_size <= 0:
        return run_reveal(model, dataset, config_file_list, config_dict, saved)
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    config_dict = dict(config_dict or {})
    config_dict.update(
        world_size=nproc if world_size == -1 else world_size, ip=ip, port=port, nproc=nproc, offset=group_offset
    )
    kwargs = {"config_dict": config_dict, "saved": saved, "queue": queue}
    mp.spawn(run_reveals, args=(model, dataset, config_file_list, kwargs), nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()


def run_reveals(rank: int, *args):
    """One process of ``run``: ``recbole.quick_start.run_recboles`` calling ``run_reveal``."""
    kwargs = args[-1]
    if not isinstance(kwargs, MutableMapping):
        raise TypeError(f"the last argument of run_reveals must be a dict, got {type(kwargs)}")
    kwargs["config_dict"] = dict(kwargs.get("config_dict") or {}, local_rank=rank)
    return run_reveal(*args[:3], **kwargs)


def run_reveal(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True, queue=None):
    """Train and evaluate one model, as ``run_recbole`` does; returns the same dict.

    ``queue`` receives rank 0's result in a multi-process run (see ``run``).
    """
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    os.makedirs(os.path.join("log", config["model"]), exist_ok=True)  # RecBole's ./log/<model>: DDP ranks race there
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
    if config["resume_file"]:
        trainer.resume_checkpoint(config["resume_file"])
    start = time.perf_counter()
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"]
    )
    train_seconds = time.perf_counter() - start
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])
    trainer.log_final("Test", test_result)

    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    result = {
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "seed": config["seed"],
        "epochs": len(trainer.train_loss_dict),
        "train_seconds": train_seconds,
    }
    if config["visual_utilisation"] and getattr(model.item_embedding, "modalities", ()):
        result["utilisation"] = report_utilisation(config, trainer, test_data, saved)
    if not config["single_spec"]:
        dist.destroy_process_group()
    if config["local_rank"] == 0 and queue is not None:
        queue.put(result)
    return result


def report_utilisation(config, trainer, test_data, saved: bool) -> dict:
    """Test metrics with each modality masked, logged, in tensorboard and (when saved) drawn next to the checkpoint."""
    utilisation = visual_utilisation(trainer, test_data)
    getLogger().info(set_color("visual utilisation (test, drop when masked)", "yellow") + f": {utilisation['drop']}")
    drops = utilisation["drop"].items()
    trainer.log_final("Utilisation", {f"{mod}_masked/{m}": v for mod, drop in drops for m, v in drop.items()})
    if saved and config["diagnostics_figure"] and config["local_rank"] == 0:
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
    logger = getLogger()
    for handler in logger.handlers[:]:  # as RecBole's: one log file (and tensorboard run) per trial
        logger.removeHandler(handler)
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    best_valid_score, best_valid_result = trainer.fit(train_data, valid_data, verbose=False, saved=saved)
    test_result = trainer.evaluate(test_data, load_best_model=saved)
    trainer.log_final("Test", test_result)
    return {
        "model": config["model"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
    }


def parse_model_spec(spec: str) -> tuple[str, dict]:
    """``"SASRecREVEAL[avl=False,fusion=gated]"`` -> ``("SASRecREVEAL", {"avl": False, "fusion": "gated"})``."""
    match = re.fullmatch(r"\s*([A-Za-z0-9_]+)\s*(?:\[(.*)\])?\s*", spec)
    if match is None:
        raise ConfigError(f"bad model spec {spec!r}: expected Name or Name[key=value,...]")
    overrides = {}
    for pair in filter(None, (match.group(2) or "").split(",")):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad override {pair!r} in model spec {spec!r}: expected key=value")
        overrides[key.strip()] = yaml.safe_load(value.strip())
    return match.group(1), overrides


def summarise(results: dict[str, list[dict]], metrics=REPORT_METRICS) -> list[dict]:
    """Mean and sample std over seeds of each test metric, seconds per epoch, and utilisation drops."""
    summary = []
    for label, runs in results.items():
        row = {"model": label, "seeds": len(runs)}
        for metric in metrics:
            values = [float(r["test_result"][metric]) for r in runs]
            row[metric] = statistics.fmean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row["s_per_epoch"] = statistics.fmean(r["train_seconds"] / max(r["epochs"], 1) for r in runs)
        for modality in ("image", "text"):
            drops = [r["utilisation"]["drop"][modality]["ndcg@10"] for r in runs if modality in r.get("utilisation", {}).get("drop", {})]
            row[f"{modality}_masked_drop_ndcg@10"] = statistics.fmean(drops) if drops else None
        summary.append(row)
    return summary


def relative_improvement(summary: list[dict], metric: str) -> dict[str, float]:
    """For each ``XREVEAL[...]`` row, its relative gain in ``metric`` over the row named ``X``."""
    by_label = {row["model"]: row for row in summary}
    gains = {}
    for row in summary:
        name, _ = parse_model_spec(row["model"])
        backbone = by_label.get(name[: -len("REVEAL")]) if name.endswith("REVEAL") else None
        if backbone and backbone[metric] > 0:
            gains[row["model"]] = row[metric] / backbone[metric] - 1.0
    return gains


def comparison_table(summary: list[dict], metrics=REPORT_METRICS) -> list[list[str]]:
    """Markdown/CSV rows: mean +- std per metric (best mean marked ``*``), gain over the backbone, cost."""
    best = {m: max(row[m] for row in summary) for m in metrics}
    gains = {m: relative_improvement(summary, m) for m in ("ndcg@10", "recall@20")}
    rows = [["model", "seeds", *metrics, "NDCG@10 vs backbone", "Recall@20 vs backbone",
             "image-masked drop NDCG@10", "text-masked drop NDCG@10", "s/epoch"]]
    for row in summary:
        cells = [f"{row[m]:.4f} ± {row[m + '_std']:.4f}" + ("*" if row[m] == best[m] else "") for m in metrics]
        gain_cells = [f"{gains[m][row['model']]:+.1%}" if row["model"] in gains[m] else "" for m in gains]
        drops = [f"{row[k]:.4f}" if row[k] is not None else "" for k in ("image_masked_drop_ndcg@10", "text_masked_drop_ndcg@10")]
        rows.append([row["model"], str(row["seeds"]), *cells, *gain_cells, *drops, f"{row['s_per_epoch']:.1f}"])
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines) + "\n"


def _run_record(spec: str, result: dict) -> dict:
    """What the comparison table needs of one run, as JSON."""
    keys = ("seed", "test_result", "epochs", "train_seconds", "utilisation")
    return json.loads(json.dumps({"spec": spec} | {k: result[k] for k in keys if k in result}, default=float))


def read_run_records(path: str | Path) -> list[dict]:
    """The finished runs recorded by an earlier (perhaps interrupted) ``compare``."""
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserInputError(f"cannot resume the comparison: no file {path}") from None
    except json.JSONDecodeError as error:
        raise UserInputError(f"cannot resume the comparison: {path} is not a runs file ({error})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and {"spec", "seed", "test_result"} <= set(r) for r in records):
        raise UserInputError(f"cannot resume the comparison: {path} is not a list of run records")
    return records


def compare(models, dataset, seeds=None, config_file_list=None, config_dict=None, output_dir="results", saved=True,
            resume=None):
    """Run each model spec (``Name`` or ``Name[key=value,...]``) for each seed on one dataset and config.

    Every model sees the same data, leave-one-out split and seed list. Writes
    ``compare-<dataset>-<time>.md`` / ``.csv`` (the summary) and ``-runs.csv`` (one row per run).
    Each finished run is recorded at once in ``-runs.json``; ``resume=<that file>`` reruns only
    the (model, seed) pairs it lacks and writes the tables next to it.
    """
    if resume is not None:
        stem = Path(resume).with_name(Path(resume).name.removesuffix("-runs.json"))
        records = read_run_records(resume)
    else:
        stem = Path(output_dir) / f"compare-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
        records = []
    runs_file = stem.with_name(stem.name + "-runs.json")

    def wanted(record: dict, spec: str, seed: int | None) -> bool:
        return record["spec"] == spec and (seed is None or record["seed"] == seed)

    results: dict[str, list[dict]] = {}
    for spec in models:
        model, overrides = parse_model_spec(spec)
        for seed in seeds or [None]:  # None: the configured seed
            finished = [r for r in records if wanted(r, spec, seed)]
            if not finished:
                settings = dict(config_dict or {}) | overrides | ({} if seed is None else {"seed": seed})
                finished = [_run_record(spec, run_reveal(model, dataset, config_file_list, settings, saved=saved))]
                records += finished
                atomic_write_text(runs_file, json.dumps(records, indent=1) + "\n")
            results.setdefault(spec, []).append(finished[0])
    run_rows = [["model", "seed", *REPORT_METRICS, "epochs", "train_seconds"]]
    run_rows += [[r["spec"], r["seed"], *(r["test_result"][m] for m in REPORT_METRICS), r["epochs"],
                  f"{r['train_seconds']:.1f}"] for runs in results.values() for r in runs]
    rows = comparison_table(summarise(results))
    atomic_write_text(stem.with_suffix(".md"), markdown_table(rows))
    atomic_write_text(stem.with_suffix(".csv"), csv_text(rows))
    atomic_write_text(stem.with_name(stem.name + "-runs.csv"), csv_text(run_rows))
    print(markdown_table(rows))
    print(f"saved {stem.with_suffix('.md')}, {stem.with_suffix('.csv')} and {stem.name}-runs.csv/.json")
    return results, rows


def csv_text(rows) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()
