"""The web page (ovseg_jax.serve): form posts over plain HTTP, queued concurrent requests, readable errors,
the page without a checkpoint, and headless Chromium driving the page on the quick demo's checkpoint."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg_jax import serve
from ovseg_jax.utils.compilation import CompileTimer

NAMES = ["grass", "sky", "plain red"]  # three names, as the warm-up: no compilation for the first request
INSTALL = "sudo apt-get install -y chromium chromium-driver && .venv/bin/pip install -e '.[web]'"


def multipart(fields: dict[str, str], image: bytes | None = None, filename: str = "upload.png") -> tuple[bytes, str]:
    """A browser-like multipart/form-data body -> (body, Content-Type)."""
    boundary = "----form" + uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    if image is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(url: str, fields: dict[str, str], image: bytes | None = None) -> tuple[int, dict]:
    body, content_type = multipart(fields, image)
    request = urllib.request.Request(url + "segment", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read().decode()


@pytest.fixture(scope="module")
def demo_files(quick_demo):
    """(checkpoint, tokenizer dir, a val image's path) of the session's quick demo run."""
    out = quick_demo[0]
    return out / "ovseg_synthetic.pth", out / "world" / "tokenizer", sorted((out / "world" / "images" / "val").glob("*.png"))[0]


@pytest.fixture(scope="module")
def server(demo_files):
    """The page on the quick demo's checkpoint in a thread, warmed up -> (base URL, Service)."""
    from ovseg_jax.inference.loading import load_predictor

    checkpoint, tokenizer, _ = demo_files
    predictor = load_predictor(checkpoint, tokenizer, templates=["a {}"])  # the demo's template and eval size
    service = serve.Service(predictor, checkpoint=str(checkpoint), short=128, max_size=512)
    httpd = serve.make_server(service, port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    service.warm_up()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", service
    httpd.shutdown()
    httpd.server_close()


def direct_fractions(service, image_path: Path, names: list[str], **settings) -> list[float]:
    """Each name's share of the pixels, predicted without the server (preprocess + Predictor)."""
    from ovseg_jax.inference.ensemble import Predictor
    from ovseg_jax.inference.inputs import preprocess

    base = service.base
    predictor = Predictor(base.segmenter, base.clip, templates=base.templates, **settings)
    padded, resized_hw, original_hw = preprocess(np.asarray(Image.open(image_path).convert("RGB")),
                                                 short=service.short, max_size=service.max_size)
    labels = predictor.predict_batch([padded], names, resized_hw=[resized_hw], original_hw=[original_hw])[0].labels
    return [float((labels == i).mean()) for i in range(len(names))]


def test_multipart_parsing_keeps_binary_bytes():
    data = bytes(range(256)) * 3 + b"\r\n--not-the-boundary\r\n\r\n"
    body, content_type = multipart({"classes": "café, sky"}, data, filename="a b.png")
    fields = serve.parse_multipart(content_type, body)
    assert fields["image"] == ("a b.png", data)
    assert fields["classes"] == (None, "café, sky".encode())


def test_first_request_after_warm_up_compiles_nothing(server, demo_files):
    url, _ = server
    with CompileTimer() as timer:
        status, result = post(url, {"classes": "sand, snow, dotted blue"}, demo_files[2].read_bytes())
    assert status == 200, result
    assert timer.seconds < 1.0  # the model's compilation takes tens of seconds


def test_concurrent_requests_all_succeed(server, demo_files):
    url, service = server
    image = demo_files[2].read_bytes()
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: post(url, {"classes": ", ".join(NAMES)}, image), range(3)))
    assert [status for status, _ in answers] == [200, 200, 200], answers
    expected = direct_fractions(service, demo_files[2], NAMES, ensemble_weight=service.base.ensemble_weight,
                                mask_threshold=service.base.mask_threshold)
    for _, result in answers:
        assert [entry["name"] for entry in result["legend"]] == NAMES
        np.testing.assert_allclose([entry["fraction"] for entry in result["legend"]], expected, atol=1e-6)
        assert all(re.fullmatch(r"#[0-9a-f]{6}", entry["color"]) for entry in result["legend"])
        picture = Image.open(io.BytesIO(base64.b64decode(result["image"].split(",", 1)[1])))
        assert picture.format == "PNG" and min(picture.size) >= 64
    assert sum(result["queued_seconds"] > 0 for _, result in answers) >= 1  # one lock: the others waited


