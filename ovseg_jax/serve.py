"""A local web page to segment images with any class names (standard library only).

    python -m ovseg_jax.serve --checkpoint ovseg.pth [--tokenizer DIR] [--host 127.0.0.1 --port 7860]

Open http://127.0.0.1:7860, upload an image, type class names ("cat, sofa, wall"), pick the mode
(semantic: every pixel gets a class; demo: the best proposal per class, the original demo's
behaviour) and optionally λ and the mask threshold; the overlay and a legend with each class's
share of the pixels appear below the form. The model is loaded once and compiled at start on a
small image (`warm_up`); requests take turns on it (one lock), so concurrent requests queue.

    GET  /          the page
    GET  /status    JSON {"loaded", "ready" (warmed up), "checkpoint", "mode", "defaults", "short", "max_size"}
    POST /segment   multipart form: image (file), classes, mode, ensemble_weight, mask_threshold, side_by_side
                    -> 200 {"image": PNG data URL, "legend": [{"name", "color", "fraction", "mean_confidence"}],
                            "unlabeled", "size", "settings", "seconds", "queued_seconds"}
                    -> 400 / 411 / 413 / 503 {"error": one readable line} (bad input, no length, too large,
                       no checkpoint loaded); 500 the same for a failure inside the model (traceback in the log)

Inference is `ovseg_jax.predict` (`preprocess`, `render`, `summarize`) on an
`ovseg_jax.inference.ensemble.Predictor`; a request with another mode, λ or threshold gets its own Predictor
sharing the loaded segmenter and CLIP.
"""

from __future__ import annotations

import argparse
import base64
import email.parser
import email.policy
import html
import io
import json
import logging
import sys
import threading
import time
import warnings
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple, NoReturn

import numpy as np
from PIL import Image, UnidentifiedImageError

from ovseg_jax.inference import visualize
from ovseg_jax.inference.ensemble import MODES, Predictor, Segmentation, check_class_names
from ovseg_jax.inference.inputs import InputError, load_image, parse_class_names, parse_templates, preprocess
from ovseg_jax.inference.loading import MODE_DEFAULTS, RESIZE, load_predictor
from ovseg_jax.inference.results import render, summarize
from ovseg_jax.text import templates as resolve_templates
from ovseg_jax.utils.host_memory import keep_freed_memory

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 50 * 1024 * 1024  # larger uploads are refused (413) before they are read
DISPLAY_SIZE = 320  # smaller images are shown enlarged to about this many pixels
WARMUP_HW = (64, 64)  # the warm-up image: any square upload then reuses its compilation
WARMUP_NAMES = ("thing", "stuff", "background")  # three names: the same count reuses the compilation


class RequestError(ValueError):
    """Bad input from the page: answered with `status` and the message, never a traceback."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


class SegmentRequest(NamedTuple):
    """One checked form submission."""
    image: np.ndarray  # uint8 [H, W, 3] RGB, as uploaded (EXIF orientation applied)
    names: list[str]  # the typed class names, stripped, non-empty, distinct
    mode: str  # "semantic" | "demo"
    ensemble_weight: float | None  # None: Service.defaults(mode)
    mask_threshold: float | None  # None: Service.defaults(mode)
    side_by_side: bool = False  # the picture shows the input left of the overlay


# ---------------------------------------------------------------------------------------------
# Form parsing


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body -> {field name: (file name or None, raw bytes)}; RequestError if malformed."""
    header = email.parser.Parser(policy=email.policy.HTTP).parsestr(f"Content-Type: {content_type}\r\n\r\n")
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not boundary:
        raise RequestError(f"expected a multipart/form-data upload with a boundary; got Content-Type {content_type!r}")
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    if len(chunks) < 2 or not chunks[-1].startswith(b"--"):
        raise RequestError("malformed multipart body: the closing boundary is missing")
    fields = {}
    for chunk in chunks[1:-1]:
        head, separator, content = chunk.partition(b"\r\n\r\n")
        if not separator:
            raise RequestError("malformed multipart body: a part has no blank line after its headers")
        part = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head.lstrip() + b"\r\n\r\n",
                                                                             headersonly=True)
        name = part.get_param("name", header="content-disposition")
        if name is None:
            raise RequestError("malformed multipart body: a part has no Content-Disposition name")
        fields[str(name)] = (part.get_filename(), content)
    return fields


