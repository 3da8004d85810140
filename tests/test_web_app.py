"""The web app (ovseg_jax.web.app, python -m ovseg_jax.serve) on a tiny random checkpoint: its
`/segment` API called with gradio_client as a user's script would (results equal a prediction made
without the app, concurrent requests queue and all succeed, no compilation after the warm-up for a
new class list, readable errors for bad input), the page without a checkpoint, and headless
Chromium driving the page with the network closed.

`OVSEG_WEB_SCREENSHOT=docs/web_app.png` makes the browser test save its screenshot there;
`OVSEG_WEB_CHECKPOINT` / `OVSEG_WEB_TOKENIZER` / `OVSEG_WEB_IMAGE` replace the tiny checkpoint,
its tokenizer and test image (e.g. by the demo's and a val image of its world, for that picture)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio", reason="the web app needs the web extra: pip install -e '.[web]'")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from ovseg_jax.utils.compilation import CompileTimer  # noqa: E402
from ovseg_jax.web import app as web  # noqa: E402

# gradio's queue uses pandas options that pandas 3 deprecates (not ours to fix). The whole file is
# `slow` (make test-fast leaves it out): most tests talk to a served app, which takes 15 s to start.
pytestmark = [pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*"), pytest.mark.slow]

NAMES = ["sky", "snow", "plain green", "checkered yellow"]  # four: the warm-up used three (one padded bucket)
VOCABULARY = [*NAMES, "sand", "a", "others", *web.WARMUP_NAMES]
INSTALL = "sudo apt-get install -y chromium chromium-driver && .venv/bin/pip install -e '.[web]'"
SETTINGS = {"short": 128, "max_size": 512}  # the demo's evaluation size


def random_model(build, seed: int):
    """`build()`'s module with random parameters drawn in numpy (kernels ~ N(0, 1/fan_in), norm
    scales 1, other vectors ~ N(0, 0.02)): the same as initialising it, without the minute that
    running hundreds of small initialisers takes on a loaded 2-core machine."""
    from flax import nnx

    graphdef, state = nnx.split(nnx.eval_shape(build))
    rs = np.random.RandomState(seed)
    for path, variable in nnx.to_flat_state(state):
        shape = variable.get_value().shape
        if path[-1] == "scale":
            value = np.ones(shape)
        elif len(shape) == 1:
            value = rs.normal(0.0, 0.02, shape)
        else:
            value = rs.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
        variable.set_value(value.astype(np.float32))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    """(checkpoint, tokenizer dir, a square test image's path): random tiny models built in JAX and
    written as one merged OVSeg checkpoint (`segmenter.export` with the CLIP), a word tokenizer and
    a two-region picture; or the OVSEG_WEB_* files."""
    if os.environ.get("OVSEG_WEB_CHECKPOINT"):
        return tuple(Path(os.environ[k]) for k in ("OVSEG_WEB_CHECKPOINT", "OVSEG_WEB_TOKENIZER", "OVSEG_WEB_IMAGE"))
    from flax import nnx

    from ovseg_jax.clip import Clip
    from ovseg_jax.models.clip import CLIP, ClipConfig
    from ovseg_jax.models.maskformer import Segmenter, SegmenterConfig
    from ovseg_jax.models.swin import SwinConfig
    from ovseg_jax.segmenter import export
    from ovseg_jax.text import Tokenizer, write_word_vocab

    directory = tmp_path_factory.mktemp("tiny_model")
    tokenizer = write_word_vocab(VOCABULARY, directory / "tokenizer")
    tok = Tokenizer.from_dir(tokenizer, context_length=8)
    clip_config = ClipConfig(embed_dim=16, image_size=32, patch_size=8, vision_width=32, vision_layers=1,
                             vision_heads=2, vision_mlp_dim=64, context_length=8, vocab_size=tok.vocab_size,
                             text_width=32, text_layers=1, text_heads=2, text_mlp_dim=64,
                             eot_token_id=tok.eot_token_id, mask_prompt_depth=1)
    config = SegmenterConfig(backbone_config=SwinConfig.tiny_test(), num_queries=6, hidden_dim=32, conv_dim=32,
                             mask_dim=32, dec_layers=2, nheads=2, dim_feedforward=32, class_hidden_dim=32,
                             clip_dim=clip_config.embed_dim)
    clip = Clip(random_model(lambda: CLIP(clip_config, rngs=nnx.Rngs(0)), 0), tok)
    segmenter = random_model(lambda: Segmenter(config, rngs=nnx.Rngs(1)), 1)
    checkpoint = export(segmenter, directory / "tiny.safetensors", clip=clip)
    picture = np.zeros((64, 64, 3), np.uint8)  # square, as the warm-up's: the same padded and output shapes
    picture[:28] = (110, 160, 230)  # sky over a green field with a yellow patch
    picture[28:] = (60, 150, 50)
    picture[40:54, 20:46] = (230, 210, 40)
    Image.fromarray(picture).save(directory / "scene.png")
    return checkpoint, tokenizer, directory / "scene.png"


class HalvesGenerator:
    """A stand-in for SAM's automatic mask generator (what `SamProposals` asks of one): the image's
    top and bottom halves as two masks."""

    output_mode = "binary_mask"

    def generate(self, image: np.ndarray) -> list[dict]:
        top = np.zeros(image.shape[:2], bool)
        top[: image.shape[0] // 2] = True
        return [{"segmentation": top}, {"segmentation": ~top}]


@pytest.fixture(scope="module")
def served(demo_files):
    """The app on the checkpoint (and a stand-in SAM), warmed up, served in this process -> (URL, app)."""
    from ovseg_jax.inference.ensemble import Predictor
    from ovseg_jax.inference.loading import load_predictor
    from ovseg_jax.inference.sam_proposals import SamProposals

    checkpoint, tokenizer, _ = demo_files
    loaded = load_predictor(checkpoint, tokenizer, templates=["a {}"])  # the demo's template
    stand_in = None if os.environ.get("OVSEG_WEB_CHECKPOINT") else SamProposals(HalvesGenerator())  # the picture: none
    predictor = Predictor(loaded.segmenter, loaded.clip, templates=loaded.templates, resize=loaded.resize,
                          sam=stand_in)
    app = web.build_app(predictor, checkpoint=checkpoint.name, **SETTINGS)
    app.service.warm_up()
    url = web.launch(app, port=None, block=False, quiet=True)
    yield url, app
    app.close()


@pytest.fixture(scope="module")
def client(served):
    return Client(served[0], verbose=False)


def segment(client, image, names: str, mode: str = "semantic", weight: float = 0.7, threshold: float = 0.4,
            **proposals):
    return client.predict(None if image is None else handle_file(str(image)), names, mode, weight, threshold,
                          **proposals, api_name="/segment")


def direct_shares(app, image_path: Path, names: list[str], **settings) -> list[float]:
    """Each name's share of the pixels, predicted without the app (inputs.preprocess + a Predictor)."""
    from ovseg_jax.inference.ensemble import Predictor
    from ovseg_jax.inference.inputs import preprocess

    base = app.service.base
    predictor = Predictor(base.segmenter, base.clip, templates=base.templates, sam=base.sam, **settings)
    padded, resized_hw, original_hw = preprocess(np.asarray(Image.open(image_path).convert("RGB")), **SETTINGS)
    labels = predictor.predict_batch([padded], names, resized_hw=[resized_hw], original_hw=[original_hw])[0].labels
    return [float((labels == i).mean()) for i in range(len(names))]


def test_the_api_is_documented_for_clients(client):
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/segment"]
    assert [p["parameter_name"] for p in info["parameters"]] == ["image", "class_names", "mode", "ensemble_weight",
                                                                 "mask_threshold", "proposals"]
    assert info["parameters"][5]["parameter_has_default"]  # a script may leave it out
    assert [r["label"] for r in info["returns"]] == ["Overlay", "Legend"]


def test_a_new_class_list_after_the_warm_up_compiles_nothing(client, demo_files):
    with CompileTimer() as timer:
        _, legend = segment(client, demo_files[2], ", ".join(NAMES))
    assert [entry["name"] for entry in legend] == NAMES
    assert timer.count == 0, f"{timer.count} compilations ({timer.seconds:.1f} s)"


def test_concurrent_requests_queue_and_equal_a_direct_prediction(served, client, demo_files, monkeypatch):
    """Three clients at once: all answered, each the prediction made without the app, and the model
    ran one request at a time (the queue's concurrency limit of 1, no lock)."""
    url, app = served
    runs, lock, segment_once = [], threading.Lock(), app.service.segment

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return segment_once(*args, **kwargs)
        finally:
            with lock:
                runs.append((start, time.perf_counter()))

    monkeypatch.setattr(app.service, "segment", timed)
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: segment(Client(url, verbose=False), demo_files[2], ", ".join(NAMES)),
                                range(3)))
    expected = direct_shares(app, demo_files[2], NAMES, ensemble_weight=0.7, mask_threshold=0.4)
    for overlay, legend in answers:
        assert [entry["name"] for entry in legend] == NAMES
        np.testing.assert_allclose([entry["share"] for entry in legend], expected, atol=1e-6)
        assert all(re.fullmatch(r"#[0-9a-f]{6}", entry["color"]) for entry in legend)
        with Image.open(overlay) as picture:
            assert picture.format == "PNG" and min(picture.size) >= 64
    runs.sort()
    assert len(runs) == 3 and all(end <= next_start for (_, end), (next_start, _) in zip(runs, runs[1:]))


