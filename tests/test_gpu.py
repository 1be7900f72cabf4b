"""The CUDA paths, on a real GPU: training, resume points, best-model reload, AMP with AVL, one-GPU DDP.

Every test here is marked ``gpu`` and skips where torch sees no CUDA device; the CPU tests of the
same logic (RNG states of a CUDA host, load_run of a DDP/GPU checkpoint, gpu_id mapping, AVL norms
under a GradScaler) are in test_resume, test_ddp, test_config and test_avl.
``benchmarks/gpu_check.sh`` runs ``python -m pytest -q -m gpu tests/test_gpu.py`` on a GPU machine.
"""
from __future__ import annotations

import csv
import math
import statistics

import pytest
import torch

from reveal_recbole import quick_start
from reveal_recbole.pipeline import load_run
from reveal_recbole.recbole_seam import load_checkpoint
from reveal_recbole.trainer.resume import restore_rng_states

from conftest import assert_report_metrics
from test_avl import build
from test_ddp import free_port
from test_resume import Crash, crash_after

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (torch.cuda.is_available() is False); see benchmarks/gpu_check.sh"),
]

ON_GPU = {"use_gpu": True, "gpu_id": "0"}


@pytest.fixture
def gpu_config(tiny_config):
    return tiny_config | ON_GPU | {"epochs": 2, "stopping_step": 100, "avl": True}


def test_one_epoch_trains_and_reloads_the_best_model_from_the_cpu(gpu_config, monkeypatch):
    """RecBole's evaluate(load_best_model=True) loads the checkpoint to the CPU, then into the CUDA model."""
    config, net, trainer, train_data, valid_data, test_data = build(gpu_config | {"epochs": 1})
    assert config["device"].type == "cuda" and next(net.parameters()).is_cuda
    trainer.fit(train_data, valid_data)
    in_memory = trainer.evaluate(test_data, load_best_model=False)

    devices = set()
    load_state_dict = net.load_state_dict

    def spy(state_dict, *args, **kwargs):
        devices.update(value.device.type for value in state_dict.values() if torch.is_tensor(value))
        return load_state_dict(state_dict, *args, **kwargs)

    monkeypatch.setattr(net, "load_state_dict", spy)
    reloaded = trainer.evaluate(test_data, load_best_model=True)
    assert devices == {"cpu"}
    assert next(net.parameters()).is_cuda
    assert_report_metrics(reloaded)
    for metric, value in in_memory.items():
        assert reloaded[metric] == pytest.approx(value, abs=1e-4), metric


def test_a_resume_point_resumes_on_cuda(gpu_config):
    """Before: the RNG states came back on the GPU and torch.set_rng_state refused them."""
    _, _, crashed, train_data, valid_data, _ = build(gpu_config)
    with pytest.raises(Crash):
        crashed.fit(train_data, valid_data, callback_fn=crash_after(0))
    saved = load_checkpoint(crashed.resume_file, map_location="cpu")["rng"]
    assert saved["cuda"], "a CUDA host saves its CUDA RNG streams"

    _, resumed_net, resumed, train_data, valid_data, test_data = build(gpu_config, model_seed=7)
    resumed.resume_checkpoint(crashed.resume_file)
    assert resumed.start_epoch == 1
    restore_rng_states(resumed._pending_rng)
    assert torch.equal(torch.cuda.get_rng_state(), saved["cuda"][0])
    resumed.fit(train_data, valid_data)
    assert sorted(resumed.train_loss_dict) == [0, 1]
    assert next(resumed_net.parameters()).is_cuda
    assert_report_metrics(resumed.evaluate(test_data, load_best_model=True))


