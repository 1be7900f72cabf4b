"""Trainer for REVEAL models: RecBole's Trainer with checkpoint loading that works on torch >= 2.6."""
from __future__ import annotations

from recbole.trainer import Trainer

from reveal_recbole.utils import with_trusted_checkpoints


class REVEALTrainer(with_trusted_checkpoints(Trainer)):
    """RecBole's Trainer for REVEAL models; best-model reload and resume read our own checkpoints."""
