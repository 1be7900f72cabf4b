"""``download: auto``: a dataset with a raw source is fetched, converted, its images downloaded and its features
extracted on first use (reveal_recbole.prepare), from a local HTTP server on 127.0.0.1 (no network).

The miniature raw set is the one of tests/test_dataset_prep_pipeline.py (40 users, 24 items after the 5-core,
reviews as JSON lines, 2014 metadata as Python literals), served with Range support; its images include a 404,
a broken JPEG and a slow response.
"""
from __future__ import annotations

import gzip
import logging
import sys

import pytest
import yaml

from reveal_recbole import Config, prepare
from reveal_recbole.data import DatasetNotPreparedError, create_dataset
from reveal_recbole.data.sources import RawSource, raw_source
from reveal_recbole.errors import ConfigError, PreparationError

from conftest import load_script, make_tiny_config
from test_dataset_prep_download import body, encoded, picture, server  # noqa: F401  (server: a fixture)
from test_dataset_prep_pipeline import ITEMS, NOT_FOUND, PER_USER, USERS, write_raw

NAME = "mini"
BROKEN, SLOW = ITEMS[3], ITEMS[5]  # a JPEG cut short (refused, not retried), one answered after a pause
COUNTS = {"users": len(USERS), "items": len(ITEMS), "interactions": len(USERS) * PER_USER}
REVIEWS, META = "/raw/reviews_Mini_5.json.gz", "/raw/meta_Mini.json.gz"
pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def ranged(data: bytes, cut: int | None = None, delay: float = 0.0):
    """A file served with ``Range: bytes=N-`` support; ``cut``: the first answer stops after that many bytes,
    its Content-Length still the whole file's (a download killed half-way)."""
    import time

    def route(handler, n):
        time.sleep(delay)
        handler.server.app.ranges.append((handler.path, handler.headers.get("Range")))
        start = 0
        asked = handler.headers.get("Range")
        if asked and asked.startswith("bytes=") and asked.endswith("-"):
            start = int(asked[6:-1])
        if start >= len(data):
            handler.send_response(416)
            handler.send_header("Content-Range", f"bytes */{len(data)}")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        handler.send_response(206 if start else 200)
        handler.send_header("Content-Type", "application/gzip")
        handler.send_header("Content-Length", str(len(data) - start))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.end_headers()
        handler.wfile.write(data[start:cut] if cut and n == 1 else data[start:])
        handler.close_connection = True

    return route


