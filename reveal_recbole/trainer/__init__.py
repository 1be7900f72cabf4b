from reveal_recbole.trainer.trainer import REVEALTrainer

__all__ = ["REVEALTrainer"]
