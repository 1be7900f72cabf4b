"""Resume points: a killed run continues where it stopped and ends as if it had never stopped.

RecBole saves a checkpoint only when the valid score improves, without random-number state, so
``resume_checkpoint`` restarts from the best epoch with fresh RNG streams: the run that follows
differs from the uninterrupted one. :class:`ResumePointsMixin` adds to a RecBole ``Trainer``:

- after every evaluated epoch, ``<saved model file stem>-resume.pth`` (written atomically): the
  model (AVL's running means are model buffers), optimiser, early-stopping counters, best valid
  result, per-epoch losses, the best checkpoint's path, and every RNG stream a training epoch
  draws from (Python, NumPy, torch CPU and CUDA, the train loader's shuffling generator);
- ``resume_checkpoint(<...-resume.pth>)`` restores all of it (a plain RecBole checkpoint still
  resumes the RecBole way), and the resumed run keeps writing to the same best checkpoint;
- RecBole's best-model checkpoint is written atomically too (temporary file, then rename);
- the resume point is deleted when ``fit`` returns (the best checkpoint holds the result);
  ``save_resume_points: False`` skips them (each is a full model + optimiser save per epoch).

Single-process runs resume exactly. Under DDP only rank 0 saves, and every rank restores rank
0's RNG streams: the run resumes correctly but not bit-for-bit. Resume points load to the CPU
(torch takes RNG states only there), so one saved on a GPU host resumes on any host.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from reveal_recbole.atomic import atomic_target
from reveal_recbole.distributed import is_main_process
from reveal_recbole.errors import UserInputError
from reveal_recbole.recbole_seam import load_checkpoint_for

RESUME_FORMAT = "reveal-recbole-resume/1"


def resume_point_file(saved_model_file: str) -> str:
    return os.path.splitext(saved_model_file)[0] + "-resume.pth"


def rng_states(train_data=None) -> dict:
    """Every RNG stream a training epoch draws from."""
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    generator = getattr(train_data, "generator", None)
    if generator is not None:
        states["train_loader"] = generator.get_state()
    return states


def restore_rng_states(states: dict, train_data=None) -> None:
    """Restore ``states`` on this host, whichever host saved them.

    torch takes RNG states only as CPU tensors, so each goes through ``.cpu()``. CUDA streams are
    restored for the GPUs this process sees: none on a CPU-only host (the run draws from no CUDA
    stream there), the first ``device_count()`` where the saving host had more.
    """
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"][: torch.cuda.device_count()]])
    generator = getattr(train_data, "generator", None)
    if generator is not None and "train_loader" in states:
        generator.set_state(states["train_loader"].cpu())


class ResumePointsMixin:
    """Per-epoch resume points and atomic checkpoints for a RecBole ``Trainer`` (placed before it)."""

    _pending_rng: dict | None = None

    @property
    def resume_file(self) -> str:
        return resume_point_file(self.saved_model_file)

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        target = kwargs.pop("saved_model_file", self.saved_model_file)
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        with atomic_target(target) as temporary:
            super()._save_checkpoint(epoch, verbose=False, saved_model_file=temporary, **kwargs)
        if verbose:
            self.logger.info(f"Saving current: {target}")

    def save_resume_point(self, epoch: int, train_data=None) -> None:
        if not is_main_process(self.config):
            return
        state = {
            "format": RESUME_FORMAT,
            "model": self.config["model"],
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": self.best_valid_score,
            "best_valid_result": self.best_valid_result,
            "train_loss_dict": self.train_loss_dict,
            "best_model_file": self.saved_model_file,
            "state_dict": self.model.state_dict(),
            "other_parameter": self.model.other_parameter(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_states(train_data),
        }
        with atomic_target(self.resume_file) as temporary:
            torch.save(state, temporary, pickle_protocol=4)

    def resume_checkpoint(self, resume_file):
        """Continue from a resume point (exactly) or from a RecBole checkpoint (RecBole's way)."""
        resume_file = str(resume_file)
        if not os.path.isfile(resume_file):
            raise UserInputError(f"cannot resume: no checkpoint file {resume_file}")
        checkpoint = load_checkpoint_for(resume_file, self.device)  # to the CPU: RNG states must stay there
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != RESUME_FORMAT:
            return super().resume_checkpoint(resume_file)
        if checkpoint["model"].lower() != self.config["model"].lower():
            raise UserInputError(
                f"cannot resume {self.config['model']} from {resume_file}: it was saved by {checkpoint['model']}"
            )
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.load_other_parameter(checkpoint["other_parameter"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.start_epoch = checkpoint["epoch"] + 1
        self.cur_step = checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        self.best_valid_result = checkpoint["best_valid_result"]
        self.train_loss_dict = dict(checkpoint["train_loss_dict"])
        self.saved_model_file = checkpoint["best_model_file"]
        self._pending_rng = checkpoint["rng"]
        self.logger.info(f"Resume point {resume_file} loaded: training continues at epoch {self.start_epoch}")

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        if self._pending_rng is not None:
            restore_rng_states(self._pending_rng, train_data)
            self._pending_rng = None

        def end_of_epoch(epoch_idx, valid_score):
            if saved and self.config["save_resume_points"] is not False:
                self.save_resume_point(epoch_idx, train_data)
            if callback_fn:
                callback_fn(epoch_idx, valid_score)

        result = super().fit(train_data, valid_data, verbose, saved, show_progress, end_of_epoch)
        if saved and is_main_process(self.config) and os.path.exists(self.resume_file):
            os.remove(self.resume_file)
        return result
