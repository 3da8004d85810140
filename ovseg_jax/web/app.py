"""The web app: segment an image with any class names in the browser, and the same as an API (Gradio).

    app = build_app(load_predictor("ovseg.pth"), checkpoint="ovseg.pth")
    launch(app, port=7860)                       # what `python -m ovseg_jax.serve` does

The page: an image (upload, paste, or one of the bundled example photos), class names separated by
commas, the mode (semantic: every pixel gets a class; demo: the original demo's best proposal per
class, the rest unlabeled), λ (CLIP's weight) and the mask threshold, and whether to show the input
beside the result. The result is Gradio's annotated image (hovering a class in its legend
highlights its pixels) with a legend of every name's share of the pixels; the picture that
`python -m ovseg_jax.predict` writes and the API's JSON answer are below it.

The API, from `gradio_client` (the page's Segment button calls the same endpoint):

    client = Client("http://127.0.0.1:7860/")
    overlay, legend = client.predict(handle_file("photo.jpg"), "cat, sofa, wall", "semantic", 0.7, 0.4,
                                     api_name="/segment")

A sixth argument, `proposals` ("maskformer", "sam" or "both"; default the loaded predictor's),
picks the masks CLIP classifies; SAM's need the predictor's `sam` (`load_predictor(...,
sam_checkpoint=...)`), and the page shows that choice only then.

`overlay`: the path of a PNG (class colours over the image, boundaries and a legend drawn in);
`legend`: `[{"name", "color" ("#rrggbb"), "share" (of the pixels), "mean_confidence" (None when
absent)}]`, one entry per name, in the order given. Bad input (not an image, too many pixels, no or
duplicate names, settings out of range, no checkpoint loaded) is a `gr.Error`: one line on the page,
`gradio_client.exceptions.AppError` with that line for a script.

Requests wait in Gradio's queue and `concurrency` of them run on the model at a time (default 1).
One `Predictor` program serves every class list of up to 16 names, λ and threshold (they are traced;
see `ovseg_jax.inference.ensemble`), so only a new padded image shape compiles; `Service.warm_up`
compiles the square shape at start. Nothing is fetched from the internet: no analytics, no share
link, the theme's fonts are Gradio's own files.
"""

from __future__ import annotations

import hashlib
import html
import io
import logging
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import gradio as gr
import numpy as np
from PIL import Image, UnidentifiedImageError

from ovseg_jax.inference import visualize
from ovseg_jax.inference.ensemble import MODES, PROPOSALS, Predictor, Segmentation, check_class_names
from ovseg_jax.inference.inputs import load_image, preprocess
from ovseg_jax.inference.loading import MODE_DEFAULTS, RESIZE, sam_defaults
from ovseg_jax.inference.results import render, summarize

log = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
# (file in EXAMPLES_DIR, class names): scikit-image's sample photos (public domain / CC0), <= 256 px.
EXAMPLES = (("astronaut.jpg", "person, flag, space suit, wall"), ("chelsea.jpg", "cat, floor, wall"),
            ("coffee.jpg", "cup, coffee, spoon, table"))
# What the mode and proposals controls offer: (label, value); values are `ensemble.MODES` / `ensemble.PROPOSALS`.
MODE_CHOICES = (("semantic: every pixel gets a class", "semantic"),
                ("demo: the best proposal of each class, the rest unlabeled", "demo"))
PROPOSAL_CHOICES = (("the segmenter's (OVSeg)", "maskformer"), ("SAM's automatic masks", "sam"),
                    ("both", "both"))
MAX_UPLOAD_BYTES = 50 * 1024 * 1024  # larger uploads are refused by Gradio before they are stored
MAX_IMAGE_PIXELS = 50_000_000  # larger images (by their header) are refused before they are decoded
MAX_CLASS_NAMES = 1024
DISPLAY_SIZE = 320  # smaller images are shown enlarged (nearest) to about this many pixels
DISPLAY_MAX = 1024  # larger images are shown reduced to this many pixels (long side)
WARMUP_HW = (64, 64)  # the warm-up image: any square upload then reuses its compilation
WARMUP_NAMES = ("thing", "stuff", "background")
NO_MODEL_HINT = "restart with python -m ovseg_jax.serve --checkpoint FILE"


