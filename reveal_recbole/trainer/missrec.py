"""Trainer for MISSRec: the REVEAL trainer, with MISSRec's interest clustering before every training epoch."""
from __future__ import annotations

from reveal_recbole.trainer.trainer import REVEALTrainer


class MISSRecTrainer(REVEALTrainer):
    """AVL, diagnostics, resume points as :class:`REVEALTrainer`; the interests are found again before every
    epoch from the adaptors' current outputs (their ``MISSRecTrainer._train_epoch``)."""

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        getattr(self.model, "module", self.model).discover_interests(epoch_idx)  # DDP wraps the model
        return super()._train_epoch(train_data, epoch_idx, loss_func, show_progress)
