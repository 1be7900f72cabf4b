from reveal_recbole.model.bert4rec_reveal import BERT4RecREVEAL
from reveal_recbole.model.feature_knn import FeatureKNN
from reveal_recbole.model.feature_peers import FDSA, GRU4RecF, SASRecF
from reveal_recbole.model.gru4rec_reveal import GRU4RecREVEAL
from reveal_recbole.model.item_encoder import REVEALItemEncoder
from reveal_recbole.model.m3srec import M3SRec
from reveal_recbole.model.missrec import MISSRec
from reveal_recbole.model.narm_reveal import NARMREVEAL
from reveal_recbole.model.reveal import REVEALRecommender, make_reveal_model, register_reveal_model
from reveal_recbole.model.sasrec_reveal import SASRecREVEAL
from reveal_recbole.model.unisrec import UniSRec

__all__ = [
    "BERT4RecREVEAL",
    "FDSA",
    "FeatureKNN",
    "GRU4RecF",
    "GRU4RecREVEAL",
    "M3SRec",
    "MISSRec",
    "NARMREVEAL",
    "REVEALItemEncoder",
    "REVEALRecommender",
    "SASRecF",
    "SASRecREVEAL",
    "UniSRec",
    "make_reveal_model",
    "register_reveal_model",
]
