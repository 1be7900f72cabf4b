"""GRU4RecREVEAL: GRU4Rec with REVEAL's multimodal item encoder.

REVEAL: Li et al., "Teach Multimodal Recommendation Model to See via Personalized Visual
Extraction and Adaptive Learning", arXiv 2606.09082, 2026.
Backbone: Session-based Recommendations with Recurrent Neural Networks (Hidasi et al., ICLR 2016).
"""
from recbole.model.sequential_recommender import GRU4Rec

from reveal_recbole.model.reveal import REVEALRecommender, register_reveal_model


@register_reveal_model
class GRU4RecREVEAL(REVEALRecommender, GRU4Rec):
    """GRU4Rec whose items are embedded and scored by the REVEAL item encoder."""

    backbone = GRU4Rec
