"""The service's page (seg/serve/static/index.html) end to end: the real app on a local port, under a path prefix
as behind a proxy, driven in Debian's headless chromium through Playwright with a real sample image.

What the page shows is checked against the model itself (``Segmenter.predict`` on the same file) and against what
the API answers: the legend, the overlay's compositing (and that the slider and the class toggles redraw it without
a new request), the downloaded mask and the latency; an upload that is not an image shows the server's error.
"""

from __future__ import annotations

import base64
import io
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn (the test extra) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (the test extra) is not installed")
starlette_routing = pytest.importorskip("starlette.routing", reason="fastapi (the test extra) is not installed")

CHROMIUM = Path("/usr/bin/chromium")  # Debian's: Playwright downloads no browser here
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SAMPLE = SHARED / "data" / "camvid" / "val" / "0016E5_07959.png"  # 480 x 360; the fixture model finds 4 classes
PREFIX = "/demo"  # the page must use relative URLs to work here
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def segmenter(discriminating_checkpoint):
    from seg.predictor import Segmenter

    return Segmenter.from_checkpoint(discriminating_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def base_url(segmenter):
    """The app served by uvicorn on 127.0.0.1 (a free port), mounted at PREFIX; its page's URL."""
    from starlette.applications import Starlette

    from seg.serve.app import create_app

    outer = Starlette(routes=[starlette_routing.Mount(PREFIX, app=create_app(segmenter))])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(outer, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "uvicorn exited before it started serving"
        assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}{PREFIX}/"
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian's chromium: apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        # A launched browser gets a fresh temporary profile (user data dir) of its own, removed on close.
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, base_url):
    """The page, loaded with its model card; fails the test on an uncaught script error."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    script_errors = []
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    page.goto(base_url)
    sync_api.expect(page.locator("#model")).to_contain_text("toy")
    yield page
    context.close()
    assert not script_errors, script_errors


def sample() -> Path:
    if not SAMPLE.exists():
        pytest.skip(f"../shared/data (the real samples) is absent: no {SAMPLE}")
    return SAMPLE


def canvas_pixels(page, element_id: str) -> np.ndarray:
    """(H, W, 4) uint8 RGBA of the canvas #element_id, at its own resolution."""
    url = page.eval_on_selector(f"#{element_id}", "canvas => canvas.toDataURL('image/png')")
    return np.array(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGBA"))


def set_opacity(page, percent: int) -> None:
    page.eval_on_selector("#opacity", "(slider, value) => { slider.value = value; "
                          "slider.dispatchEvent(new Event('input', { bubbles: true })); }", str(percent))


def legend(page) -> list:
    return page.eval_on_selector_all("#legend [data-class-id]", """entries => entries.map(entry => ({
        id: Number(entry.dataset.classId), label: entry.querySelector('.label').textContent,
        share: entry.querySelector('.share').textContent, checked: entry.querySelector('input.toggle').checked}))""")


def wait_until_done(page) -> None:
    """Wait for the page to draw a result; fail with its error message if it shows one instead."""
    page.wait_for_selector("body[data-state=done], body[data-state=error]")
    state = page.eval_on_selector("body", "body => body.dataset.state")
    assert state == "done", f"the page shows an error: {page.locator('#error').inner_text()!r}"


def assert_share_shown(text: str, share: float) -> None:
    """``text`` (``"12.3 %"``, or ``"< 0.1 %"``) shows ``share`` (a fraction) to its precision."""
    if text.startswith("<"):
        assert share * 100 < 0.1, (text, share)
        return
    match = re.fullmatch(r"(\d+\.\d) %", text)
    assert match, text
    assert abs(float(match.group(1)) - share * 100) <= 0.05 + 1e-9, (text, share)


def test_page_shows_the_prediction_of_a_real_image(page, base_url, segmenter, tmp_path):
    image_path = sample()
    expected = segmenter.predict(str(image_path), ms_flip=False)
    height, width = expected.shape
    ids, counts = np.unique(expected, return_counts=True)
    assert len(ids) >= 3, "the fixture model should find several classes in the sample"
    api = httpx.post(base_url + "v1/predict", params={"format": "json"}, timeout=60,
                     files={"image": (image_path.name, image_path.read_bytes(), "image/png")}).json()

    predictions = []
    page.on("request", lambda request: predictions.append(request.url) if "v1/predict" in request.url else None)
    page.set_input_files("#file", str(image_path))
    wait_until_done(page)
    assert len(predictions) == 1 and predictions[0].startswith(base_url), predictions

    # The legend: the predicted classes, largest first, as the API lists them, with the model's pixel shares.
    shown = legend(page)
    assert [entry["id"] for entry in shown] == [entry["id"] for entry in api["classes"]]
    assert sorted(entry["id"] for entry in shown) == ids.tolist()
    share = dict(zip(ids.tolist(), (counts / expected.size).tolist()))
    for entry in shown:
        assert entry["label"] == segmenter.classes[entry["id"]] and entry["checked"], entry
        assert_share_shown(entry["share"], share[entry["id"]])

    # The views: at the image's size; the mask in the palette's colours; the overlay blends it at the slider's 50 %.
    original, mask = canvas_pixels(page, "original"), canvas_pixels(page, "mask")
    overlay = canvas_pixels(page, "overlay")
    assert original.shape == mask.shape == overlay.shape == (height, width, 4)
    rgb = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.int16)
    assert np.abs(original[..., :3].astype(np.int16) - rgb).max() <= 2
    palette = np.asarray(segmenter.palette, dtype=np.int16)[expected]
    assert (mask[..., 3] == 255).all(), "the mask view leaves pixels out"
    assert np.array_equal(mask[..., :3], palette.astype(np.uint8)), "the mask view is not the model's mask"
    assert overlay[..., :3].std() > 10, "the overlay is blank"
    blend = original[..., :3] * 0.5 + palette * 0.5
    assert np.abs(overlay[..., :3] - blend).max() <= 2, "the overlay is not the mask blended at 50 %"

    # Moving the slider redraws the overlay without a new request: at 100 % it is the mask.
    set_opacity(page, 100)
    sync_api.expect(page.locator("#opacity-value")).to_have_text("100 %")
    opaque = canvas_pixels(page, "overlay")
    assert not np.array_equal(opaque, overlay), "the slider did not change the overlay"
    assert np.abs(opaque[..., :3].astype(np.int16) - palette).max() <= 1, "the overlay at 100 % is not the mask"

    # Unchecking the largest class shows the original there, in the overlay, and nothing in the mask.
    largest = shown[0]["id"]
    page.locator(f'#legend [data-class-id="{largest}"] input.toggle').uncheck()
    hidden = canvas_pixels(page, "overlay")
    where = expected == largest
    assert not np.array_equal(hidden, opaque), "unchecking a class did not change the overlay"
    assert np.array_equal(hidden[where], original[where]), "a hidden class is still drawn over the image"
    assert np.array_equal(hidden[~where], opaque[~where]), "hiding one class changed the others"
    assert (canvas_pixels(page, "mask")[..., 3][where] == 0).all(), "a hidden class is still in the mask view"
    assert len(predictions) == 1, "the slider or a toggle sent a request"

    # The download: the palette PNG of class ids, named after the image, equal to the model's mask.
    link = page.locator("#download")
    assert link.get_attribute("download") == f"{image_path.stem}_mask.png"
    with page.expect_download() as download_info:
        link.click()
    download = download_info.value
    assert download.suggested_filename == f"{image_path.stem}_mask.png"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    assert saved.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(saved) as png:
        assert png.mode == "P"
        assert np.array_equal(np.asarray(png), expected), "the downloaded mask is not the model's"

    latency = page.locator("#latency").inner_text()
    assert re.fullmatch(r"Server \d+ ms · round trip \d+ ms", latency), latency

    # Multi-scale + flip sends ms_flip=true and shows that response's classes.
    with page.expect_response(lambda response: "ms_flip=true" in response.url) as response_info:
        page.locator("#msflip").check()
    flipped = response_info.value.json()
    wait_until_done(page)
    assert [entry["id"] for entry in legend(page)] == [entry["id"] for entry in flipped["classes"]]
    assert "multi-scale + flip" in page.locator("#latency").inner_text()