def test_overlay_files_are_named_by_content_and_never_rewritten_in_place(tmp_path):
    """Two requests with the same picture share one complete file (written under a temporary name and
    renamed), which a third writer leaves alone; another picture gets its own file."""
    red, blue = Image.new("RGB", (8, 6), (255, 0, 0)), Image.new("RGB", (8, 6), (0, 0, 255))
    first = web.cached_png(red, tmp_path)
    inode = os.stat(first).st_ino
    assert web.cached_png(red.copy(), tmp_path) == first and os.stat(first).st_ino == inode
    other = web.cached_png(blue, tmp_path)
    assert other != first
    for path, colour in ((first, (255, 0, 0)), (other, (0, 0, 255))):
        with Image.open(path) as picture:
            assert picture.format == "PNG" and picture.getpixel((3, 2)) == colour
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["overlay.png", "overlay.png"]


def test_mode_lambda_and_threshold_reach_the_predictor(served, client, demo_files):
    _, legend = segment(client, demo_files[2], "sky, sand", mode="demo", weight=0.0, threshold=0.35)
    expected = direct_shares(served[1], demo_files[2], ["sky", "sand"], mode="demo", ensemble_weight=0.0,
                             mask_threshold=0.35)
    np.testing.assert_allclose([entry["share"] for entry in legend], expected, atol=1e-6)