@pytest.fixture
def mini(server, tmp_path, monkeypatch):  # noqa: F811
    """The server with the miniature raw set and its images; returns (server, config dict)."""
    monkeypatch.chdir(tmp_path)  # RecBole writes ./log and ./log_tensorboard
    monkeypatch.setattr(prepare, "IMAGE_BACKOFF", 0.0)
    monkeypatch.setattr(prepare, "IMAGE_RETRIES", 1)
    server.ranges = []
    reviews, meta = write_raw(tmp_path / "raw", lambda item: server.url(f"/img/{item}.jpg"))
    server.raw = {REVIEWS: reviews.read_bytes(), META: meta.read_bytes()}
    server.routes.update({path: ranged(data) for path, data in server.raw.items()})
    for i, item in enumerate(ITEMS):
        jpeg = encoded(picture(i, (48, 40)), "JPEG", quality=90)
        if item == BROKEN:
            server.routes[f"/img/{item}.jpg"] = body(jpeg[: len(jpeg) // 2])
        elif item != NOT_FOUND:
            server.routes[f"/img/{item}.jpg"] = body(jpeg, delay=0.5 if item == SLOW else 0.0)
    config = make_tiny_config(tmp_path / "data", tmp_path / "saved") | {
        "raw_urls": {"reviews": server.url(REVIEWS), "meta": server.url(META)},
        "published_counts": COUNTS,
        "fve_encoder": "efficientnet-onnx",
        "diagnostics_figure": False,
        "utilisation_per_epoch": False,
        "state": "INFO",
    }
    return server, config


def requests(app) -> dict[str, int]:
    return dict(app.counts)


def test_run_reveal_prepares_from_the_server_trains_and_a_second_run_downloads_nothing(mini, tmp_path, monkeypatch,
                                                                                        caplog):
    pytest.importorskip("onnxruntime")
    app, config = mini
    config_file = tmp_path / "mini.yaml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    argv = ["run_reveal.py", "--model=SASRecREVEAL", f"--dataset={NAME}", f"--config_files={config_file}"]
    monkeypatch.setattr(sys, "argv", argv)
    run_reveal = load_script("run_reveal")
    caplog.set_level(logging.INFO)

    run_reveal.main()

    folder = tmp_path / "data" / NAME
    for stage in prepare.STAGES:
        assert (folder / prepare.MARKER_DIR / f"{stage}.json").is_file(), stage
    stages = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"prepare {NAME} [")]
    assert [line.split("]")[0] for line in stages] == [f"prepare {NAME} [{n}/4 {s}" for n, s in
                                                         enumerate(prepare.STAGES, start=1)]
    assert "the published 5-core counts" in stages[1]
    assert "22 downloaded, 0 already there, 2 failed of 24 items" in stages[2]
    assert "image efficientnet-onnx 1280-d, 22 encoded" in stages[3] and "2 fallback" in stages[3]
    assert not list(folder.rglob("*.part")) and not list(folder.rglob(".*.tmp"))
    failed = (folder / f"{NAME}.images_failed.tsv").read_text(encoding="utf-8")
    assert f"{NOT_FOUND}\t" in failed and "HTTP 404" in failed and f"{BROKEN}\t" in failed
    assert (folder / "images" / f"{SLOW}.jpg").is_file()
    assert any("test result" in r.getMessage() for r in caplog.records)
    assert list((tmp_path / "saved").glob("SASRecREVEAL-*.pth"))
    first = requests(app)
    assert first[REVIEWS] == first[META] == 1 and first[f"/img/{NOT_FOUND}.jpg"] == 1
    assert sum(first.values()) == 2 + len(ITEMS)  # every file asked for once: a 404 and a broken image not retried

    caplog.clear()
    run_reveal.main()

    assert requests(app) == first  # the second run downloads nothing
    assert not [r for r in caplog.records if r.getMessage().startswith(f"prepare {NAME}")]
    assert any("test result" in r.getMessage() for r in caplog.records)


def test_a_killed_preparation_resumes_without_refetching(mini, tmp_path, monkeypatch, caplog):
    pytest.importorskip("onnxruntime")
    app, config = mini
    half = len(app.raw[REVIEWS]) // 2
    app.routes[REVIEWS] = ranged(app.raw[REVIEWS], cut=half)  # the first answer stops half-way
    config |= {"published_counts": {"users": 35598, "items": 18357, "interactions": 296337}, "modalities": ["image"]}
    source = raw_source(Config(model="SASRecREVEAL", dataset=NAME, config_dict=config))
    part = source.raw_path("reviews").with_name("reviews_Mini_5.json.gz.part")

    # 1. killed mid-download: one error naming the stage and the URL; the part kept, nothing looks done
    with pytest.raises(PreparationError, match=rf"fetch: {app.url(REVIEWS)}: the connection closed after {half:,}"):
        prepare.prepare(source, ["image"], ("efficientnet-onnx", None))
    assert part.stat().st_size == half
    assert not source.raw_path("reviews").exists() and not (source.folder / prepare.MARKER_DIR).exists()

    # 2. killed after stage 2 (convert): the reviews resumed from byte `half`
    def killed(_source):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "images", killed)
    with pytest.raises(KeyboardInterrupt), caplog.at_level(logging.INFO):
        prepare.prepare(source, ["image"], ("efficientnet-onnx", None))
    assert app.ranges == [(REVIEWS, None), (REVIEWS, f"bytes={half}-"), (META, None)]
    assert source.raw_path("reviews").read_bytes() == app.raw[REVIEWS] and not part.exists()
    markers = sorted(p.name for p in (source.folder / prepare.MARKER_DIR).iterdir())
    assert markers == ["convert.json", "fetch.json"]
    assert any("the published counts are 35,598 / 18,357 / 296,337" in r.getMessage() for r in caplog.records)
    assert not (source.folder / "images").exists() or not list((source.folder / "images").iterdir())

    # 3. the rerun starts at stage 3: no raw file asked for again, no conversion
    monkeypatch.undo()
    monkeypatch.setattr(prepare, "IMAGE_BACKOFF", 0.0)
    monkeypatch.setattr(prepare, "convert", lambda _source: pytest.fail("converted again"))
    raw_before = {path: app.counts[path] for path in (REVIEWS, META)}
    summaries = prepare.prepare(source, ["image"], ("efficientnet-onnx", None))
    assert {path: app.counts[path] for path in (REVIEWS, META)} == raw_before
    assert summaries["convert"]["users"] == len(USERS)  # read back from its marker
    assert summaries["images"]["downloaded"] == len(ITEMS) - 2  # the 404 and the broken JPEG failed
    assert summaries["features"]["modalities"]["image"]["encoded"] == len(ITEMS) - 2
    assert (source.folder / f"{NAME}.image.npy").is_file() and not (source.folder / f"{NAME}.text.npy").exists()


