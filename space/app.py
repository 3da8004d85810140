"""The Hugging Face Space: OVSeg's web app (`ovseg_jax.web.app`) on the checkpoint the Space's
variables name. Steps to create the Space: docs/web-app.md.

Variables (Space settings -> Variables; locally, environment variables):
    OVSEG_CHECKPOINT  the checkpoint: a path in the Space (e.g. ovseg.safetensors, written by
                      `python -m ovseg_jax.export --format ovseg`: no torch needed to read it), or
                      hf://<owner>/<repo>/<file> for a file of a model repository (downloaded once)
    OVSEG_TOKENIZER   OpenAI's bpe_simple_vocab_16e6.txt.gz or a tokenizer directory (same forms;
                      default: beside the checkpoint)
    OVSEG_TEMPLATES   prompt templates: vild (default, the paper's 14), single, or yours with {} and ';'
    OVSEG_MODE        the mode the page starts in: semantic (default) or demo (the original demo's)
    OVSEG_SAM_CHECKPOINT  SAM weights (sam_vit_{b,l,h}_*.pth, same forms): the page then offers SAM's
                      automatic masks as proposals
Without OVSEG_CHECKPOINT the page says so and segments nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from ovseg_jax.inference.inputs import parse_templates
from ovseg_jax.inference.loading import load_predictor
from ovseg_jax.web.app import build_app, launch

NO_MODEL_HINT = "set the Space's variable OVSEG_CHECKPOINT (and OVSEG_TOKENIZER) in its settings, then restart it"


def resolve(spec: str | None) -> str | None:
    """A path as is; hf://<owner>/<repo>/<file in the repo> -> the downloaded file's local path."""
    if not spec or not spec.startswith("hf://"):
        return spec
    from huggingface_hub import hf_hub_download  # noqa: PLC0415  (comes with gradio)

    owner, repo, filename = spec[len("hf://"):].split("/", 2)
    return hf_hub_download(f"{owner}/{repo}", filename)


def create_app(environ=os.environ, warm_up: bool = True):
    """The app on the checkpoint `environ` names (see the module docstring), warming up in a thread."""
    checkpoint = resolve(environ.get("OVSEG_CHECKPOINT"))
    predictor = None
    if checkpoint:
        predictor = load_predictor(Path(checkpoint), resolve(environ.get("OVSEG_TOKENIZER")),
                                   templates=parse_templates(environ.get("OVSEG_TEMPLATES", "vild")),
                                   mode=environ.get("OVSEG_MODE", "semantic"),
                                   sam_checkpoint=resolve(environ.get("OVSEG_SAM_CHECKPOINT")))
    app = build_app(predictor, checkpoint=environ.get("OVSEG_CHECKPOINT"), no_model_hint=NO_MODEL_HINT)
    if warm_up:
        app.service.ready.clear()  # requests wait from now, not from when the thread starts
        threading.Thread(target=app.service.warm_up, name="warm-up", daemon=True).start()
    return app


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    # Spaces set GRADIO_SERVER_NAME=0.0.0.0 and GRADIO_SERVER_PORT; locally: http://127.0.0.1:7860
    launch(create_app(), os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
           int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
