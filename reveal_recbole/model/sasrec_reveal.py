"""SASRecREVEAL: SASRec with REVEAL's multimodal item encoder.

REVEAL: Li et al., "Teach Multimodal Recommendation Model to See via Personalized Visual
Extraction and Adaptive Learning", arXiv 2606.09082, 2026.
Backbone: Self-Attentive Sequential Recommendation (Kang and McAuley, ICDM 2018).
"""
from recbole.model.sequential_recommender import SASRec

from reveal_recbole.model.reveal import REVEALRecommender, register_reveal_model


@register_reveal_model
class SASRecREVEAL(REVEALRecommender, SASRec):
    """SASRec whose items are embedded and scored by the REVEAL item encoder."""

    backbone = SASRec
