"""The RecBole trainer every run here uses: RecBole's own, plus what 1.2.1 lacks for these runs.

Two named mixins, composed once in :class:`TrainerExtensions` and placed before a RecBole trainer:
:class:`RunSupportMixin` (below) and :class:`~reveal_recbole.trainer.resume.ResumePointsMixin`.

- DDP: RecBole wraps the model in ``DistributedDataParallel(model, device_ids=[rank])``, which
  only CUDA modules accept, and which re-broadcasts every buffer from rank 0 at each step (RecBole
  calls the wrapper's forward every step): the loaded feature tables and FeatureKNN's item table,
  GBs at 1M items. Here the wrapper is built by :func:`data_parallel`, without device ids on CPU
  (gloo then averages the gradients), and with buffers synced once, at construction: they are
  constant data, and AVL's running means (``avl_running_losses``) follow from losses averaged
  across ranks, so every rank computes the same values. ``self.model`` stays the unwrapped model,
  as in RecBole, so tensor hooks on its parameters (AVL) scale each rank's gradients before DDP
  averages them.
- One checkpoint per DDP run: every rank names the checkpoint from its own clock, only rank 0
  saves it, and every rank reloads it for the test. All ranks take rank 0's name, and wait for
  its save before reloading.
- Tensorboard: RecBole writes the train loss and the valid score; the other valid metrics and
  the epoch times are logged but never reach tensorboard: here they go to ``Valid/<metric>``,
  ``Time/train_s`` and ``Time/valid_s`` per epoch. ``log_final`` writes end-of-run values (test
  metrics, visual utilisation). Only rank 0 writes events, as only rank 0 logs in RecBole.
  RecBole names the tensorboard folder after the process's first log file (``model-<time>``
  without one), so later runs in the same process (``compare``, seeds) would write into the first
  run's folder: a run whose folder is not its own gets ``log_tensorboard/<model>-<dataset>-<time>``.
- DDP ranks no longer race to create the checkpoint folder (RecBole's check-then-create).
- Unique checkpoint names: RecBole names the best-model file ``<model>-<time to the second>.pth``,
  so two runs of one model started in the same second (seeds in one ``compare``, parallel
  processes) would overwrite each other's best model and test the wrong one. Each trainer claims
  its name (an empty file created exclusively; ``-2``, ``-3``... when taken), removed again if no
  checkpoint was ever written into it.
- Checkpoints load under torch >= 2.6, and to the CPU (``recbole_seam.load_checkpoint_for``, the
  one loading policy, which RecBole's ``evaluate(load_best_model=True)`` goes through too).
- Resume points after every epoch, and atomic checkpoints (``trainer/resume.py``).
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
import weakref
from typing import Mapping

import torch
import torch.distributed as dist
from recbole.trainer import Trainer
from recbole.utils import get_local_time
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from reveal_recbole.distributed import broadcast_from_rank0, is_distributed, is_main_process
from reveal_recbole.recbole_seam import without_ddp_wrapper
from reveal_recbole.trainer.resume import ResumePointsMixin

_TENSORBOARD_DIRS: set[str] = set()  # folders given to a trainer in this process


def _own_tensorboard(writer: SummaryWriter, config) -> SummaryWriter:
    """``writer`` if its folder is this run's (named for model and dataset, new to this process), else a new one."""
    log_dir = os.path.abspath(writer.get_logdir())  # absolute: a later chdir cannot misdirect the writer thread
    prefix = f"{config['model']}-{config['dataset']}-"
    if log_dir in _TENSORBOARD_DIRS or not os.path.basename(log_dir).startswith(prefix):
        base = os.path.join(os.path.dirname(log_dir), prefix + get_local_time())
        log_dir, n = base, 2
        while log_dir in _TENSORBOARD_DIRS or os.path.exists(log_dir):
            log_dir, n = f"{base}-{n}", n + 1
    if log_dir != writer.get_logdir():
        writer.close()
        writer = SummaryWriter(log_dir)
    _TENSORBOARD_DIRS.add(log_dir)
    return writer


def claim_checkpoint_name(path: str) -> str:
    """``path``, or ``<stem>-<n><ext>`` if taken: the first name this process creates exclusively."""
    stem, ext = os.path.splitext(path)
    candidate, n = path, 2
    while True:
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return candidate
        except FileExistsError:
            candidate, n = f"{stem}-{n}{ext}", n + 1


