from reveal_recbole.trainer.missrec import MISSRecTrainer
from reveal_recbole.trainer.trainer import REVEALTrainer

__all__ = ["MISSRecTrainer", "REVEALTrainer"]