def test_mode_lambda_and_threshold_reach_the_predictor(server, demo_files):
    url, service = server
    status, result = post(url, {"classes": "grass, sky", "mode": "demo", "ensemble_weight": "0",
                                "mask_threshold": "0.35"}, demo_files[2].read_bytes())
    assert status == 200, result
    expected = direct_fractions(service, demo_files[2], ["grass", "sky"], mode="demo", ensemble_weight=0.0,
                                mask_threshold=0.35)
    np.testing.assert_allclose([entry["fraction"] for entry in result["legend"]], expected, atol=1e-6)
    assert result["unlabeled"] == pytest.approx(1 - sum(expected), abs=1e-6)


@pytest.mark.parametrize("fields, image, message", [
    ({"classes": ""}, "val", "no class names"),
    ({"classes": " , ,"}, "val", "no class names"),
    ({"classes": "sky, grass, sky"}, "val", "duplicate class names"),
    ({"classes": "sky"}, b"%PDF-1.4 not an image", "is not an image"),
    ({"classes": "sky"}, None, "no image uploaded"),
    ({"classes": "sky", "mode": "panoptic"}, "val", "mode must be one of"),
    ({"classes": "sky", "ensemble_weight": "2"}, "val", "must lie in [0, 1]"),
    ({"classes": "sky", "mask_threshold": "high"}, "val", "mask threshold must be a number"),
])
def test_bad_input_is_a_readable_400(server, demo_files, fields, image, message):
    status, result = post(server[0], fields, demo_files[2].read_bytes() if image == "val" else image)
    assert status == 400
    assert message in result["error"] and "Traceback" not in result["error"]


def test_upload_over_the_limit_is_refused(server, demo_files, monkeypatch):
    monkeypatch.setattr(serve, "MAX_BODY_BYTES", 100)
    status, result = post(server[0], {"classes": "sky"}, demo_files[2].read_bytes())
    assert status == 413 and "larger than the limit" in result["error"]


def test_without_checkpoint_the_page_says_so_and_submit_fails_clearly(demo_files):
    process = subprocess.Popen([sys.executable, "-m", "ovseg_jax.serve", "--port", "0"], stderr=subprocess.PIPE,
                               text=True)
    try:
        for line in process.stderr:
            if match := re.search(r"serving on (http://\S+/)", line):
                break
        else:
            pytest.fail(f"the server exited with {process.wait()} before serving")
        url = match.group(1)
        assert "No checkpoint is loaded" in get(url)
        assert json.loads(get(url + "status"))["loaded"] is False
        status, result = post(url, {"classes": "sky"}, demo_files[2].read_bytes())
        assert status == 503 and "no checkpoint is loaded" in result["error"]
    finally:
        process.terminate()
        process.wait(30)


def test_unreadable_checkpoint_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "model.pth"
    bad.write_text("<html>not a checkpoint</html>")
    result = subprocess.run([sys.executable, "-m", "ovseg_jax.serve", "--checkpoint", str(bad), "--port", "0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert f"cannot load {bad}" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# The page in headless Chromium


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium driven by selenium; skipped with the install command when one is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service as DriverService
    except ImportError:
        pytest.skip(f"selenium is not installed; install the browser test's needs with: {INSTALL}")
    binary = next((b for b in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if b), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip(f"{'chromium' if binary is None else 'chromedriver'} not found; install with: {INSTALL}")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,900"):
        options.add_argument(flag)
    options.binary_location = binary
    driver = webdriver.Chrome(options=options, service=DriverService(driver_path))
    yield driver
    driver.quit()


def submit(driver, url: str, image: Path | None, classes: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    if image is not None:
        driver.find_element(By.ID, "image").send_keys(str(image))
    driver.find_element(By.ID, "classes").send_keys(classes)
    driver.find_element(By.ID, "submit").click()


def test_browser_upload_shows_overlay_and_legend(browser, server, demo_files):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    submit(browser, server[0], demo_files[2], ", ".join(NAMES))
    WebDriverWait(browser, 300).until(lambda d: d.find_element(By.ID, "result").is_displayed()
                                      or d.find_element(By.ID, "error").is_displayed())
    assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text
    overlay = browser.find_element(By.ID, "overlay")
    assert overlay.get_attribute("src").startswith("data:image/png;base64,")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay) >= 64
    legend = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#legend li .name")]
    assert legend == NAMES


def test_browser_empty_class_list_shows_the_error(browser, server, demo_files):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    submit(browser, server[0], demo_files[2], "")
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "no class names" in browser.find_element(By.ID, "error").text
    assert not browser.find_element(By.ID, "result").is_displayed()