@pytest.mark.parametrize("mode", ["semantic", "demo"])
def test_sam_proposals_reach_the_predictor(served, client, demo_files, mode):
    _, legend = segment(client, demo_files[2], "sky, sand", mode=mode, weight=0.0, threshold=0.4,
                              proposals="sam")
    expected = direct_shares(served[1], demo_files[2], ["sky", "sand"], mode=mode, proposals="sam",
                             ensemble_weight=0.0, mask_threshold=0.4)
    np.testing.assert_allclose([entry["share"] for entry in legend], expected, atol=1e-6)
    shares = 2 * np.array([entry["share"] for entry in legend])
    np.testing.assert_allclose(shares, np.round(shares), atol=1e-6)  # SAM's halves: each wholly one class or none


def test_sam_proposals_without_a_sam_checkpoint_are_refused(served):
    base = served[1].service.base
    service = web.Service(type(base)(base.segmenter, base.clip, templates=base.templates))
    assert not service.has_sam
    with pytest.raises(gr.Error, match="no SAM checkpoint is loaded: restart with --sam-checkpoint"):
        service.predictor("semantic", None, None, "sam")


@pytest.mark.parametrize("size, shown_size", [((1500, 2500), (614, 1024)), ((40, 60), (200, 300))])
def test_the_page_shows_large_images_reduced_and_small_ones_enlarged(size, shown_size):
    """The page's copy of a result (`web.view`): a large image reduced to DISPLAY_MAX px, a small one
    enlarged x5 (to about DISPLAY_SIZE), the regions where they were; the legend has the full-size shares."""
    from ovseg_jax.inference.ensemble import Segmentation

    h, w = size
    labels = np.ones(size, np.int32)
    labels[:, : w // 4] = 0
    labels[h // 2:] = -1  # unlabeled: a quarter is class 0, three quarters class 1, in the top half
    result = web.Result(np.zeros((h, w, 3), np.uint8), Segmentation(labels, np.ones(size, np.float32)),
                        ["sky", "snow"], {}, 0.1)
    shown = web.view(result)
    assert shown.labels.shape == shown.image.shape[:2] == shown_size and shown.size == size
    for label, share in ((-1, 0.5), (0, 0.125), (1, 0.375)):
        assert np.mean(shown.labels == label) == pytest.approx(share, abs=0.002)
    assert [entry["share"] for entry in shown.legend] == [0.125, 0.375]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "report.png").write_bytes(b"%PDF-1.4 not an image")
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (200, 300, 3), np.uint8)).save(d / "big.png")  # 180 kB
    return d