@pytest.mark.parametrize("case", ["404", "truncated gzip", "timeout"])
def test_a_failed_fetch_is_one_error_naming_stage_and_url_and_leaves_nothing_complete(server, tmp_path, monkeypatch,  # noqa: F811
                                                                                      case):
    data = gzip.compress(b'{"reviewerID": "u", "asin": "i", "unixReviewTime": 1}\n' * 200)
    if case == "truncated gzip":
        server.routes["/r.json.gz"] = body(data[: len(data) - 20], "application/gzip")
    elif case == "timeout":
        monkeypatch.setattr(prepare, "READ_TIMEOUT", 0.3)
        server.routes["/r.json.gz"] = body(data, "application/gzip", delay=1.0)
    source = RawSource(NAME, tmp_path / NAME, {"reviews": server.url("/r.json.gz")})
    expected = {"404": "HTTP 404", "truncated gzip": "truncated or corrupt gzip", "timeout": "timed out"}[case]
    with pytest.raises(PreparationError, match=rf"^fetch: {server.url('/r.json.gz')}: {expected}"):
        prepare.prepare(source, [])
    assert not source.raw_path("reviews").exists() and not (tmp_path / NAME / prepare.MARKER_DIR).exists()
    assert not list((tmp_path / NAME).rglob("*.part"))


def test_offline_auto_stops_after_one_fast_attempt_and_never_at_once(server, tmp_path, monkeypatch):  # noqa: F811
    import socket
    import time

    with socket.socket() as closed:  # a port nothing listens on: connection refused, as offline
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    base = {"data_path": str(tmp_path), "checkpoint_dir": str(tmp_path / "saved")}
    offline = base | {"raw_urls": {"reviews": f"{dead}/r_5.json.gz", "meta": f"{dead}/meta_r.json.gz"}}
    start = time.perf_counter()
    with pytest.raises(DatasetNotPreparedError) as excinfo:
        create_dataset(Config(model="SASRecREVEAL", dataset=NAME, config_dict=offline))
    assert time.perf_counter() - start < 5
    message = str(excinfo.value)
    assert f"not prepared (download: auto could not reach {dead}/r_5.json.gz (" in message
    assert f"curl -fL -C - --create-dirs -o {tmp_path / NAME / 'raw' / 'r_5.json.gz'} {dead}/r_5.json.gz" in message
    assert "python dataset_prep/extract_features.py" in message
    assert not (tmp_path / NAME).exists()

    never = base | {"download": "never", "raw_urls": {"reviews": server.url("/r_5.json.gz")}}
    with pytest.raises(DatasetNotPreparedError, match=r"not prepared \(download: never\)"):
        create_dataset(Config(model="SASRec", dataset=NAME, config_dict=never))
    assert not server.counts
    with pytest.raises(ConfigError, match="download must be one of auto, never"):
        create_dataset(Config(model="SASRec", dataset=NAME, config_dict=never | {"download": "sometimes"}))


