"""dataset_prep/download_images.py against a local HTTP server on 127.0.0.1 (no network)."""
from __future__ import annotations

import io
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_prep import download_images

ROOT = Path(__file__).resolve().parents[1]

MAX_BYTES = 50_000
TIMEOUT = 0.5
DEADLINE = 1.0


# ---- fixture images -------------------------------------------------------------------------

def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def picture(seed: int, size=(24, 20)) -> Image.Image:
    """A small noisy RGB picture, different for each seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def bomb_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A PNG of a few dozen bytes whose header claims ``width x height`` pixels."""
    data = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])  # keep depth, colour type, ...
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


# ---- the server -----------------------------------------------------------------------------

class App:
    """Routes (path -> function(handler, n), n = how often the path was asked for) and counts."""

    def __init__(self):
        self.routes = {}
        self.counts = Counter()
        self.lock = threading.Lock()
        self.base = ""

    def url(self, path: str) -> str:
        return self.base + path


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        app = self.server.app
        with app.lock:
            app.counts[self.path] += 1
            n = app.counts[self.path]
        route = app.routes.get(self.path)
        try:
            if route is None:
                self.send_error(404)
            else:
                route(self, n)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout, size limit): as intended

    def log_message(self, *args):
        pass


def body(
    data: bytes, content_type: str | None = "image/jpeg", status: int = 200, length: bool = True, delay: float = 0.0
):
    def route(handler, n):
        time.sleep(delay)
        handler.send_response(status)
        if content_type is not None:
            handler.send_header("Content-Type", content_type)
        if length:
            handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    return route


def redirect(location: str):
    def route(handler, n):
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return route


def first_then(first, then):
    return lambda handler, n: (first if n == 1 else then)(handler, n)


def trickle(data: bytes, pause: float):
    """Headers at once, then the body a few bytes at a time (each pause shorter than the timeout)."""
    def route(handler, n):
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        for start in range(0, len(data), 16):
            handler.wfile.write(data[start:start + 16])
            time.sleep(pause)
    return route


@pytest.fixture
def server():
    app = App()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.app = app
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    app.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield app
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def write_list(folder: Path, rows: list[tuple[str, list[str]]], name: str = "x") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.images.tsv").write_text(
        "item_id\timage_urls\n" + "".join(f"{item}\t{' '.join(urls)}\n" for item, urls in rows)
    )


def failures(folder: Path, name: str = "x") -> dict[str, tuple[str, str]]:
    lines = (folder / f"{name}.images_failed.tsv").read_text().splitlines()
    assert lines[0] == "item_id\turl\treason"
    return {item: (url, reason) for item, url, reason in (line.split("\t") for line in lines[1:])}


def no_temporaries(folder: Path) -> bool:
    return not any(path.name.endswith(".tmp") for path in folder.iterdir())


