"""FVE (Feedback-Guided Visual Extraction): REVEAL's prompt-conditioned image features.

Each step of the method is a small function or class in its own module, so the FVE loop is
their composition: ``prompt`` (initial prompts), ``extract`` (prompt-conditioned
image features; ``reveal_recbole.data.feature_cache`` recomputes only changed prompts), ``feedback``
(per-item ranking statistics on the validation split), ``select`` (priority and the hard items), ``critic`` (rewritten
prompts for the hard items), ``keep`` (whether a round's validation gain is real: a paired test
over the validation users), ``sources`` (item images, metadata and reviews on disk),
``attention`` (the share of patch weight on an item's own region, where a dataset records it) and
``loop`` (:func:`run_fve`, the rounds, resumable). ``efficientnet`` is an offline image encoder
with real weights that does not condition on the prompt. Model libraries (transformers,
efficientnet) load only when a backend is built.
"""
from reveal_recbole.fve.attention import read_item_regions, region_attention_mass
from reveal_recbole.fve.critic import (
    Critic,
    CriticReply,
    CriticRequest,
    HFChatCritic,
    HFVisionCritic,
    OfflineCritic,
    OpenAICompatibleCritic,
    RandomReviewWordsCritic,
    build_critic_request,
    critic_image,
    parse_critic_output,
    sanitize_untrusted,
)
from reveal_recbole.fve.efficientnet import EfficientNetLiteEncoder
from reveal_recbole.fve.extract import (
    CLIPPromptEncoder,
    ImageEncoder,
    ItemImage,
    VLMPromptEncoder,
    extract_item_features,
    missing_image_vector,
)
from reveal_recbole.fve.feedback import RankFeedback, TargetRanks, collect_valid_feedback, rank_feedback
from reveal_recbole.fve.keep import KeepDecision, keep_round, paired_p_value, user_metric
from reveal_recbole.fve.loop import FVEError, FVEState, build_critic, build_encoder, initial_prompts, run_fve
from reveal_recbole.fve.prompt import (
    DEFAULT_TEMPLATE,
    build_prompt,
    item_category,
    keyword_text,
    review_keywords,
    review_phrase,
)
from reveal_recbole.fve.select import (
    OVER_RANKED_NEGATIVE,
    UNDER_RANKED_POSITIVE,
    feedback_type,
    observed_items,
    priority,
    select_hard_items,
)
from reveal_recbole.fve.sources import ItemImageSource, ItemText, read_item_texts

__all__ = [
    "CLIPPromptEncoder",
    "Critic",
    "CriticReply",
    "CriticRequest",
    "DEFAULT_TEMPLATE",
    "EfficientNetLiteEncoder",
    "FVEError",
    "FVEState",
    "HFChatCritic",
    "HFVisionCritic",
    "ImageEncoder",
    "ItemImage",
    "ItemImageSource",
    "ItemText",
    "KeepDecision",
    "OVER_RANKED_NEGATIVE",
    "OfflineCritic",
    "OpenAICompatibleCritic",
    "RandomReviewWordsCritic",
    "RankFeedback",
    "TargetRanks",
    "UNDER_RANKED_POSITIVE",
    "VLMPromptEncoder",
    "build_critic",
    "build_critic_request",
    "build_encoder",
    "build_prompt",
    "critic_image",
    "collect_valid_feedback",
    "extract_item_features",
    "feedback_type",
    "initial_prompts",
    "item_category",
    "keep_round",
    "keyword_text",
    "missing_image_vector",
    "observed_items",
    "paired_p_value",
    "parse_critic_output",
    "priority",
    "rank_feedback",
    "read_item_regions",
    "read_item_texts",
    "region_attention_mass",
    "review_keywords",
    "review_phrase",
    "run_fve",
    "sanitize_untrusted",
    "select_hard_items",
    "user_metric",
]
