"""Multi-process (DDP) training on CPU through RecBole 1.2.1's own DDP path.

RecBole's ``run`` spawns one process per rank and its ``Config._init_device`` joins them into a
process group, but only for CUDA: it asserts one ``gpu_id`` per process, hard-codes the NCCL
backend (absent from CPU builds of torch) and moves each rank to ``cuda:<rank>``. Our ``Config``
calls ``init_cpu_process_group`` instead when no GPU is used, so the same ``run`` works on CPU
with gloo; on GPUs RecBole's NCCL set-up runs unchanged, after ``CUDA_VISIBLE_DEVICES`` is set
from ``gpu_id`` (:func:`set_visible_gpus`: CUDA must not be queried before). Each CPU rank gets its share of the
cores for torch's intra-op threads (unless ``OMP_NUM_THREADS`` says otherwise): with every rank
on all cores, a 2-process epoch on 2 cores took 10x longer than with one thread each. The trainer
side (DDP wrapper without device ids on CPU, one checkpoint name per run) lives in
``reveal_recbole.trainer.base``.
"""
from __future__ import annotations

import os
from typing import Any, MutableMapping

import torch
import torch.distributed as dist


def set_visible_gpus(config: MutableMapping[str, Any]) -> str:
    """Set ``CUDA_VISIBLE_DEVICES`` to ``gpu_id`` as RecBole's ``_init_device`` does, and return it.

    CUDA reads the variable once, when torch first queries it (``torch.cuda.is_available()``
    included). Set after such a query, it changes nothing: every GPU stays visible and RecBole's
    ``cuda:<local_rank>`` is physical GPU <local_rank>, whatever ``gpu_id`` says. Set before, rank r
    runs on the r-th GPU of ``gpu_id``.
    """
    gpu_id = config["gpu_id"]
    gpu_id = ",".join(map(str, gpu_id)) if isinstance(gpu_id, (tuple, list)) else str(gpu_id)
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id
    return gpu_id


def uses_cuda(config: MutableMapping[str, Any]) -> bool:
    """RecBole's device rule: CUDA when a ``gpu_id`` is given and CUDA is available (asked after the GPUs are set)."""
    return len(set_visible_gpus(config)) > 0 and torch.cuda.is_available()


def init_cpu_process_group(config: MutableMapping[str, Any]) -> None:
    """Join this rank to the run's gloo process group and set the config keys RecBole's DDP path reads."""
    rank = config["local_rank"] + config["offset"]
    dist.init_process_group(
        backend="gloo",
        rank=rank,
        world_size=config["world_size"],
        init_method=f"tcp://{config['ip']}:{config['port']}",
    )
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, torch.get_num_threads() // config["nproc"]))
    config["device"] = torch.device("cpu")
    config["single_spec"] = False
    if config["local_rank"] != 0:  # as RecBole: only rank 0 logs and shows progress
        config["state"] = "error"
        config["show_progress"] = False
        config["verbose"] = False


def is_distributed(config) -> bool:
    return not config["single_spec"]


def is_main_process(config) -> bool:
    return config["single_spec"] or config["local_rank"] == 0


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