def test_amp_with_avl_trains_and_logs_unscaled_gradient_norms(gpu_config):
    """RecBole's enable_amp/enable_scaler: fp16 autocast and a GradScaler (initial scale 65,536)."""
    _, _, trainer, train_data, valid_data, test_data = build(
        gpu_config | {"epochs": 1, "enable_amp": True, "enable_scaler": True})
    trainer.fit(train_data, valid_data)
    assert_report_metrics(trainer.evaluate(test_data, load_best_model=True))
    with open(trainer.avl_csv_file, encoding="utf-8") as handle:
        norms = [float(row["grad_norm_image"]) for row in csv.DictReader(handle)]
    finite = [norm for norm in norms if math.isfinite(norm)]  # a step the scaler skips has inf gradients
    assert finite and statistics.median(finite) < 100.0, norms  # scaled norms would be ~65,536x the true ones


def test_a_gpu_checkpoint_reopens_on_the_gpu(gpu_config):
    _, _, trainer, train_data, valid_data, test_data = build(gpu_config | {"epochs": 1})
    trainer.fit(train_data, valid_data)
    expected = trainer.evaluate(test_data, load_best_model=True)
    run = load_run(trainer.saved_model_file)
    assert run.config["device"].type == "cuda" and next(run.model.parameters()).is_cuda
    result = run.trainer.evaluate(run.test_data, load_best_model=False)
    for metric, value in expected.items():
        assert result[metric] == pytest.approx(value, abs=1e-4), metric


def test_one_gpu_ddp_run_through_nccl(gpu_config, monkeypatch):
    """RecBole's NCCL set-up with our wrapper (device ids, buffers not re-broadcast each step), one rank."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # restored after the test (RecBole sets it)
    config = gpu_config | {"epochs": 1, "visual_utilisation": False}
    result = quick_start.run("SASRecREVEAL", "scientific", config_dict=config, nproc=1, world_size=1,
                             port=str(free_port()))
    assert result is not None, "rank 0 put no result on the queue"
    assert_report_metrics(result["test_result"])


@pytest.mark.parametrize("model", ["M3SRec", "MISSRec", "UniSRec", "SASRecF"])
def test_a_peer_trains_on_cuda_and_ranks_as_on_the_cpu(gpu_config, model):
    """The peers' CUDA paths (in-place ranking buffers, cached adapted rows): one epoch, then the catalogue's
    scores on the GPU equal the same weights' scores on the CPU."""
    from test_peer_models import eval_batch, prepared

    run = prepared(gpu_config | {"avl": False}, model)
    assert next(run.model.parameters()).is_cuda
    loss = run.trainer._train_epoch(run.train_data, 0)
    assert math.isfinite(float(loss if not isinstance(loss, tuple) else sum(loss)))
    batch = eval_batch(run)
    with torch.no_grad():
        on_gpu = run.model.eval().full_sort_predict(batch).cpu()
    cpu = prepared(gpu_config | {"avl": False, "use_gpu": False}, model)
    cpu.model.load_state_dict({k: v.cpu() for k, v in run.model.state_dict().items()})
    with torch.no_grad():
        on_cpu = cpu.model.eval().full_sort_predict(batch.to("cpu"))
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("model", ["SASRecREVEAL", "MISSRec", "UniSRec"])
def test_a_model_ranked_on_the_gpu_ranks_again_after_moving_to_the_cpu(gpu_config, model):
    """Evaluation caches the item table (REVEAL) or the adapted catalogue (MISSRec, UniSRec); ``.cpu()`` keeps
    each tensor's version, so a cache keyed on versions alone handed the CUDA table to the CPU model."""
    from test_peer_models import eval_batch, prepared

    run = prepared(gpu_config | {"avl": False}, model)
    batch = eval_batch(run)
    with torch.no_grad():
        on_gpu = run.model.eval().full_sort_predict(batch).cpu()
        run.model.cpu()
        on_cpu = run.model.full_sort_predict(batch.to("cpu"))
    assert on_cpu.device.type == "cpu"
    torch.testing.assert_close(on_cpu, on_gpu, rtol=1e-3, atol=1e-3)
