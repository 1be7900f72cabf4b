"""dataset_prep/download_images.py with file:// URLs only (no network in tests)."""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataset_prep import download_images  # noqa: E402


def image_file(path: Path, fmt: str, colour=(200, 30, 30)) -> str:
    Image.new("RGB", (12, 10), colour).save(path, format=fmt)
    return path.resolve().as_uri()


def test_download_resume_failures_and_local_paths(tmp_path):
    src = tmp_path / "remote"
    src.mkdir()
    jpg = image_file(src / "a.jpg", "JPEG")
    png = image_file(src / "b.png", "PNG")
    gif = image_file(src / "c.gif", "GIF")
    (src / "broken.jpg").write_bytes(b"not an image")
    data = tmp_path / "ds"
    (data / "pics").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(data / "pics" / "local.png")
    rows = [
        ("A1", [jpg]),
        ("B2", [png, jpg]),
        ("C3", [gif]),
        ("D4", [(src / "broken.jpg").resolve().as_uri(), png]),
        ("E5", [(src / "missing.jpg").resolve().as_uri()]),
        ("F6", ["pics/local.png"]),
    ]
    (data / "x.images.tsv").write_text(
        "item_id\timage_urls\n" + "".join(f"{item}\t{' '.join(urls)}\n" for item, urls in rows)
    )
    result = download_images.download(data, "x", workers=3, retries=1, backoff=0.0)
    assert (result["downloaded"], result["present"], result["failed"]) == (3, 1, 2)
    images = data / "images"
    assert sorted(p.name for p in images.iterdir()) == ["A1.jpg", "B2.png", "C3.png"]
    with Image.open(images / "C3.png") as converted:
        assert converted.format == "PNG" and converted.size == (12, 10)
    failed = (data / "x.images_failed.tsv").read_text().splitlines()
    assert failed[0] == "item_id\turl\treason" and [l.split("\t")[0] for l in failed[1:]] == ["D4", "E5"]

    # with fallbacks D4 gets its second URL; a second run skips what is there
    again = download_images.download(data, "x", workers=2, retries=0, backoff=0.0, all_urls=True)
    assert (again["downloaded"], again["present"], again["failed"]) == (1, 4, 1)
    assert (images / "D4.png").is_file()
    assert [l.split("\t")[0] for l in (data / "x.images_failed.tsv").read_text().splitlines()[1:]] == ["E5"]
    assert not any(p.name.endswith(".tmp") for p in images.iterdir())


def test_bad_header_is_an_error(tmp_path):
    (tmp_path / "x.images.tsv").write_text("item\turl\n")
    try:
        download_images.main(["--dir", str(tmp_path), "--name", "x"])
    except SystemExit as exit_info:
        assert str(exit_info.code).startswith("error:")
    else:
        raise AssertionError("expected a one-line error")