def _remove_if_empty(path: str) -> None:
    """Drop a claimed checkpoint name that never received a checkpoint."""
    with contextlib.suppress(OSError):
        if os.path.getsize(path) == 0:
            os.remove(path)


def data_parallel(model, config) -> tuple[torch.nn.Module, DistributedDataParallel]:
    """(model, its DDP wrapper) as RecBole builds them, but buffers are not re-broadcast at every step.

    On CUDA: RecBole's SyncBatchNorm conversion and one device per rank; on CPU: no device ids.
    Buffers are broadcast from rank 0 once, at construction (``broadcast_buffers`` set afterwards:
    passed to the constructor it would skip that too, and torch >= 2.13 deprecates the argument).
    """
    device_ids = None
    if config["device"].type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [config["local_rank"]]
    wrapper = DistributedDataParallel(model, device_ids=device_ids)
    wrapper.broadcast_buffers = False
    return model, wrapper


class _NoTensorboard:
    """Stands in for the SummaryWriter on ranks > 0: every call is a no-op."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class RunSupportMixin:
    """DDP on CPU and GPU, one checkpoint per DDP run, race-free checkpoint folder and full tensorboard scalars."""

    def __init__(self, config, model):
        # RecBole's ensure_dir checks, then creates: DDP ranks racing there fail with FileExistsError
        os.makedirs(config["checkpoint_dir"], exist_ok=True)
        with without_ddp_wrapper(config) if is_distributed(config) else contextlib.nullcontext():
            super().__init__(config, model)
        if is_distributed(config):
            self.model, self.distributed_model = data_parallel(self.model, config)
        if is_main_process(config):
            self.saved_model_file = claim_checkpoint_name(self.saved_model_file)
            weakref.finalize(self, _remove_if_empty, self.saved_model_file)
        if is_distributed(config):
            self.saved_model_file = broadcast_from_rank0(self.saved_model_file)
            if not is_main_process(config):
                self.tensorboard.close()
                self.tensorboard = _NoTensorboard()
        if is_main_process(config):
            self.tensorboard = _own_tensorboard(self.tensorboard, config)
        self._epoch = -1

    def fit(self, *args, **kwargs):
        try:
            return super().fit(*args, **kwargs)
        finally:
            self.tensorboard.flush()

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        self._epoch = epoch_idx
        start = time.perf_counter()
        loss = super()._train_epoch(train_data, epoch_idx, loss_func, show_progress)
        self.tensorboard.add_scalar("Time/train_s", time.perf_counter() - start, epoch_idx)
        return loss

    def _valid_epoch(self, valid_data, show_progress=False):
        start = time.perf_counter()
        score, result = super()._valid_epoch(valid_data, show_progress=show_progress)
        self.tensorboard.add_scalar("Time/valid_s", time.perf_counter() - start, self._epoch)
        for metric, value in result.items():
            self.tensorboard.add_scalar(f"Valid/{metric}", value, self._epoch)
        return score, result

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if load_best_model and is_distributed(self.config):
            dist.barrier()  # rank 0 has finished writing the checkpoint
        return super().evaluate(eval_data, load_best_model, model_file, show_progress)

    def log_final(self, tag: str, values: Mapping[str, float]) -> None:
        """End-of-run scalars ``<tag>/<name>`` (at the last trained epoch), flushed at once."""
        for name, value in values.items():
            self.tensorboard.add_scalar(f"{tag}/{name}", float(value), max(self._epoch, 0))
        self.tensorboard.flush()


class TrainerExtensions(ResumePointsMixin, RunSupportMixin):
    """Everything a RecBole ``Trainer`` gets here: resume points, atomic checkpoints, CPU DDP, tensorboard."""


@functools.lru_cache(maxsize=None)
def extended_trainer(trainer_class: type) -> type:
    """``Extended<Name>``: a RecBole ``Trainer`` subclass with :class:`TrainerExtensions` (built once per class).

    RecBole's tree-model trainers (not ``Trainer`` subclasses) are returned as they are.
    """
    if not issubclass(trainer_class, Trainer) or issubclass(trainer_class, TrainerExtensions):
        return trainer_class
    return type(f"Extended{trainer_class.__name__}", (TrainerExtensions, trainer_class),
                {"__doc__": f"RecBole's {trainer_class.__name__} with reveal-recbole's TrainerExtensions."})
