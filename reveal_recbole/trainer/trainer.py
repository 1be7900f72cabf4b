"""Trainer for REVEAL models: RecBole's Trainer with :class:`TrainerExtensions`, plus AVL."""
from __future__ import annotations

import os

from recbole.trainer import Trainer
from recbole.utils import set_color

from reveal_recbole.diagnostics import UTILISATION_CSV_SUFFIX, append_csv_row, utilisation_row, visual_utilisation
from reveal_recbole.distributed import is_main_process
from reveal_recbole.trainer.avl import AdaptiveVisualLearning, AVLConfig
from reveal_recbole.trainer.base import TrainerExtensions


class REVEALTrainer(TrainerExtensions, Trainer):
    """RecBole's Trainer; with ``avl: True`` each step's loss goes through Adaptive Visual Learning.

    AVL plugs in as the ``loss_func`` of RecBole's own training loop, so batching, AMP, gradient
    clipping, early stopping, checkpointing and logging stay RecBole's. Per-step AVL values go
    to ``<saved model file>-avl.csv``; per-epoch means to the log and tensorboard. Under DDP every
    rank computes the same K_v (``all_reduce_mean``) and rank 0 writes the CSV, with its own
    gradient norms (before DDP averages the ranks' gradients).

    With ``utilisation_per_epoch: True`` each validation also evaluates with the image, then the
    text input masked, so the epoch where the IDs take over shows: drops in the log, tensorboard
    (``Utilisation/valid_<modality>_masked_drop/<metric>``) and ``<saved model file>-utilisation.csv``.
    """

    def __init__(self, config, model):
        super().__init__(config, model)
        self.avl = self._build_avl(config, model)
        stem = os.path.splitext(self.saved_model_file)[0]
        self.avl_csv_file = stem + "-avl.csv"
        self.utilisation_csv_file = stem + UTILISATION_CSV_SUFFIX
        wanted = ("image", "text") if config["utilisation_per_epoch"] else ()
        self.utilisation_modalities = [m for m in wanted if m in model.item_embedding.modalities]

    def _build_avl(self, config, model) -> AdaptiveVisualLearning | None:
        if not config["avl"]:
            return None
        settings = AVLConfig.from_config(config)
        missing = {settings.visual, settings.text} - set(model.item_embedding.modalities)
        if missing:
            self.logger.warning(f"AVL is off: it compares image and text, and the model has no {sorted(missing)} input")
            return None
        return AdaptiveVisualLearning(model, settings)

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if self.avl is None or loss_func is not None:
            return super()._train_epoch(train_data, epoch_idx, loss_func, show_progress)
        # AVL's gradient hooks live only inside the epoch, so they are gone when fit returns or raises:
        # a later trainer on the same model scales with its own K_v, or not at all
        with self.avl.gradient_hooks():
            loss = super()._train_epoch(train_data, epoch_idx, self.avl.training_loss, show_progress)
        summary = self.avl.end_epoch(epoch_idx, self.avl_csv_file if is_main_process(self.config) else None)
        if summary:
            self.logger.info(
                set_color(f"epoch {epoch_idx} AVL", "green")
                + ": " + ", ".join(f"{key}: {value:.4f}" for key, value in summary.items())
            )
            for key, value in summary.items():
                self.tensorboard.add_scalar(f"AVL/{key}", value, epoch_idx)
        return loss

    def _valid_epoch(self, valid_data, show_progress=False):
        score, result = super()._valid_epoch(valid_data, show_progress)
        if self.utilisation_modalities:  # every DDP rank evaluates (the metrics are reduced across ranks)
            report = visual_utilisation(self, valid_data, self.utilisation_modalities, full=result)
            self._log_utilisation(report)
        return score, result

    def _log_utilisation(self, report: dict) -> None:
        drops = {f"{modality}_masked_drop/{metric}": value
                 for modality, values in report["drop"].items() for metric, value in values.items()}
        self.logger.info(set_color(f"epoch {self._epoch} valid drop when masked", "green") + ": "
                         + ", ".join(f"{key}: {value:.4f}" for key, value in drops.items()))
        for key, value in drops.items():
            self.tensorboard.add_scalar(f"Utilisation/valid_{key}", value, self._epoch)
        if is_main_process(self.config):
            append_csv_row(self.utilisation_csv_file, utilisation_row(self._epoch, report))