class Result(NamedTuple):
    """One segmented upload."""
    image: np.ndarray  # uint8 [H, W, 3], as uploaded (EXIF orientation applied)
    segmentation: Segmentation  # at the upload's size
    names: list[str]  # the class names, in the order given
    settings: dict  # {"mode", "proposals", "ensemble_weight", "mask_threshold"} the Predictor ran with
    seconds: float  # preprocessing + model


# ---------------------------------------------------------------------------------------------
# Inputs


def upload_path(payload) -> str | None:
    """The `/segment` event's raw image value (it runs with `preprocess=False`) -> the uploaded
    file's path in Gradio's cache, or None. (Gradio's own `gr.Image` preprocessing would open the
    file with Pillow and answer a non-image with a generic error; `read_image` names it instead.)"""
    if payload is None:
        return None
    path = payload.get("path") if isinstance(payload, dict) else getattr(payload, "path", payload)
    return str(path) if path else None


def read_image(path: str | None) -> np.ndarray:
    """An uploaded file -> uint8 `[H, W, 3]` RGB (`inference.inputs.load_image`: EXIF rotation,
    16-bit reduced, alpha dropped); `gr.Error` for no file, a non-image or more than `MAX_IMAGE_PIXELS`."""
    if not path:
        raise gr.Error("no image: upload an image file (PNG, JPEG, ...) or pick an example")
    name = repr(Path(path).name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise gr.Error(f"{name} has {width} x {height} pixels, more than the limit of "
                                   f"{MAX_IMAGE_PIXELS / 1e6:g} megapixels: downscale it first")
                image.load()
                return load_image(image)
    except gr.Error:
        raise
    except UnidentifiedImageError:
        raise gr.Error(f"{name} is not an image: its format is none Pillow reads (PNG, JPEG, WebP, ...)") from None
    except Exception as e:  # noqa: BLE001 (Pillow raises many types for bad files)
        raise gr.Error(f"{name} is not an image Pillow can read (PNG, JPEG, WebP, ...): {e}") from None


def parse_names(text: str | None, default: Sequence[str] | None = None) -> list[str]:
    """"cat, sofa , wall" -> ["cat", "sofa", "wall"] (`ensemble.check_class_names`); a blank field is
    `default` when given; `gr.Error` for none, blank or duplicate names, or too many."""
    names = [n.strip() for n in (text or "").split(",")]
    if names == [""]:
        if default:
            return list(default)
        raise gr.Error('no class names: type at least one, separated by commas (e.g. "cat, sofa, wall")')
    if len(names) > MAX_CLASS_NAMES:
        raise gr.Error(f"{len(names)} class names; at most {MAX_CLASS_NAMES} are accepted")
    try:
        return check_class_names(names)
    except ValueError as e:
        raise gr.Error(str(e)) from None


def _fraction(value: float | None, what: str, open_low: bool) -> float | None:
    """A setting in [0, 1] ((0, 1) with `open_low`), None kept (the mode's default)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise gr.Error(f"{what} must be a number in {'(0, 1)' if open_low else '[0, 1]'}; got {value!r}")
    inside = 0.0 < value < 1.0 if open_low else 0.0 <= value <= 1.0
    if not inside:
        raise gr.Error(f"{what} must lie in {'(0, 1)' if open_low else '[0, 1]'}; got {value}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# The model


class Service:
    """A loaded Predictor (or None: no checkpoint) and how uploads reach it.

    short, max_size: `inference.inputs.preprocess`'s resize of each upload (reference 1.1); default
        the predictor's `resize` (the backbone's test size, `inference.loading.RESIZE`).
    class_names: what a blank class field means (e.g. a dataset's classes); None: a blank field is an error.
    Unset λ or threshold mean the loaded predictor's value in its own mode and proposals, else
    `inference.loading.MODE_DEFAULTS` (semantic 0.7 / 0.4, demo 0 / 0.35; λ 0 with SAM's proposals,
    `loading.sam_defaults`). Proposals other than the segmenter's need the predictor's `sam`
    (`load_predictor(..., sam_checkpoint=...)`); demo mode with them keeps its `granularity`."""

    def __init__(self, predictor: Predictor | None, *, checkpoint: str | None = None, short: int | None = None,
                 max_size: int | None = None, class_names: Sequence[str] | None = None,
                 no_model_hint: str = NO_MODEL_HINT):
        resize = (predictor.resize if predictor is not None else None) or RESIZE["swin"]
        self.base, self.checkpoint, self.no_model_hint = predictor, checkpoint, no_model_hint
        self.class_names = list(class_names) if class_names else None
        self.short, self.max_size = short or resize[0], max_size or resize[1]
        self.ready = threading.Event()  # cleared while `warm_up` runs: requests wait for it
        self.ready.set()

    @property
    def mode(self) -> str:
        return "semantic" if self.base is None else self.base.mode

    @property
    def proposals(self) -> str:
        return "maskformer" if self.base is None else self.base.proposal_source

    @property
    def has_sam(self) -> bool:
        return self.base is not None and self.base.sam is not None

    def defaults(self, mode: str, proposals: str | None = None) -> dict:
        """{"ensemble_weight", "mask_threshold"} of `mode` and `proposals` (default the loaded
        predictor's) when the request leaves them unset."""
        proposals = proposals or self.proposals
        if self.base is not None and (mode, proposals) == (self.base.mode, self.base.proposal_source):
            return {"ensemble_weight": self.base.ensemble_weight, "mask_threshold": self.base.mask_threshold}
        weight = sam_defaults(proposals, mode).get("ensemble_weight", MODE_DEFAULTS[mode]["ensemble_weight"])
        return {**MODE_DEFAULTS[mode], "ensemble_weight": weight}

    def check_loaded(self) -> None:
        if self.base is None:
            raise gr.Error(f"no checkpoint is loaded, so nothing can be segmented: {self.no_model_hint}")

    def check_proposals(self, proposals: str) -> None:
        if proposals not in PROPOSALS:
            raise gr.Error(f"proposals must be one of {', '.join(PROPOSALS)}; got {proposals!r}")
        if proposals != "maskformer" and not self.has_sam:
            raise gr.Error(f"proposals {proposals!r} need SAM, and no SAM checkpoint is loaded: restart with "
                           "--sam-checkpoint sam_vit_{b,l,h}_*.pth")

    def predictor(self, mode: str, ensemble_weight: float | None, mask_threshold: float | None,
                  proposals: str | None = None) -> Predictor:
        """The loaded models with these settings (unset: `defaults(mode, proposals)`). Cheap: every
        λ, threshold and class list shares the compiled program of a mode and proposal source."""
        base, proposals = self.base, proposals or self.proposals
        self.check_proposals(proposals)
        defaults = self.defaults(mode, proposals)
        return Predictor(base.segmenter, base.clip, mode=mode,
                         ensemble_weight=defaults["ensemble_weight"] if ensemble_weight is None else ensemble_weight,
                         mask_threshold=defaults["mask_threshold"] if mask_threshold is None else mask_threshold,
                         mask_prompts=base.mask_prompts, templates=base.templates, resize=base.resize,
                         max_pixels=base.max_pixels, crop=base.crop, class_bucket=base.class_bucket,
                         clip_top_k=base.clip_top_k if proposals == "maskformer" else None, proposals=proposals,
                         sam=base.sam, granularity=base.granularity if proposals != "maskformer" and mode == "demo"
                         else 1.0)

    def segment(self, image: np.ndarray, names: list[str], mode: str, ensemble_weight: float | None = None,
                mask_threshold: float | None = None, proposals: str | None = None) -> Result:
        """uint8 `[H, W, 3]` image and checked names -> `Result` (waits for the warm-up first)."""
        self.check_loaded()
        self.ready.wait()
        predictor = self.predictor(mode, ensemble_weight, mask_threshold, proposals)
        t0 = time.perf_counter()
        padded, resized_hw, original_hw = preprocess(image, short=self.short, max_size=self.max_size)
        segmentation = predictor.predict_batch([padded], names, resized_hw=[resized_hw],
                                               original_hw=[original_hw])[0]
        settings = {"mode": mode, "proposals": predictor.proposal_source, "ensemble_weight": predictor.ensemble_weight,
                    "mask_threshold": predictor.mask_threshold}
        return Result(image, segmentation, names, settings, time.perf_counter() - t0)

    def warm_up(self) -> None:
        """Compile the loaded predictor's mode on a small square image (what requests wait for), then
        mark the service ready."""
        self.ready.clear()
        try:
            if self.base is not None:
                t0 = time.perf_counter()
                image = np.random.RandomState(0).randint(0, 256, (*WARMUP_HW, 3)).astype(np.uint8)
                padded, resized_hw, original_hw = preprocess(image, short=self.short, max_size=self.max_size)
                self.predictor(self.mode, None, None).predict_batch(
                    [padded], list(WARMUP_NAMES), resized_hw=[resized_hw], original_hw=[original_hw])
                log.info("warmed up in %.1f s", time.perf_counter() - t0)
        except Exception:  # requests will show the same error; the page stays up
            log.exception("warm-up failed")
        finally:
            self.ready.set()


# ---------------------------------------------------------------------------------------------
# Outputs


def colours(names: Sequence[str]) -> list[str]:
    """"#rrggbb" of each class, as `inference.results.render` paints it."""
    return ["#" + bytes(c.tolist()).hex() for c in visualize.palette(len(names))]


def legend(result: Result) -> list[dict]:
    """[{"name", "color", "share", "mean_confidence"}] of every name, in order (share 0 and
    confidence None for a name no pixel got)."""
    present = {c["index"]: c for c in summarize(result.segmentation, result.names)["classes"]}
    return [{"name": name, "color": colour, "share": present[i]["share"] if i in present else 0.0,
             "mean_confidence": present[i]["mean_confidence"] if i in present else None}
            for i, (name, colour) in enumerate(zip(result.names, colours(result.names)))]


def _enlargement(hw: tuple[int, int]) -> int:
    return max(1, DISPLAY_SIZE // max(hw))


def _grow(array: np.ndarray, k: int) -> np.ndarray:
    return array if k == 1 else np.repeat(np.repeat(array, k, axis=0), k, axis=1)


def overlay_picture(result: Result) -> Image.Image:
    """The picture `python -m ovseg_jax.predict` writes (`inference.results.render`), a small
    image enlarged (nearest) to about `DISPLAY_SIZE` px so that its legend text stays sharp."""
    k = _enlargement(result.image.shape[:2])
    grown = Segmentation(*(_grow(np.asarray(a), k) for a in result.segmentation))
    return render(_grow(result.image, k), grown, result.names)


class View(NamedTuple):
    """What the page draws of one result, at display size (kept in the browser session's state)."""
    image: np.ndarray  # uint8 [h, w, 3]
    labels: np.ndarray  # int16 [h, w] class indices, UNLABELED (-1) where demo mode labels nothing
    legend: list[dict]  # `legend(result)`
    size: tuple[int, int]  # (H, W) of the upload
    seconds: float


def view(result: Result) -> View:
    """A small image enlarged (nearest) to about `DISPLAY_SIZE` px, a large one reduced to at most
    `DISPLAY_MAX` px (the browser gets one PNG per class of this size)."""
    h, w = result.image.shape[:2]
    k = _enlargement((h, w))
    image, labels = _grow(result.image, k), _grow(np.asarray(result.segmentation.labels, np.int16), k)
    if max(h, w) > DISPLAY_MAX:
        size = (round(w * DISPLAY_MAX / max(h, w)), round(h * DISPLAY_MAX / max(h, w)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        labels = labels[(np.arange(size[1]) * h // size[1])[:, None], (np.arange(size[0]) * w // size[0])[None]]
    return View(image, labels, legend(result), (h, w), result.seconds)


def annotated(shown: View, beside: bool = False) -> tuple[np.ndarray, list[tuple[np.ndarray, str]]]:
    """`gr.AnnotatedImage`'s value: (base picture, [(0/1 mask, name)] of the classes present);
    with `beside` the base is the input twice, side by side, and the masks lie on the right one."""
    base = visualize.side_by_side([shown.image, shown.image]) if beside else shown.image
    offset = base.shape[1] - shown.image.shape[1]
    masks = []
    for i in np.unique(shown.labels[shown.labels >= 0]):
        mask = np.zeros(base.shape[:2], np.float32)
        mask[:, offset:] = shown.labels == i
        masks.append((mask, shown.legend[i]["name"]))
    return base, masks


def legend_html(shown: View) -> str:
    """The page's legend: a swatch, the name and its share for every name, then size and time."""
    rows = "".join(
        f'<li><span style="display:inline-block;width:14px;height:14px;background:{e["color"]};'
        f'border:1px solid #000;margin-right:6px;vertical-align:-2px"></span><span class="name">'
        f'{html.escape(e["name"])}</span> <span class="share">{100 * e["share"]:.1f}%</span></li>'
        for e in shown.legend)
    unlabeled = 1.0 - sum(e["share"] for e in shown.legend)
    note = f"unlabeled {100 * unlabeled:.1f}% · " if unlabeled > 5e-4 else ""
    return (f'<ul id="legend" style="list-style:none;padding:0;margin:0">{rows}</ul>'
            f'<p id="timing" style="color:#666">{note}{shown.size[1]} x {shown.size[0]} px in '
            f'{shown.seconds:.2f} s</p>')


def cached_png(picture: Image.Image, cache_dir: str | os.PathLike) -> str:
    """`picture` as a PNG in Gradio's cache folder, named by its content and written under a temporary
    name, then renamed -> its path. Gradio's own handling of a returned PIL image rewrites
    `<cache>/<hash>/image.png` in place, so when two requests give the same picture (two people on
    one example) one client could download the file while the other request truncates it."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    data = buffer.getvalue()
    directory = Path(cache_dir) / hashlib.sha256(data).hexdigest()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "overlay.png"
    if not path.exists():
        fd, staging = tempfile.mkstemp(prefix=".overlay.", suffix=".png", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(staging, path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# The app


def status_markdown(service: Service) -> str:
    if service.base is None:
        return f"**No checkpoint is loaded**, so nothing can be segmented: {service.no_model_hint}."
    source = f"`{service.checkpoint}`" if service.checkpoint else "the given model"
    return (f"Model {source}. Uploads are resized to a short side of {service.short} px (long side at most "
            f"{service.max_size}). λ is CLIP's weight in the ensemble (0: CLIP alone, as the original demo).")


def build_app(predictor: Predictor | None, *, checkpoint: str | None = None, short: int | None = None,
              max_size: int | None = None, class_names: Sequence[str] | None = None, concurrency: int = 1,
              no_model_hint: str = NO_MODEL_HINT, title: str = "OVSeg: segment with any class names") -> gr.Blocks:
    """The page and the `/segment` API on `predictor` (None: the page says no checkpoint is loaded);
    see the module docstring. `concurrency`: requests running on the model at once (the others queue).
    The `Service` is `app.service`; call `app.service.warm_up()` (e.g. in a thread) before serving."""
    service = Service(predictor, checkpoint=checkpoint, short=short, max_size=max_size, class_names=class_names,
                      no_model_hint=no_model_hint)
    defaults = service.defaults(service.mode)

    def segment(image: dict | None, class_names: str, mode: str, ensemble_weight: float | None,
                mask_threshold: float | None, proposals: str | None = None):
        """Segment `image` (the upload's raw `FileData`) into `class_names` (comma-separated) ->
        (overlay PNG, legend JSON). The inputs arrive unprocessed (`preprocess=False`) and are checked here."""
        service.check_loaded()  # before the input checks: no model is what the user must fix first
        if mode not in MODES:
            raise gr.Error(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        proposals = proposals or service.proposals
        service.check_proposals(proposals)
        weight = _fraction(ensemble_weight, "λ (ensemble weight)", open_low=False)
        threshold = _fraction(mask_threshold, "mask threshold", open_low=True)
        names = parse_names(class_names, service.class_names)
        result = service.segment(read_image(upload_path(image)), names, mode, weight, threshold, proposals)
        log.info("segmented %d x %d px, %d names, %s in %.2f s", *result.image.shape[:2], len(names), mode,
                 result.seconds)
        shown = view(result)
        return cached_png(overlay_picture(result), app.GRADIO_CACHE), shown.legend, shown

    def show(shown: View | None, beside: bool):
        if shown is None:
            return gr.skip(), gr.skip()
        colour_map = {e["name"]: e["color"] for e in shown.legend}
        return gr.AnnotatedImage(value=annotated(shown, beside), color_map=colour_map), legend_html(shown)

    def settings_defaults(mode: str, proposals: str):
        d = service.defaults(mode, proposals) if mode in MODES and proposals in PROPOSALS else defaults
        return d["ensemble_weight"] or 0.0, d["mask_threshold"]

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(600, 3600)) as app:
        gr.Markdown(f"## {html.escape(title)}")
        gr.Markdown(status_markdown(service), elem_id="status")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"],
                                 height=320, elem_id="image")
                hint = ("blank: the classes of the dataset" if service.class_names
                        else "comma-separated, e.g. cat, sofa, wall")
                classes = gr.Textbox(label="Class names", placeholder=hint, elem_id="classes")
                mode = gr.Radio(list(MODE_CHOICES), value=service.mode, label="Mode", elem_id="mode")
                # shown with a SAM checkpoint loaded; the API always takes it (default the loaded predictor's)
                proposals = gr.Radio(list(PROPOSAL_CHOICES), value=service.proposals, visible=service.has_sam,
                                     label="Proposals: the masks CLIP classifies", elem_id="proposals")
                with gr.Row():
                    weight = gr.Slider(0.0, 1.0, value=defaults["ensemble_weight"] or 0.0, step=0.05,
                                       label="λ (CLIP's weight)", elem_id="ensemble_weight")
                    threshold = gr.Slider(0.0, 1.0, value=defaults["mask_threshold"], step=0.05,
                                          label="Mask threshold", elem_id="mask_threshold")
                beside = gr.Checkbox(label="Show the input beside it", elem_id="beside")
                submit = gr.Button("Segment", variant="primary", elem_id="submit")
                gr.Examples([[str(EXAMPLES_DIR / f), names] for f, names in EXAMPLES], [image, classes],
                            label="Examples (scikit-image's sample photos: public domain, CC0)")
            with gr.Column():
                segmented = gr.AnnotatedImage(label="Segmentation (hover a class to highlight it)",
                                              elem_id="segmentation")
                legend_box = gr.HTML(elem_id="legend-box")
                with gr.Accordion("The picture and the API's answer", open=False):
                    picture = gr.Image(label="Overlay", type="filepath", format="png", interactive=False,
                                       elem_id="overlay")
                    answer = gr.JSON(label="Legend")
        shown = gr.State(time_to_live=3600)  # the last result's `View`, per browser session

        run = gr.on([submit.click, classes.submit], segment, [image, classes, mode, weight, threshold, proposals],
                    [picture, answer, shown], api_name="segment", concurrency_limit=concurrency,
                    concurrency_id="model", preprocess=False)
        run.success(show, [shown, beside], [segmented, legend_box], queue=False, api_visibility="private")
        beside.change(show, [shown, beside], [segmented, legend_box], queue=False, api_visibility="private")
        for control in (mode, proposals):
            control.change(settings_defaults, [mode, proposals], [weight, threshold], queue=False,
                           api_visibility="private")
    app.queue(default_concurrency_limit=concurrency)
    app.service = service
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, *,
           max_file_size: int = MAX_UPLOAD_BYTES, block: bool = True, quiet: bool = False) -> str:
    """Serve `app` on (host, port) (port None or 0: the first free one from 7860) without reaching
    the internet (no share link; analytics are off in `build_app`) -> its URL. `block=False` returns
    at once (tests, benchmarks); `app.close()` stops it."""
    _, url, _ = app.launch(server_name=host, server_port=port or None, share=False, max_file_size=max_file_size,
                           prevent_thread_lock=not block, quiet=quiet, show_error=False,
                           footer_links=["api"], enable_monitoring=False, ssr_mode=False, pwa=False)
    return url
