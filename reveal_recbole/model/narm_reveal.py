"""NARMREVEAL: NARM with REVEAL's multimodal item encoder.

REVEAL: Li et al., "Teach Multimodal Recommendation Model to See via Personalized Visual
Extraction and Adaptive Learning", arXiv 2606.09082, 2026.
Backbone: Neural Attentive Session-based Recommendation (Li et al., CIKM 2017).
"""
from recbole.model.sequential_recommender import NARM

from reveal_recbole.model.reveal import REVEALRecommender, register_reveal_model


@register_reveal_model
class NARMREVEAL(REVEALRecommender, NARM):
    """NARM whose items are embedded and scored by the REVEAL item encoder."""

    backbone = NARM