@pytest.mark.parametrize("image, names, settings, message", [
    ("val", "", {}, "no class names"),
    ("val", " , ,", {}, "blank"),
    ("val", "sky, snow, sky", {}, "duplicate class names"),
    ("report.png", "sky", {}, "'report.png' is not an image"),
    (None, "sky", {}, "no image"),
    ("val", "sky", {"mode": "panoptic"}, "panoptic"),
    ("val", "sky", {"weight": 2.0}, "λ (ensemble weight) must lie in [0, 1]; got 2.0"),
    ("val", "sky", {"threshold": 1.0}, "mask threshold must lie in (0, 1)"),
    ("val", "sky", {"proposals": "slic"}, "proposals must be one of maskformer, sam, both; got 'slic'"),
])
def test_bad_input_is_one_readable_line(client, demo_files, bad_files, image, names, settings, message):
    path = demo_files[2] if image == "val" else None if image is None else bad_files / image
    with pytest.raises(AppError) as caught:
        segment(client, path, names, **settings)
    assert message in str(caught.value) and "Traceback" not in str(caught.value)


def test_a_blank_class_field_means_the_given_class_list():
    """`--classes-from DATASET` (`build_app(class_names=...)`): a blank field is that list; typed names win."""
    assert web.parse_names("  ", ["sky", "snow"]) == ["sky", "snow"]
    assert web.parse_names("sand", ["sky", "snow"]) == ["sand"]


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(client, bad_files, monkeypatch):
    monkeypatch.setattr(web, "MAX_IMAGE_PIXELS", 50_000)
    with pytest.raises(AppError, match=r"'big.png' has 300 x 200 pixels, more than the limit of 0.05 megapixels"):
        segment(client, bad_files / "big.png", "sky")


def test_an_upload_over_the_size_limit_is_refused(served, bad_files):
    """The limit is the app's (`launch(max_file_size=...)`): clients read it and refuse to send; the
    server answers 413 to an upload that comes anyway."""
    import httpx

    small = web.build_app(served[1].service.base, **SETTINGS)
    url = web.launch(small, port=None, block=False, quiet=True, max_file_size=1000)
    try:
        with pytest.raises(ValueError, match="exceeds the maximum file size of 1000 bytes"):
            segment(Client(url, verbose=False), bad_files / "big.png", "sky")
        answer = httpx.post(url + "gradio_api/upload", files={"files": ("big.png", b"\x89PNG" + bytes(2000))})
        assert answer.status_code == 413 and "maximum allowed size of 1000 bytes" in answer.text
    finally:
        small.close()


def test_without_checkpoint_the_page_says_so_and_segment_fails_clearly(demo_files):
    process = subprocess.Popen([sys.executable, "-m", "ovseg_jax.serve", "--port", "0"], stderr=subprocess.PIPE,
                               text=True)
    try:
        for line in process.stderr:
            if match := re.search(r"serving on (http://\S+/)", line):
                break
        else:
            pytest.fail(f"the server exited with {process.wait()} before serving")
        url = match.group(1)
        with urllib.request.urlopen(url + "config", timeout=60) as response:
            assert "No checkpoint is loaded" in json.dumps(json.load(response))
        with pytest.raises(AppError, match="no checkpoint is loaded"):
            segment(Client(url, verbose=False), demo_files[2], "sky")
    finally:
        process.terminate()
        process.wait(30)


