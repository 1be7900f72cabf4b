"""reveal-recbole: REVEAL multimodal sequential recommendation for RecBole.

Importing the package checks the RecBole version and registers the REVEAL models, the
multimodal dataset class and the trainer with RecBole's lookups (``recbole_seam``).
"""
from reveal_recbole.comparison import compare
from reveal_recbole.config import Config
from reveal_recbole.data import MultimodalSequentialDataset, create_dataset
from reveal_recbole.model import (
    BERT4RecREVEAL,
    GRU4RecREVEAL,
    NARMREVEAL,
    REVEALItemEncoder,
    SASRecREVEAL,
    make_reveal_model,
)
from reveal_recbole.quick_start import objective_function, run_reveal
from reveal_recbole.registry import get_model, get_trainer, registered_models
from reveal_recbole.trainer import REVEALTrainer

__version__ = "0.1.0"

__all__ = [
    "BERT4RecREVEAL",
    "Config",
    "GRU4RecREVEAL",
    "MultimodalSequentialDataset",
    "NARMREVEAL",
    "REVEALItemEncoder",
    "REVEALTrainer",
    "SASRecREVEAL",
    "compare",
    "create_dataset",
    "get_model",
    "get_trainer",
    "make_reveal_model",
    "objective_function",
    "registered_models",
    "run_reveal",
]
