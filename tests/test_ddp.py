"""Two-process DDP training on CPU (gloo) through RecBole's own multi-process path.

``quick_start.run(nproc=2)`` spawns ``run_reveals`` twice; each rank trains on half of every
batch, gradients are averaged, and AVL's masked losses are averaged across ranks so K_v and
the running means agree. The spawned entry point is wrapped (``_rank_worker``) only to save
each rank's AVL state after training; everything else is the real ``run``.
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest
import torch

from reveal_recbole import quick_start
from reveal_recbole.pipeline import load_run
from reveal_recbole.recbole_seam import load_checkpoint
from reveal_recbole.trainer import REVEALTrainer

from test_avl import build

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "feature_dropout": 0.0}
# One tiny epoch from the same initial weights (DDP broadcasts rank 0's, which uses the
# single-process seed). Each step sees the same 256 interactions in total, but RecBole's
# DistributedSampler deals them to ranks in another order than the single-process shuffle, so
# each step's batch differs, and the test ranking is then averaged per rank (RecBole's
# _map_reduce weights each rank by its number of batches and rounds to 4 decimals). On 150
# users Recall moves in steps of 1/150 ~ 0.0067: allow 6 users' worth. Measured here (torch
# 2.13 CPU): largest gap 0.020 (Recall@20, 3 users), NDCG@10 0.0008.
METRIC_TOLERANCE = 0.04


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _rank_worker(rank: int, *args) -> None:
    """``run_reveals`` with each rank's final AVL state, weights and DDP buffer setting saved beside the checkpoints."""
    torch.set_num_threads(1)  # two ranks on two shared cores
    out_dir = Path(args[-1]["config_dict"]["checkpoint_dir"])
    fit = REVEALTrainer.fit

    def fit_and_dump(self, *fit_args, **fit_kwargs):
        result = fit(self, *fit_args, **fit_kwargs)
        state = {
            "avl_running_losses": self.model.avl_running_losses.clone(),
            "k_v": self.avl.k_v.clone(),
            "weights": torch.cat([p.detach().flatten() for p in self.model.parameters()]),
            "syncs_buffers_each_step": self.distributed_model.will_sync_module_buffers(),
        }
        torch.save(state, out_dir / f"avl-rank{rank}.pt")
        return result

    REVEALTrainer.fit = fit_and_dump
    quick_start.run_reveals(rank, *args)


@pytest.mark.slow
def test_two_processes_match_one_and_share_avl_state(tiny_config, tmp_path, monkeypatch):
    # gpu_id '' keeps both runs on CPU (gloo) on GPU machines too; RecBole then sets
    # CUDA_VISIBLE_DEVICES='', which monkeypatch restores for later tests.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    config = tiny_config | NO_DROPOUT | {"visual_utilisation": False, "gpu_id": "", "avl": True}
    single = quick_start.run("SASRecREVEAL", "scientific", config_dict=dict(config), nproc=1)

    monkeypatch.setattr(quick_start, "run_reveals", _rank_worker)
    ddp_dir = tmp_path / "ddp"
    ddp = quick_start.run(
        "SASRecREVEAL", "scientific", config_dict=config | {"checkpoint_dir": str(ddp_dir)},
        nproc=2, port=str(free_port()),
    )

    assert ddp is not None, "rank 0 put no result on the queue"
    for metric in ("recall@10", "recall@20", "ndcg@10", "ndcg@20"):
        assert ddp["test_result"][metric] == pytest.approx(single["test_result"][metric], abs=METRIC_TOLERANCE), metric
    rank0, rank1 = (torch.load(ddp_dir / f"avl-rank{r}.pt") for r in (0, 1))
    assert int(rank0["avl_running_losses"][2]) > 0, "AVL never updated its running means"
    # feature tables are not re-broadcast at every step; AVL's running means agree without it
    assert not rank0["syncs_buffers_each_step"] and not rank1["syncs_buffers_each_step"]
    assert torch.equal(rank0["avl_running_losses"], rank1["avl_running_losses"])
    assert torch.equal(rank0["k_v"], rank1["k_v"])
    assert torch.allclose(rank0["weights"], rank1["weights"], rtol=0, atol=1e-6)  # gradients were averaged
    checkpoints = list(ddp_dir.glob("SASRecREVEAL-*.pth"))
    assert len(checkpoints) == 1, checkpoints  # one checkpoint per run, whatever each rank's clock says
    avl_csv = checkpoints[0].with_name(checkpoints[0].stem + "-avl.csv")
    assert avl_csv.is_file()
    steps = avl_csv.read_text().strip().splitlines()[1:]
    assert len(steps) == int(rank0["avl_running_losses"][2])  # rank 0 alone writes one row per step


# what a DDP rank on GPU 1 of a 2-GPU host saves (RecBole's _init_device and run's keys)
DDP_GPU_RUN = {"single_spec": False, "local_rank": 1, "world_size": 2, "nproc": 2, "offset": 0,
               "device": torch.device("cuda", 1), "gpu_id": "0,1", "use_gpu": True}


def test_a_ddp_gpu_checkpoint_reopens_as_one_process_on_a_cpu_only_host(tiny_config, monkeypatch, caplog):
    """Before: ``load_run`` kept the saved DDP/GPU keys, so RecBole's loaders asked for a process group."""
    _, _, trainer, train_data, valid_data, test_data = build(tiny_config)
    trainer.fit(train_data, valid_data)
    expected = trainer.evaluate(test_data, load_best_model=True)
    checkpoint = load_checkpoint(trainer.saved_model_file, map_location="cpu")
    for key, value in DDP_GPU_RUN.items():
        checkpoint["config"][key] = value
    torch.save(checkpoint, trainer.saved_model_file)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO):
        run = load_run(trainer.saved_model_file)
    assert (run.config["single_spec"], run.config["local_rank"], run.config["device"]) == (True, 0, torch.device("cpu"))
    assert (run.config["use_gpu"], run.config["gpu_id"]) == (False, "")
    assert not hasattr(run.trainer, "distributed_model")
    assert "device device(type='cuda', index=1) -> device(type='cpu')" in caplog.text
    assert run.trainer.evaluate(run.test_data, load_best_model=False) == expected
