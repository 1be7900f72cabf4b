"""The RecBole trainer every run here uses: RecBole's own, plus what 1.2.1 lacks for these runs.

- DDP on CPU: RecBole wraps the model in ``DistributedDataParallel(model, device_ids=[rank])``,
  which only CUDA modules accept; on CPU the wrapper is built without device ids (gloo then
  averages the gradients). ``self.model`` stays the unwrapped model, as in RecBole, so tensor
  hooks on its parameters (AVL) scale each rank's gradients before DDP averages them.
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
- Checkpoints load under torch >= 2.6 (``with_trusted_checkpoints``).
- Resume points after every epoch, and atomic checkpoints (``trainer/resume.py``).
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Iterator, Mapping

import torch.distributed as dist
from recbole.trainer import Trainer
from recbole.utils import get_local_time
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from reveal_recbole.distributed import broadcast_from_rank0, is_distributed, is_main_process
from reveal_recbole.trainer.resume import with_resume_points
from reveal_recbole.utils import with_trusted_checkpoints


_TENSORBOARD_DIRS: set[str] = set()  # folders given to a trainer in this process


def _own_tensorboard(writer: SummaryWriter, config) -> SummaryWriter:
    """``writer`` if its folder is this run's (named for its model and dataset, new to this process), else a fresh one."""
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


class _NoTensorboard:
    """Stands in for the SummaryWriter on ranks > 0: every call is a no-op."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _single_process_view(config) -> Iterator[None]:
    """Hide DDP from RecBole's trainer constructor, which would build the CUDA-only wrapper."""
    config["single_spec"] = True
    try:
        yield
    finally:
        config["single_spec"] = False


@functools.lru_cache(maxsize=None)
def extend_trainer(trainer_class: type) -> type:
    """``trainer_class`` (a RecBole trainer) with CPU DDP, one DDP checkpoint and full tensorboard scalars."""

    base = with_trusted_checkpoints(trainer_class)
    if issubclass(trainer_class, Trainer):  # not RecBole's tree-model trainers
        base = with_resume_points(base)

    class ExtendedTrainer(base):
        def __init__(self, config, model):
            # RecBole's ensure_dir checks, then creates: DDP ranks racing there fail with FileExistsError
            os.makedirs(config["checkpoint_dir"], exist_ok=True)
            cpu_ddp = is_distributed(config) and config["device"].type == "cpu"
            with _single_process_view(config) if cpu_ddp else contextlib.nullcontext():
                super().__init__(config, model)
            if cpu_ddp:
                self.distributed_model = DistributedDataParallel(self.model)
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

        def _valid_epoch(self, valid_data, *args, **kwargs):  # RecBole's tree trainers take no show_progress
            start = time.perf_counter()
            score, result = super()._valid_epoch(valid_data, *args, **kwargs)
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

    ExtendedTrainer.__name__ = trainer_class.__name__
    ExtendedTrainer.__qualname__ = trainer_class.__qualname__
    return ExtendedTrainer