# ---- tests ----------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns, decode_image refuses
def test_outcomes_reasons_retries_and_rerun(server, tmp_path, caplog):
    jpeg = encoded(picture(1), "JPEG", quality=90)
    png = encoded(picture(2), "PNG")
    gif = encoded(picture(3), "GIF")
    big_jpeg = encoded(picture(4, (64, 64)), "JPEG", quality=95)
    oversize = b"\xff" * (MAX_BYTES + 10_000)
    routes = {
        "/good.jpg": body(jpeg),
        "/good.png": body(png, "image/png"),
        "/anim.gif": body(gif, "image/gif"),
        "/octet": body(jpeg, "application/octet-stream"),
        "/notype": body(png, None),
        "/corrupt.jpg": body(b"this is not a JPEG at all" * 4),
        "/truncated.jpg": body(big_jpeg[: len(big_jpeg) * 2 // 3]),
        "/empty.jpg": body(b""),
        "/bomb.png": body(bomb_png(), "image/png"),
        "/big.jpg": body(oversize),
        "/stream.jpg": body(oversize, length=False),
        "/slow.jpg": body(jpeg, delay=TIMEOUT * 2),
        "/trickle.jpg": trickle(big_jpeg, pause=TIMEOUT / 4),
        "/flaky.jpg": first_then(body(b"oops", "text/plain", status=500), body(jpeg)),
        "/down.jpg": body(b"busy", "text/plain", status=503),
        "/moved": redirect("/target.png"),
        "/target.png": body(png, "image/png"),
        "/to-ftp": redirect("ftp://127.0.0.1/x.jpg"),
        "/to-file": redirect("file:///etc/passwd"),
        "/page.html": body(b"<html><body>no image</body></html>", "text/html; charset=utf-8"),
        "/gone.jpg": body(b"", "text/plain", status=410),
        "/fallback.png": body(png, "image/png"),
    }
    server.routes.update(routes)
    data = tmp_path / "ds"
    (data / "pics").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(data / "pics" / "local.png")
    rows = {
        "jpg": ["/good.jpg"], "png": ["/good.png"], "gif": ["/anim.gif"], "octet": ["/octet"],
        "notype": ["/notype"], "corrupt": ["/corrupt.jpg"], "truncated": ["/truncated.jpg"],
        "empty": ["/empty.jpg"], "bomb": ["/bomb.png"], "big": ["/big.jpg"], "stream": ["/stream.jpg"],
        "slow": ["/slow.jpg"], "trickle": ["/trickle.jpg"], "flaky": ["/flaky.jpg"], "down": ["/down.jpg"],
        "moved": ["/moved"], "to_ftp": ["/to-ftp"], "to_file": ["/to-file"], "html": ["/page.html"],
        "missing": ["/missing.jpg"], "fallback": ["/gone.jpg", "/fallback.png"],
    }
    listed = [(item, [server.url(path) for path in paths]) for item, paths in rows.items()]
    listed += [("fileurl", [(tmp_path / "x.jpg").as_uri()]), ("local", ["pics/local.png"]),
               ("../evil", [server.url("/good.jpg")])]
    write_list(data, listed)
    options = dict(workers=4, retries=1, timeout=TIMEOUT, backoff=0.0, deadline=DEADLINE, max_bytes=MAX_BYTES,
                   all_urls=True)

    caplog.set_level("WARNING", logger=download_images.__name__)
    started = time.monotonic()
    result = download_images.download(data, "x", **options)
    assert time.monotonic() - started < 10

    images = data / "images"
    saved = {path.name: path.read_bytes() for path in images.iterdir()}
    assert sorted(saved) == ["fallback.png", "flaky.jpg", "gif.png", "jpg.jpg", "moved.png", "notype.png",
                             "octet.jpg", "png.png"]
    assert saved["jpg.jpg"] == saved["octet.jpg"] == saved["flaky.jpg"] == jpeg  # stored as served
    assert saved["png.png"] == saved["notype.png"] == saved["moved.png"] == saved["fallback.png"] == png
    with Image.open(io.BytesIO(saved["gif.png"])) as converted:
        assert converted.format == "PNG" and converted.size == (24, 20)
    assert no_temporaries(images)

    expected = {  # item -> a piece of its reason
        "corrupt": "not a readable image",
        "truncated": "not a readable image",
        "empty": "empty file (0 bytes)",
        "bomb": "10000x10000 = 100,000,000 pixels is over the limit",
        "big": f"Content-Length {len(oversize):,} bytes is over the limit of {MAX_BYTES:,}",
        "stream": f"body passed the limit of {MAX_BYTES:,} bytes",
        "slow": f"timed out (no data for {TIMEOUT:g} s) (after 2 attempts)",
        "trickle": f"not done after the deadline of {DEADLINE:g} s",
        "down": "HTTP 503 Service Unavailable (after 2 attempts)",
        "to_ftp": "redirect to non-http URL ftp://127.0.0.1/x.jpg refused",
        "to_file": "redirect to non-http URL file:///etc/passwd refused",
        "html": "content type text/html is not an image",
        "missing": "HTTP 404 Not Found",
        "fileurl": "unsupported URL (scheme 'file'",
        "../evil": "item id is not a safe file name",
    }
    failed = failures(data)
    assert sorted(failed) == sorted(expected)
    for item, piece in expected.items():
        assert piece in failed[item][1], (item, failed[item])
        assert failed[item][0] == dict(listed)[item][0]
    assert "(after" not in failed["corrupt"][1] and "(after" not in failed["missing"][1]
    assert (result["downloaded"], result["present"], result["failed"]) == (8, 1, len(expected))

    # one log line per failure, naming item, URL and reason
    logged = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(logged) == len(expected)
    assert f"item missing: {server.url('/missing.jpg')} failed: HTTP 404 Not Found" in logged

    # transient errors are retried (once here), everything else is asked for exactly once
    counts = dict(server.counts)
    retried = {"/slow.jpg", "/trickle.jpg", "/flaky.jpg", "/down.jpg"}
    assert {path: counts[path] for path in retried} == dict.fromkeys(retried, 2)
    once = set(routes) - retried
    assert {path: counts.get(path) for path in once} == dict.fromkeys(once, 1)
    assert counts["/missing.jpg"] == 1 and sum(counts.values()) == len(routes) + len(retried) + 1

    # a rerun downloads nothing again: finished items are not asked for
    finished_paths = {"/good.jpg", "/good.png", "/anim.gif", "/octet", "/notype", "/flaky.jpg", "/moved",
                      "/target.png", "/gone.jpg", "/fallback.png"}
    again = download_images.download(data, "x", **options)
    assert (again["downloaded"], again["present"], again["failed"]) == (0, 9, len(expected))
    assert all(server.counts[path] == counts[path] for path in finished_paths)
    assert {path.name: path.read_bytes() for path in images.iterdir()} == saved
    failed_again = failures(data)
    assert sorted(failed_again) == sorted(expected)
    assert all(piece in failed_again[item][1] for item, piece in expected.items())


def test_main_url_only_without_all_urls(server, tmp_path):
    png = encoded(picture(5), "PNG")
    server.routes.update({"/gone.jpg": body(b"", status=404), "/ok.png": body(png, "image/png")})
    write_list(tmp_path, [("A", [server.url("/gone.jpg"), server.url("/ok.png")])])
    result = download_images.main(["--dir", str(tmp_path), "--name", "x", "--retries", "3", "--backoff", "0"])
    assert (result["downloaded"], result["failed"]) == (0, 1) and server.counts["/ok.png"] == 0
    assert server.counts["/gone.jpg"] == 1  # a 404 is not retried
    assert download_images.main(["--dir", str(tmp_path), "--name", "x", "--all-urls"])["downloaded"] == 1
    assert (tmp_path / "images" / "A.png").read_bytes() == png
    assert not (tmp_path / "x.images_failed.tsv").exists()


@pytest.mark.slow
def test_kill_and_resume_matches_an_uninterrupted_run(server, tmp_path):
    count = 24
    served = {}
    for i in range(count):
        fmt, ext = ("GIF", "gif") if i == 5 else ("JPEG", "jpg")
        served[f"/img/{i:02d}.{ext}"] = encoded(picture(100 + i, (48, 40)), fmt)
    server.routes.update(
        {path: body(data, f"image/{path.rsplit('.', 1)[1]}", delay=0.2) for path, data in served.items()}
    )
    data = tmp_path / "ds"
    write_list(data, [(f"item{i:02d}", [server.url(path)]) for i, path in enumerate(served)])
    images = data / "images"
    command = [sys.executable, str(ROOT / "dataset_prep" / "download_images.py"), "--dir", str(data), "--name", "x",
               "--workers", "2", "--retries", "0", "--timeout", "5"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        limit = time.monotonic() + 60
        while not (images.is_dir() and sum(not p.name.startswith(".") for p in images.iterdir()) >= 3):
            assert process.poll() is None, "the download ended before it could be killed"
            assert time.monotonic() < limit, "no images after 60 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(30)
    assert process.returncode == -signal.SIGKILL
    finished = {p.stem for p in images.iterdir() if not p.name.startswith(".")}
    assert 3 <= len(finished) < count
    (images / ".item00.jpg.k1ll3d_x.tmp").write_bytes(b"half an ima")  # as a kill during a write leaves it
    before = dict(server.counts)

    resumed = download_images.download(data, "x", workers=2, retries=0, timeout=5)
    assert (resumed["present"], resumed["downloaded"], resumed["failed"]) == (len(finished), count - len(finished), 0)
    for i, path in enumerate(served):
        assert server.counts[path] == (1 if f"item{i:02d}" in finished else before.get(path, 0) + 1), path

    fresh = tmp_path / "fresh"
    download_images.download(data, "x", images_dir=fresh, workers=8, retries=0, timeout=5)
    contents = {path.name: path.read_bytes() for path in sorted(images.iterdir())}
    assert contents == {path.name: path.read_bytes() for path in sorted(fresh.iterdir())}
    assert len(contents) == count and no_temporaries(images)
    assert contents["item00.jpg"] == served["/img/00.jpg"]


def test_bad_header_is_an_error(tmp_path):
    (tmp_path / "x.images.tsv").write_text("item\turl\n")
    try:
        download_images.main(["--dir", str(tmp_path), "--name", "x"])
    except SystemExit as exit_info:
        assert str(exit_info.code).startswith("error:")
    else:
        raise AssertionError("expected a one-line error")
