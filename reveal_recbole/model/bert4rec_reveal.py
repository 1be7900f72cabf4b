"""BERT4RecREVEAL: BERT4Rec with REVEAL's multimodal item encoder.

REVEAL: Li et al., "Teach Multimodal Recommendation Model to See via Personalized Visual
Extraction and Adaptive Learning", arXiv 2606.09082, 2026.
Backbone: BERT4Rec (Sun et al., CIKM 2019); its extra mask-token row has no features and uses the ID embedding only.
"""
from recbole.model.sequential_recommender import BERT4Rec

from reveal_recbole.model.reveal import REVEALRecommender, register_reveal_model


@register_reveal_model
class BERT4RecREVEAL(REVEALRecommender, BERT4Rec):
    """BERT4Rec whose items are embedded and scored by the REVEAL item encoder."""

    backbone = BERT4Rec