def test_unreadable_checkpoint_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "model.pth"
    bad.write_text("<html>not a checkpoint</html>")
    result = subprocess.run([sys.executable, "-m", "ovseg_jax.serve", "--checkpoint", str(bad), "--port", "0"],
                            check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert f"cannot load {bad}" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# The Hugging Face Space's app.py


@pytest.fixture(scope="module")
def space():
    """space/app.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("space_app", Path(__file__).resolve().parents[1] / "space" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_space_without_a_checkpoint_names_the_variable_to_set(space):
    app = space.create_app({}, warm_up=False)
    assert app.service.base is None
    with pytest.raises(gr.Error, match="OVSEG_CHECKPOINT"):
        app.service.check_loaded()


def test_space_loads_what_its_variables_name(space, demo_files):
    checkpoint, tokenizer, _ = demo_files
    app = space.create_app({"OVSEG_CHECKPOINT": str(checkpoint), "OVSEG_TOKENIZER": str(tokenizer),
                            "OVSEG_TEMPLATES": "a {}", "OVSEG_MODE": "demo"}, warm_up=False)
    base = app.service.base
    assert (base.mode, base.templates, base.ensemble_weight, base.mask_threshold) == ("demo", ["a {}"], 0.0, 0.35)


def test_space_downloads_hf_paths_from_the_hub(space, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: calls.append((repo, name)) or "/x")
    assert space.resolve("hf://someone/ovseg/weights/ovseg.safetensors") == "/x"
    assert calls == [("someone/ovseg", "weights/ovseg.safetensors")]
    assert space.resolve("ovseg.safetensors") == "ovseg.safetensors"


# ---------------------------------------------------------------------------------------------
# The page in headless Chromium, the network closed


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium driven by selenium, every host but this machine unreachable (a proxy that
    does not exist; loopback bypasses it); skipped with the install command when one is missing."""
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
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,860", "--proxy-server=http://127.0.0.1:9",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    options.binary_location = binary
    driver = webdriver.Chrome(options=options, service=DriverService(driver_path))
    yield driver
    driver.quit()


def open_page(driver, url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))


def submit(driver, image: Path | None, classes: str, beside: bool = False) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if image is not None:
        driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(image))
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
    box = driver.find_element(By.CSS_SELECTOR, "#classes textarea, #classes input")
    box.clear()
    box.send_keys(classes)
    if beside:
        driver.find_element(By.CSS_SELECTOR, "#beside input[type=checkbox]").click()
    driver.find_element(By.ID, "submit").click()


def natural_size(driver, element) -> tuple[int, int]:
    return tuple(driver.execute_script("return [arguments[0].complete && arguments[0].naturalWidth, "
                                       "arguments[0].naturalHeight]", element))


def test_browser_upload_shows_the_segmentation_and_legend(browser, served, demo_files):
    """Upload a (square) val image, type the names, tick "input beside", submit: the annotated image
    (input | input with class masks) and the legend of the typed names appear; every resource the
    page loaded came from the app."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, served[0])
    submit(browser, demo_files[2], ", ".join(NAMES), beside=True)
    WebDriverWait(browser, 300).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#legend li"))
    legend = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#legend li .name")]
    assert legend == NAMES
    pictures = browser.find_elements(By.CSS_SELECTOR, "#segmentation img")
    assert len(pictures) >= 2  # the base picture and at least one class mask
    sizes = [natural_size(browser, p) for p in pictures]
    assert all(w >= 64 for w, _ in sizes) and sizes[0][0] > 1.5 * sizes[0][1]  # the input beside the overlay
    origin = served[0].rstrip("/")
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert [r for r in resources if not r.startswith((origin, "data:", "blob:"))] == []
    if os.environ.get("OVSEG_WEB_SCREENSHOT"):
        browser.set_window_size(1280, 900)  # down to the Segment button
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(os.environ["OVSEG_WEB_SCREENSHOT"])


def test_browser_empty_class_list_shows_the_error(browser, served, demo_files):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, served[0])
    submit(browser, demo_files[2], "")
    WebDriverWait(browser, 60).until(lambda d: "no class names" in d.find_element(By.TAG_NAME, "body").text)
    assert not browser.find_elements(By.CSS_SELECTOR, "#legend li")
