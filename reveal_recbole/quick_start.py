"""``run_reveal`` mirrors ``recbole.quick_start.run_recbole``, ``run`` its multi-process ``run``,
and ``objective_function`` and ``load_data_and_model`` their RecBole twins."""
from __future__ import annotations

import itertools
import logging
import os
import statistics
import sys
import time
from collections.abc import MutableMapping
from logging import getLogger
from pathlib import Path

import torch.distributed as dist
from recbole.data.transform import construct_transform
from recbole.utils import init_logger, set_color

from reveal_recbole.config import Config
from reveal_recbole.diagnostics import existing, plot_diagnostics, visual_utilisation
from reveal_recbole.pipeline import load_run, prepare_run
from reveal_recbole.recbole_seam import count_flops
from reveal_recbole.target_buckets import evaluate_buckets, format_buckets, ranks_all_items

FLOPS_MAX_MODEL_MB = 512  # Sports with 1,664-d features: about 130 MB; 100k items x 1,664-d: 650 MB
_RUN_LOG_HANDLERS: list[logging.Handler] = []  # the handlers init_run_logger added for the previous run


def init_run_logger(config) -> None:
    """RecBole's ``init_logger``, after removing the handlers it added for this process's previous run.

    RecBole adds its console and file handlers with ``logging.basicConfig``, which does nothing once
    the root logger has handlers: a second run in one process (``compare``, several seeds) would
    log into the first run's file and leave its own empty. Handlers the user set up stay.
    """
    root = logging.getLogger()
    for handler in _RUN_LOG_HANDLERS:
        root.removeHandler(handler)
        handler.close()
    before = set(root.handlers)
    init_logger(config)
    _RUN_LOG_HANDLERS[:] = [handler for handler in root.handlers if handler not in before]


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
    os.makedirs(os.path.join("log", config["model"]), exist_ok=True)  # RecBole's ./log/<model>: DDP ranks race there
    init_run_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)

    run = prepare_run(config)
    logger.info(run.dataset)
    logger.info(run.model)
    flops = model_flops(run.model, run.dataset, config)
    if flops is not None:
        logger.info(set_color("FLOPs", "blue") + f": {flops}")

    trainer = run.trainer
    if config["resume_file"]:
        trainer.resume_checkpoint(config["resume_file"])
    start = time.perf_counter()
    best_valid_score, best_valid_result = trainer.fit(
        run.train_data, run.valid_data, saved=saved, show_progress=config["show_progress"]
    )
    train_seconds = time.perf_counter() - start
    test_result = trainer.evaluate(run.test_data, load_best_model=saved, show_progress=config["show_progress"])
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
    if config["single_spec"] and ranks_all_items(config):  # one process sees every test user (DDP ranks hold shards)
        result["buckets"] = report_buckets(config, trainer, run.train_data, run.test_data)
    if config["visual_utilisation"] and getattr(run.model.item_embedding, "modalities", ()):
        result["utilisation"] = report_utilisation(config, trainer, run.test_data, saved)
    if not config["single_spec"]:
        dist.destroy_process_group()
    if config["local_rank"] == 0 and queue is not None:
        queue.put(result)
    return result


def model_flops(model, dataset, config) -> float | None:
    """RecBole's FLOPs count, skipped (logged) for a model over ``FLOPS_MAX_MODEL_MB``.

    ``recbole.utils.get_flops`` deep-copies the model on its device: at 1M items every table,
    a second copy of gigabytes, for a diagnostic number.
    """
    size_mb = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers())) / 2**20
    if size_mb > FLOPS_MAX_MODEL_MB:
        getLogger().info(
            f"FLOPs not counted: {type(model).__name__}'s parameters and buffers take {size_mb:,.1f} MB and RecBole's "
            f"count deep-copies the model (limit {FLOPS_MAX_MODEL_MB} MB)"
        )
        return None
    return count_flops(model, dataset, config["device"], getLogger(), construct_transform(config))


def report_buckets(config, trainer, train_data, test_data) -> dict:
    """Test metrics per target bucket (all, warm, cold, head, torso, tail: ``target_buckets``), logged and drawn."""
    buckets = evaluate_buckets(trainer.model, train_data, test_data, config["topk"], config["cold_item_share"])
    title = set_color("test result by target (buckets from the training split)", "yellow")
    getLogger().info(f"{title}: {format_buckets(buckets)}")
    trainer.log_final("Buckets", {f"{name}/{metric}": value for name, values in buckets.items()
                                  for metric, value in values.items() if value is not None})
    return buckets


def report_utilisation(config, trainer, test_data, saved: bool) -> dict:
    """Test metrics with each modality masked, logged, in tensorboard and (when saved) drawn next to the checkpoint."""
    utilisation = visual_utilisation(trainer, test_data)
    getLogger().info(set_color("visual utilisation (test, drop when masked)", "yellow") + f": {utilisation['drop']}")
    drops = utilisation["drop"].items()
    trainer.log_final("Utilisation", {f"{mod}_masked/{m}": v for mod, drop in drops for m, v in drop.items()})
    if saved and config["diagnostics_figure"] and config["local_rank"] == 0:
        avl_csv = existing(getattr(trainer, "avl_csv_file", None))
        epochs_csv = existing(getattr(trainer, "utilisation_csv_file", None))
        figure = Path(trainer.saved_model_file).with_suffix(".diagnostics.png")
        plot_diagnostics(avl_csv, utilisation, figure, epochs_csv)
        getLogger().info(f"diagnostics figure: {figure}")
    return utilisation


def load_data_and_model(model_file):
    """``recbole.quick_start.load_data_and_model`` for our checkpoints (unpickling runs code: trusted files only)."""
    run = load_run(model_file)
    init_run_logger(run.config)
    return run.config, run.model, run.dataset, run.train_data, run.valid_data, run.test_data


def objective_function(config_dict=None, config_file_list=None, saved=True):
    """``run_reveal`` for RecBole's ``HyperTuning``: same signature and return as RecBole's."""
    config = Config(config_dict=config_dict, config_file_list=config_file_list)
    logger = getLogger()
    for handler in logger.handlers[:]:  # as RecBole's: one log file (and tensorboard run) per trial
        logger.removeHandler(handler)
    init_logger(config)
    run = prepare_run(config)
    best_valid_score, best_valid_result = run.trainer.fit(run.train_data, run.valid_data, verbose=False, saved=saved)
    test_result = run.trainer.evaluate(run.test_data, load_best_model=saved)
    run.trainer.log_final("Test", test_result)
    return {
        "model": config["model"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
    }


def seed_averaged(objective, seeds):
    """``objective`` run once per seed for each trial, scored by the mean: on a small set one seed's validation
    ranks settings by noise (BENCHMARKS.md: the seed-2020 valid-best setting lost on 3-seed test for three of
    four REVEAL backbones on synthetic_sparse). Valid and test results are the per-metric means."""
    def averaged(config_dict=None, config_file_list=None, saved=True):
        runs = [objective(dict(config_dict or {}) | {"seed": seed}, config_file_list, saved) for seed in seeds]

        def mean(key):
            return {metric: round(statistics.fmean(float(r[key][metric]) for r in runs), 4) for metric in runs[0][key]}

        return runs[0] | {"best_valid_score": statistics.fmean(float(r["best_valid_score"]) for r in runs),
                          "best_valid_result": mean("best_valid_result"), "test_result": mean("test_result")}
    return averaged
