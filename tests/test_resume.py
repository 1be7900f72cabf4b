"""Training resumes from a resume point and ends exactly as the uninterrupted run does."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reveal_recbole.errors import UserInputError
from reveal_recbole.quick_start import run_reveal
from reveal_recbole.trainer.resume import restore_rng_states, resume_point_file, rng_states

from test_avl import build

ROOT = Path(__file__).resolve().parents[1]


class Crash(RuntimeError):
    pass


def crash_after(epoch):
    def callback(epoch_idx, valid_score):
        if epoch_idx == epoch:
            raise Crash(f"killed after epoch {epoch_idx}")
    return callback


@pytest.fixture
def settings(tiny_config):
    # dropout and AVL draw random numbers and keep state: both must survive the restart
    return tiny_config | {"epochs": 4, "stopping_step": 100, "avl": True, "hidden_dropout_prob": 0.3}


@pytest.mark.parametrize("model", ["SASRecREVEAL", "GRU4Rec"])
def test_resumed_training_equals_uninterrupted(settings, model):
    _, net, trainer, train_data, valid_data, test_data = build(settings, model)
    best_score, best_result = trainer.fit(train_data, valid_data)
    expected = trainer.evaluate(test_data, load_best_model=True)
    assert not os.path.exists(trainer.resume_file)  # removed once training ended

    _, _, crashed, train_data, valid_data, _ = build(settings, model)
    with pytest.raises(Crash):
        crashed.fit(train_data, valid_data, callback_fn=crash_after(1))
    assert os.path.isfile(crashed.resume_file)

    # a new process: different model init and RNG streams, all overwritten by the resume point
    _, resumed_net, resumed, train_data, valid_data, test_data = build(settings, model, model_seed=7)
    resumed.resume_checkpoint(crashed.resume_file)
    assert resumed.start_epoch == 2 and resumed.saved_model_file == crashed.saved_model_file
    assert resumed.fit(train_data, valid_data) == (best_score, best_result)
    assert resumed.evaluate(test_data, load_best_model=True) == expected
    assert sorted(resumed.train_loss_dict.items()) == sorted(trainer.train_loss_dict.items())
    for key, value in net.state_dict().items():
        torch.testing.assert_close(resumed_net.state_dict()[key], value, rtol=0, atol=0, msg=key)


def as_saved_on_cuda_host(resume_file) -> None:
    """Rewrite a resume point as a 2-GPU host saves it: one 16-byte Philox state per visible GPU."""
    state = torch.load(resume_file, weights_only=False)
    state["rng"]["cuda"] = [torch.arange(16, dtype=torch.uint8) + device for device in range(2)]
    torch.save(state, resume_file)


@pytest.mark.slow
def test_resume_point_of_a_cuda_host_resumes_exactly_on_a_cpu_only_host(settings, monkeypatch):
    """Before: loaded with ``map_location=<trainer device>``, the RNG states left the CPU and torch refused them.

    A trainer device other than the CPU is emulated with ``meta`` (no GPU here); the saved CUDA
    streams have no device on this host and are skipped.
    """
    _, _, trainer, train_data, valid_data, _ = build(settings)
    expected = trainer.fit(train_data, valid_data)
    _, _, crashed, train_data, valid_data, _ = build(settings)
    with pytest.raises(Crash):
        crashed.fit(train_data, valid_data, callback_fn=crash_after(1))
    as_saved_on_cuda_host(crashed.resume_file)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _, _, resumed, train_data, valid_data, _ = build(settings, model_seed=7)
    resumed.device = torch.device("meta")
    resumed.resume_checkpoint(crashed.resume_file)
    resumed.device = torch.device("cpu")
    assert resumed._pending_rng["torch"].device.type == "cpu"
    assert resumed.fit(train_data, valid_data) == expected


def test_cuda_rng_states_are_restored_for_the_gpus_this_host_has(monkeypatch):
    """A resume point from a 2-GPU host, on a 1-GPU host: the first stream restored, through the CPU."""
    states = rng_states()
    states["cuda"] = [torch.arange(16, dtype=torch.uint8) + device for device in range(2)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    restore_rng_states(states)
    assert len(restored) == 1 and torch.equal(restored[0], states["cuda"][0]) and restored[0].device.type == "cpu"


def test_recbole_loads_checkpoints_to_the_cpu(tmp_path):
    """RecBole's evaluate(load_best_model=True) and resume_checkpoint pass ``map_location=self.device``.

    Loaded there, a GPU would hold a second copy of every table until ``load_state_dict`` ends:
    the tensors stay on the CPU, only ``other_parameter`` (set as is on the model) goes to the device.
    """
    import recbole.trainer.trainer as recbole_trainer

    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": {"table": torch.ones(3, 2)}, "other_parameter": {"cache": torch.zeros(2), "n": 1}}, path)
    checkpoint = recbole_trainer.torch.load(path, map_location=torch.device("meta"))
    assert checkpoint["state_dict"]["table"].device.type == "cpu"
    assert checkpoint["other_parameter"]["cache"].device.type == "meta" and checkpoint["other_parameter"]["n"] == 1


def test_resume_file_of_another_model_is_refused(settings):
    _, _, crashed, train_data, valid_data, _ = build(settings)
    with pytest.raises(Crash):
        crashed.fit(train_data, valid_data, callback_fn=crash_after(0))
    _, _, other, *_ = build(settings, "SASRec")
    with pytest.raises(UserInputError, match="saved by SASRecREVEAL"):
        other.resume_checkpoint(crashed.resume_file)
    with pytest.raises(UserInputError, match="no checkpoint file"):
        other.resume_checkpoint(Path(crashed.resume_file).with_name("absent.pth"))


def test_plain_recbole_checkpoint_still_resumes(settings):
    _, _, trainer, train_data, valid_data, _ = build(settings | {"epochs": 2})
    trainer.fit(train_data, valid_data)
    _, _, fresh, *_ = build(settings)
    fresh.resume_checkpoint(trainer.saved_model_file)  # RecBole's own format: from its epoch on
    assert fresh.start_epoch >= 1 and fresh.saved_model_file == trainer.saved_model_file


@pytest.mark.slow
def test_killed_cli_run_resumes_to_the_uninterrupted_result(settings, tmp_path):
    """SIGKILL the real CLI mid-training; ``--resume_file`` finishes it with the uninterrupted metrics."""
    settings = settings | {"epochs": 12}
    expected = run_reveal("SASRecREVEAL", "scientific", config_dict=settings)["test_result"]

    checkpoints = tmp_path / "killed"
    args = [f"--{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in
            (settings | {"checkpoint_dir": str(checkpoints), "visual_utilisation": False}).items()]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(ROOT / "run_reveal.py"), "--model=SASRecREVEAL",
                                "--dataset=scientific", *args], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    resume_points: list[Path] = []
    while not resume_points and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        resume_points = list(checkpoints.glob("*-resume.pth")) if checkpoints.exists() else []
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert resume_points, "the run ended before writing a resume point"
    assert not list(checkpoints.glob(".*.tmp"))

    result = run_reveal("SASRecREVEAL", "scientific", config_dict=settings | {
        "checkpoint_dir": str(checkpoints), "resume_file": str(resume_points[0])})
    assert result["test_result"] == expected
    assert result["epochs"] == settings["epochs"]
    assert not resume_points[0].exists()


def test_resume_point_name():
    assert resume_point_file("saved/SASRec-Nov-25-2026_10-00-00.pth") == "saved/SASRec-Nov-25-2026_10-00-00-resume.pth"


def test_resume_points_can_be_switched_off(settings):
    _, _, trainer, train_data, valid_data, _ = build(settings | {"save_resume_points": False})
    written = []
    trainer.save_resume_point = lambda *args: written.append(args)
    with pytest.raises(Crash):
        trainer.fit(train_data, valid_data, callback_fn=crash_after(1))
    assert written == [] and not os.path.exists(trainer.resume_file)


def test_runs_started_in_the_same_second_keep_their_own_checkpoints(settings, monkeypatch, tmp_path):
    import gc

    import recbole.trainer.trainer as recbole_trainer

    from reveal_recbole.recbole_seam import load_checkpoint

    monkeypatch.setattr(recbole_trainer, "get_local_time", lambda: "Dec-01-2026_00-00-00")
    settings = settings | {"epochs": 1, "checkpoint_dir": str(tmp_path)}
    _, first_net, first, train_data, valid_data, _ = build(settings)
    _, second_net, second, *_ = build(settings, model_seed=7)
    assert first.saved_model_file != second.saved_model_file
    first.fit(train_data, valid_data)
    second.fit(train_data, valid_data)
    for net, trainer in ((first_net, first), (second_net, second)):
        saved = load_checkpoint(trainer.saved_model_file, map_location="cpu")["state_dict"]
        assert all(torch.equal(saved[key], value) for key, value in net.state_dict().items())

    _, _, unused, *_ = build(settings)  # a trainer that never saves leaves no empty file behind
    claimed = unused.saved_model_file
    assert os.path.getsize(claimed) == 0
    del unused
    gc.collect()
    assert not os.path.exists(claimed)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == sorted(
        os.path.basename(t.saved_model_file) for t in (first, second))