def test_page_shows_the_error_of_a_non_image(page, base_url):
    """...and recovers: an image dropped onto the drop zone next is segmented, the error gone."""
    body = b"these are notes, not an image\n"
    answer = httpx.post(base_url + "v1/predict", params={"format": "json"}, timeout=60,
                        files={"image": ("notes.txt", body, "text/plain")})
    assert 400 <= answer.status_code < 500
    message = answer.json()["error"]

    page.set_input_files("#file", {"name": "notes.txt", "mimeType": "text/plain", "buffer": body})
    page.wait_for_selector("body[data-state=error]")
    error = page.locator("#error")
    sync_api.expect(error).to_be_visible()
    sync_api.expect(error).to_have_text(message)
    assert error.get_attribute("role") == "alert"
    sync_api.expect(page.locator("#download")).to_be_hidden()
    assert page.locator("#legend [data-class-id]").count() == 0

    image_path = sample()
    dropped = page.evaluate_handle("""([name, base64]) => {
        const transfer = new DataTransfer();
        const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
        transfer.items.add(new File([bytes], name, { type: "image/png" }));
        return transfer; }""", [image_path.name, base64.b64encode(image_path.read_bytes()).decode("ascii")])
    page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
    wait_until_done(page)
    sync_api.expect(error).to_be_hidden()
    assert page.locator("#legend [data-class-id]").count() >= 3
    assert page.locator("#download").get_attribute("download") == f"{image_path.stem}_mask.png"