def test_sources_of_the_paper_datasets_and_the_amazon_name_patterns(tmp_path):
    def source(name):
        return raw_source(Config(model="SASRec", dataset=name, config_dict={"data_path": str(tmp_path)}))

    sports = source("sports")
    assert sports.urls == {
        "reviews": "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_Sports_and_Outdoors_5.json.gz",
        "meta": "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/meta_Sports_and_Outdoors.json.gz",
    }
    assert sports.published == {"users": 35598, "items": 18357, "interactions": 296337}
    assert source("beauty").published == {"users": 22363, "items": 12101, "interactions": 198502}
    assert source("toys").raw_path("meta") == tmp_path / "toys" / "raw" / "meta_Toys_and_Games.json.gz"
    assert source("amazon2014-Beauty").urls["reviews"].endswith("/productGraph/categoryFiles/reviews_Beauty_5.json.gz")
    later = source("amazon2018-Industrial_and_Scientific")
    assert later.urls == {
        "reviews": "https://jmcauley.ucsd.edu/data/amazon_v2/categoryFilesSmall/Industrial_and_Scientific_5.json.gz",
        "meta": "https://jmcauley.ucsd.edu/data/amazon_v2/metaFiles2/meta_Industrial_and_Scientific.json.gz",
    }
    assert later.published is None and later.folder == tmp_path / "amazon2018-Industrial_and_Scientific"
    assert source("scientific") is None and source("amazon2020-Beauty") is None


def test_a_local_copy_is_fetched_through_file_urls_and_disk_space_is_checked(tmp_path, monkeypatch):
    raw = tmp_path / "copy.json.gz"
    raw.write_bytes(gzip.compress(b"{}\n"))
    source = RawSource(NAME, tmp_path / NAME, {"reviews": raw.as_uri()})
    summary = prepare.fetch(source)
    assert source.raw_path("reviews").read_bytes() == raw.read_bytes()
    assert summary["fetched_bytes"] == raw.stat().st_size

    class Full:
        free = 10

    monkeypatch.setattr(prepare.shutil, "disk_usage", lambda path: Full)
    other = RawSource("other", tmp_path / "other", {"reviews": raw.as_uri()})
    with pytest.raises(PreparationError, match=rf"^fetch: {raw.as_uri()}: needs 0 MiB .* which has 0 MiB free"):
        prepare.fetch(other)
    assert not other.raw_path("reviews").exists()


def test_a_configured_hub_encoder_without_weights_or_network_falls_back_to_the_offline_one(monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING):
        assert prepare.usable_image_encoder("clip", "nobody/no-such-clip") == (None, None)
    assert "clip nobody/no-such-clip cannot load (HF_HUB_OFFLINE is set" in caplog.text
    assert "offline EfficientNet-Lite0" in caplog.text
    assert prepare.usable_image_encoder("efficientnet-onnx", None) == ("efficientnet-onnx", None)



def test_an_id_only_model_needs_fetch_and_convert_only_and_a_foreign_inter_is_never_overwritten(mini, tmp_path):
    app, config = mini
    dataset = create_dataset(Config(model="SASRec", dataset=NAME, config_dict=config))
    assert dataset.user_num - 1 == len(USERS) and dataset.inter_num == COUNTS["interactions"]
    folder = tmp_path / "data" / NAME
    assert sorted(p.name for p in (folder / prepare.MARKER_DIR).iterdir()) == ["convert.json", "fetch.json"]
    assert set(app.counts) == {REVIEWS, META}  # no image asked for

    other = tmp_path / "other"  # a .inter made another way (e.g. convert_s3rec.py), and a REVEAL run needs features
    (other / NAME).mkdir(parents=True)
    (folder / f"{NAME}.inter").rename(other / NAME / f"{NAME}.inter")
    with pytest.raises(DatasetNotPreparedError, match="exists but was not made from the raw files"):
        create_dataset(Config(model="SASRecREVEAL", dataset=NAME, config_dict=config | {"data_path": str(other)}))
    assert set(app.counts) == {REVIEWS, META} and not (other / NAME / "raw").exists()


def test_killed_between_the_converted_files_and_the_marker_converts_again(mini, monkeypatch):
    app, config = mini
    source = raw_source(Config(model="SASRec", dataset=NAME, config_dict=config))
    real = prepare.convert

    def converted_then_killed(source):
        real(source)
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "convert", converted_then_killed)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(source, [])
    assert (source.folder / f"{NAME}.inter").is_file() and not (source.folder / ".prepare" / "convert.json").exists()
    monkeypatch.setattr(prepare, "convert", real)
    summaries = prepare.prepare(source, [])  # its own .inter, not a foreign one: converted again
    assert summaries["convert"]["interactions"] == COUNTS["interactions"]
    assert sorted(p.name for p in (source.folder / ".prepare").iterdir()) == ["convert.json", "fetch.json"]
    assert app.counts[REVIEWS] == app.counts[META] == 1