def decode_image(data: bytes, filename: str | None) -> np.ndarray:
    """Uploaded file bytes -> uint8 `[H, W, 3]` RGB (as `inference.inputs.load_image`: EXIF rotation applied,
    16-bit reduced, alpha dropped); RequestError if not an image."""
    what = repr(filename) if filename else "the upload"
    if not data:
        raise RequestError("no image uploaded: choose an image file (PNG, JPEG, ...)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return load_image(image)
    except UnidentifiedImageError:
        raise RequestError(f"{what} is not an image: its format is none Pillow reads (PNG, JPEG, WebP, ...)") from None
    except Exception as e:  # noqa: BLE001 (Pillow raises many types for bad files)
        raise RequestError(f"{what} is not an image Pillow can read (PNG, JPEG, WebP, ...): {e}") from None


def parse_names(text: str) -> list[str]:
    """"cat, sofa , wall" -> ["cat", "sofa", "wall"]; RequestError for none or duplicates."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise RequestError("no class names: type at least one, separated by commas (e.g. \"cat, sofa, wall\")")
    try:
        return check_class_names(names)
    except ValueError as e:
        raise RequestError(str(e)) from None


def _optional_fraction(text: str, field: str, low_open: bool) -> float | None:
    """A form number in [0, 1] ((0, 1) if `low_open`), blank -> None."""
    if not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise RequestError(f"{field} must be a number; got {text!r}") from None
    if not (0.0 < value < 1.0 if low_open else 0.0 <= value <= 1.0):
        raise RequestError(f"{field} must lie in {'(0, 1)' if low_open else '[0, 1]'}; got {text}")
    return value


def parse_request(fields: dict[str, tuple[str | None, bytes]],
                  default_names: list[str] | None = None) -> SegmentRequest:
    """The form's fields -> a checked SegmentRequest (blank class names: `default_names`, when
    given); RequestError naming the field otherwise."""
    def text(name: str) -> str:
        try:
            return fields.get(name, (None, b""))[1].decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"form field {name!r} is not UTF-8 text") from None

    filename, data = fields.get("image", (None, b""))
    mode = text("mode").strip() or "semantic"
    if mode not in MODES:
        raise RequestError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    names = list(default_names) if default_names and not text("classes").strip() else parse_names(text("classes"))
    return SegmentRequest(decode_image(data, filename), names, mode,
                          _optional_fraction(text("ensemble_weight"), "λ (ensemble weight)", low_open=False),
                          _optional_fraction(text("mask_threshold"), "mask threshold", low_open=True),
                          side_by_side=bool(text("side_by_side").strip()))


# ---------------------------------------------------------------------------------------------
# The model, one request at a time


class Service:
    """A loaded Predictor (or None: no checkpoint) serving one request at a time.

    short, max_size: `ovseg_jax.inference.inputs.preprocess`'s resize of each upload (reference 1.1); by
        default the predictor's `resize` (the backbone's test size, `inference.loading.RESIZE`).
    A blank λ or threshold on the page means the loaded predictor's value in its own mode and
    `inference.loading.MODE_DEFAULTS` in the other mode (semantic 0.7 / 0.4, demo 0 / 0.35)."""

    def __init__(self, predictor: Predictor | None, *, checkpoint: str | None = None, short: int | None = None,
                 max_size: int | None = None, class_names: list[str] | None = None):
        resize = (predictor.resize if predictor is not None else None) or RESIZE["swin"]
        self.base, self.checkpoint = predictor, checkpoint
        self.class_names = class_names  # a blank class field means these (--classes-from)
        self.short, self.max_size = short or resize[0], max_size or resize[1]
        self._lock = threading.Lock()
        self._predictors: dict[tuple, Predictor] = {}
        self.ready = threading.Event()  # set once warmed up (at once without a model)
        if predictor is None:
            self.ready.set()

    def defaults(self, mode: str) -> dict:
        """{"ensemble_weight", "mask_threshold"} of a blank form in `mode`."""
        if mode == self.base.mode:
            return {"ensemble_weight": self.base.ensemble_weight, "mask_threshold": self.base.mask_threshold}
        return dict(MODE_DEFAULTS[mode])

    def status(self) -> dict:
        defaults = None if self.base is None else {mode: self.defaults(mode) for mode in MODES}
        return {"loaded": self.base is not None, "ready": self.ready.is_set(), "checkpoint": self.checkpoint,
                "mode": None if self.base is None else self.base.mode, "defaults": defaults,
                "short": self.short, "max_size": self.max_size}

    def check_loaded(self) -> None:
        """RequestError (503) when no checkpoint is loaded."""
        if self.base is None:
            raise RequestError("no checkpoint is loaded: restart the server with "
                               "python -m ovseg_jax.serve --checkpoint FILE", HTTPStatus.SERVICE_UNAVAILABLE)

    def _predictor(self, mode: str, ensemble_weight: float | None, mask_threshold: float | None) -> Predictor:
        """The Predictor of one setting (blank: `defaults(mode)`), sharing the loaded models; cached."""
        base, defaults = self.base, self.defaults(mode)
        key = (mode, defaults["ensemble_weight"] if ensemble_weight is None else ensemble_weight,
               defaults["mask_threshold"] if mask_threshold is None else mask_threshold)
        if key not in self._predictors:
            self._predictors[key] = Predictor(base.segmenter, base.clip, mode=key[0], ensemble_weight=key[1],
                                              mask_threshold=key[2], mask_prompts=base.mask_prompts,
                                              templates=base.templates, resize=base.resize,
                                              max_pixels=base.max_pixels)
        return self._predictors[key]

    def segment(self, request: SegmentRequest) -> dict:
        """One request -> {"image": PNG data URL, "legend": [{"name", "color", "fraction", "mean_confidence"}]
        (every typed name, in order), "unlabeled", "size", "settings", "seconds", "queued_seconds"}."""
        self.check_loaded()
        t0 = time.perf_counter()
        with self._lock:  # one request on the model at a time (its caches are not thread-safe either)
            t1 = time.perf_counter()
            predictor = self._predictor(request.mode, request.ensemble_weight, request.mask_threshold)
            padded, resized_hw, original_hw = preprocess(request.image, short=self.short, max_size=self.max_size)
            segmentation = predictor.predict_batch([padded], request.names, resized_hw=[resized_hw],
                                                   original_hw=[original_hw])[0]
            t2 = time.perf_counter()
        picture = io.BytesIO()
        render(*_enlarged(request.image, segmentation), request.names, side_by_side=request.side_by_side).save(
            picture, "PNG")
        summary = summarize(segmentation, request.names)
        present = {c["index"]: c for c in summary["classes"]}
        colours = visualize.palette(len(request.names))  # render's colours
        legend = [{"name": name, "color": "#" + bytes(colours[i].tolist()).hex(),
                   "fraction": present[i]["share"] if i in present else 0.0,
                   "mean_confidence": present[i]["mean_confidence"] if i in present else None}
                  for i, name in enumerate(request.names)]
        return {"image": "data:image/png;base64," + base64.b64encode(picture.getvalue()).decode("ascii"),
                "legend": legend, "unlabeled": summary["unlabeled_share"], "size": summary["size"],
                "settings": {"mode": predictor.mode, "ensemble_weight": predictor.ensemble_weight,
                             "mask_threshold": predictor.mask_threshold},
                "seconds": round(t2 - t1, 3), "queued_seconds": round(t1 - t0, 3)}

    def warm_up(self) -> None:
        """Compile the default setting on a small square image, then mark the service ready."""
        try:
            if self.base is not None:
                t0 = time.perf_counter()
                image = np.random.RandomState(0).randint(0, 256, (*WARMUP_HW, 3)).astype(np.uint8)
                self.segment(SegmentRequest(image, list(WARMUP_NAMES), self.base.mode, None, None))
                log.info("warmed up in %.1f s", time.perf_counter() - t0)
        except Exception:  # noqa: BLE001 (requests will show the same error; the page stays up)
            log.exception("warm-up failed")
        finally:
            self.ready.set()


def _enlarged(image: np.ndarray, segmentation: Segmentation) -> tuple[np.ndarray, Segmentation]:
    """A small image and its result repeated x k (nearest) to about `DISPLAY_SIZE` px, so that the
    picture's legend text stays sharp; larger images as they are."""
    k = max(1, DISPLAY_SIZE // max(image.shape[:2]))
    if k == 1:
        return image, segmentation
    grow = lambda a: np.repeat(np.repeat(a, k, axis=0), k, axis=1)  # noqa: E731
    return grow(image), Segmentation(*(grow(np.asarray(a)) for a in segmentation))


# ---------------------------------------------------------------------------------------------
# HTTP


def make_server(service: Service, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """An HTTP server for `service` bound to (host, port) (port 0: any free one; see `.server_address`)."""

    class Handler(_Handler):
        pass

    Handler.service = service
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


class _Handler(BaseHTTPRequestHandler):
    service: Service
    server_version = "ovseg_jax"

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        log.info("%s %s", self.address_string(), format % args)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._send(HTTPStatus.OK, page(self.service).encode("utf-8"), "text/html; charset=utf-8")
        elif path == "/status":
            self._json(HTTPStatus.OK, self.service.status())
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {path!r}; the page is at /"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?", 1)[0] != "/segment":
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {self.path!r}; POST the form to /segment"})
            return
        status, payload = self._segment()
        try:
            self._json(status, payload)
        except ConnectionError:  # the browser left (closed the tab, reloaded) before the answer
            log.info("%s left before its answer", self.address_string())

    def _segment(self) -> tuple[HTTPStatus, dict]:
        """The form in this request -> (status, JSON payload); errors as one readable line."""
        try:
            body = self._body()
            self.service.check_loaded()  # before the input checks: no model is what the user must fix first
            fields = parse_multipart(self.headers.get("Content-Type", ""), body)
            return HTTPStatus.OK, self.service.segment(parse_request(fields, self.service.class_names))
        except RequestError as e:
            return e.status, {"error": str(e)}
        except ValueError as e:  # the predictor's input checks (e.g. an image too large for the model)
            return HTTPStatus.BAD_REQUEST, {"error": str(e)}
        except Exception as e:  # noqa: BLE001 (the page shows one line; the log has the traceback)
            log.exception("segmentation failed")
            return HTTPStatus.INTERNAL_SERVER_ERROR, {
                "error": f"segmentation failed: {type(e).__name__}: {e} (the server log has the details)"}

    def _body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise RequestError("the request needs a Content-Length header", HTTPStatus.LENGTH_REQUIRED)
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body must not be taken for the next request
            raise RequestError(f"upload of {length / 2**20:.1f} MB is larger than the limit of "
                               f"{MAX_BODY_BYTES / 2**20:.0f} MB", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return self.rfile.read(length)


def page(service: Service) -> str:
    """The HTML page: the form, the status line, and the script that posts the form and shows the result."""
    status = service.status()
    if status["loaded"]:
        banner = (f'<p id="status">Model <code>{html.escape(str(status["checkpoint"]))}</code>; uploads are resized '
                  f'to a short side of {status["short"]} px (long side at most {status["max_size"]}).</p>')
    else:
        banner = ('<p id="status" class="warning">No checkpoint is loaded, so nothing can be segmented. Restart '
                  'with <code>python -m ovseg_jax.serve --checkpoint FILE</code>.</p>')
    options = "".join(f'<option value="{m}"{" selected" if m == status["mode"] else ""}>{html.escape(label)}</option>'
                      for m, label in (("semantic", "semantic: every pixel gets a class"),
                                       ("demo", "demo: the best proposal of each class, the rest unlabeled")))
    hint = (f"blank: the {len(service.class_names)} classes of the dataset ({', '.join(service.class_names[:4])}, ...)"
            if service.class_names else "comma-separated, e.g. cat, sofa, wall")
    return (_PAGE.replace("{banner}", banner).replace("{options}", options).replace("{classes_hint}", html.escape(hint))
            .replace("{defaults}", json.dumps(status["defaults"] or {}).replace("</", "<\\/")))


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>OVSeg: segment with any class names</title>
<style>
[hidden] { display: none !important; }
body { font-family: system-ui, sans-serif; margin: 20px auto; max-width: 880px; color: #222; padding: 0 12px; }
h1 { font-size: 1.4em; margin-bottom: 4px; }
form { display: grid; grid-template-columns: max-content 1fr; gap: 8px 12px; align-items: center;
       background: #f3f4f6; padding: 14px; border-radius: 8px; }
input[type=text] { width: 100%; box-sizing: border-box; padding: 4px; }
input[type=checkbox] { justify-self: start; }
button { width: 9em; padding: 6px; font-weight: 600; }
.warning, #error { background: #fde8e8; color: #8b0000; padding: 8px 12px; border-radius: 6px; }
#result { display: flex; gap: 20px; align-items: flex-start; margin-top: 16px; flex-wrap: wrap; }
#overlay { max-width: 560px; border: 1px solid #ccc; }
#legend { list-style: none; padding: 0; margin: 0; }
#legend li { margin: 4px 0; }
.swatch { display: inline-block; width: 14px; height: 14px; border: 1px solid #000; margin-right: 6px;
          vertical-align: -2px; }
.share, #timing { color: #666; font-size: 0.9em; }
</style></head>
<body>
<h1>Open-vocabulary segmentation (OVSeg)</h1>
{banner}
<form id="form" novalidate>
  <label for="image">Image</label><input id="image" name="image" type="file" accept="image/*">
  <label for="classes">Class names</label>
  <input id="classes" name="classes" type="text" placeholder="{classes_hint}">
  <label for="mode">Mode</label>
  <select id="mode" name="mode">{options}</select>
  <label for="ensemble_weight">λ (CLIP's weight)</label>
  <input id="ensemble_weight" name="ensemble_weight" type="text">
  <label for="mask_threshold">Mask threshold</label>
  <input id="mask_threshold" name="mask_threshold" type="text">
  <label for="side_by_side">Input beside it</label>
  <input id="side_by_side" name="side_by_side" type="checkbox" value="1">
  <span></span><button id="submit" type="submit">Segment</button>
</form>
<p id="busy" hidden>Segmenting…</p>
<p id="error" role="alert" hidden></p>
<div id="result" hidden>
  <img id="overlay" alt="segmentation overlay">
  <div><ul id="legend"></ul><p id="timing"></p></div>
</div>
<script id="defaults" type="application/json">{defaults}</script>
<script>
const $ = (id) => document.getElementById(id);
const defaults = JSON.parse($("defaults").textContent);
function showDefaults() {  // a blank field means the mode's default, shown as the placeholder
  const d = defaults[$("mode").value];
  $("ensemble_weight").placeholder = d ? `${d.ensemble_weight ?? "none (segmenter only)"}   (0 = CLIP only, as the original demo)` : "";
  $("mask_threshold").placeholder = d ? `${d.mask_threshold}` : "";
}
$("mode").addEventListener("change", showDefaults);
showDefaults();
$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("error").hidden = true; $("busy").hidden = false; $("submit").disabled = true;
  try {
    const response = await fetch("segment", {method: "POST", body: new FormData($("form"))});
    let body;
    try { body = await response.json(); }
    catch { body = {error: `the server answered ${response.status} ${response.statusText}`}; }
    if (!response.ok || body.error) throw new Error(body.error || `HTTP ${response.status}`);
    $("legend").replaceChildren(...body.legend.map((entry) => {
      const item = document.createElement("li"), swatch = document.createElement("span");
      const name = document.createElement("span"), share = document.createElement("span");
      swatch.className = "swatch"; swatch.style.background = entry.color;
      name.className = "name"; name.textContent = entry.name;
      share.className = "share"; share.textContent = ` ${(100 * entry.fraction).toFixed(1)}%`;
      item.append(swatch, name, share);
      return item;
    }));
    $("timing").textContent = (body.unlabeled > 0 ? `unlabeled ${(100 * body.unlabeled).toFixed(1)}% · ` : "")
      + `${body.size[1]} x ${body.size[0]} px in ${body.seconds.toFixed(2)} s`
      + (body.queued_seconds > 0.05 ? ` (+${body.queued_seconds.toFixed(1)} s queued)` : "");
    $("overlay").src = body.image;
    $("result").hidden = false;
  } catch (error) {
    $("result").hidden = true;
    $("error").textContent = error.message;
    $("error").hidden = false;
  } finally {
    $("busy").hidden = true; $("submit").disabled = false;
  }
});
</script>
</body></html>
"""


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ovseg_jax.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="OVSeg checkpoint (.pth) or what ovseg_jax.inference.loading.load_predictor "
                                             "accepts; without it the page says that no model is loaded")
    parser.add_argument("--tokenizer", help="tokenizer directory or OpenAI BPE file, if not beside the checkpoint")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--short", type=int, help="uploads are resized to this short side (reference 1.1; default "
                                                   "the backbone's: 640 Swin-B, 512 R101c; the demo's: 128)")
    parser.add_argument("--max-size", type=int, help="... with the long side at most this (2560 / 2048; demo 512)")
    parser.add_argument("--mask-threshold", type=float, help="default mask threshold (the page can override it)")
    parser.add_argument("--ensemble-weight", type=float, help="default λ (the page can override it)")
    parser.add_argument("--classes-from", metavar="DATASET", help="a dataset folder (docs/own-data.md) or registry "
                        "name whose class list a blank class field on the page means")
    parser.add_argument("--templates", default="vild", help="prompt templates: 'vild' (14), 'single', or your own "
                                                             "with '{}', separated by ';' (the demo's: 'a {}')")
    parser.add_argument("--cache-dir", help="JAX persistent compilation cache: later starts compile faster")
    parser.add_argument("--no-warmup", action="store_true", help="skip compiling at start")
    args = parser.parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)

    def fail(message: str) -> NoReturn:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    for name in ("short", "max_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive; got {getattr(args, name)}")
    try:
        templates = parse_templates(args.templates)
        resolve_templates(templates)
    except ValueError as e:
        fail(f"--templates: {e}")
    class_names = None
    if args.classes_from:
        try:
            class_names = parse_class_names(classes_from=args.classes_from)
        except InputError as e:
            fail(str(e))
    predictor = None
    if args.checkpoint:
        if args.cache_dir:
            from ovseg_jax.utils.compilation import enable_cache  # noqa: PLC0415
            enable_cache(args.cache_dir)
        kwargs = {k: v for k, v in (("mask_threshold", args.mask_threshold),
                                    ("ensemble_weight", args.ensemble_weight)) if v is not None}
        try:
            predictor = load_predictor(args.checkpoint, args.tokenizer, templates=templates, **kwargs)
        except (OSError, ValueError) as e:
            fail(f"cannot load {args.checkpoint}: {str(e).splitlines()[0]}")
    service = Service(predictor, checkpoint=args.checkpoint, short=args.short, max_size=args.max_size,
                      class_names=class_names)
    try:
        server = make_server(service, args.host, args.port)
    except OSError as e:
        fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e} (another server there? pick --port)")
    if not args.no_warmup:
        threading.Thread(target=service.warm_up, name="warm-up", daemon=True).start()
    else:
        service.ready.set()
    host, port = server.server_address[:2]
    log.info("serving on http://%s:%d/%s", host, port, "" if predictor else " (no checkpoint loaded)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
