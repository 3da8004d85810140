"""Automatic mask generation with SAM over an image or a folder of images.

    python -m ovseg_jax.amg --checkpoint sam_vit_b_01ec64.pth --input photos/ --output masks/
    python -m ovseg_jax.amg --checkpoint sam_vit_h_4b8939.pth --input cat.jpg --output masks/ --convert-to-rle

segment_anything's `scripts/amg.py` with the same flags and output: per image, a folder
`<output>/<stem>/` of masks `0.png, 1.png, ...` (8-bit, 255 inside) and a `metadata.csv` (id, area,
bbox, point, predicted IoU, stability, crop box), or with `--convert-to-rle` one `<output>/<stem>.json`
holding the records with COCO RLE masks. The architecture is read from the checkpoint
(`--model-type` only checks it); `--dtype bfloat16` computes in bfloat16. The work is done by
`ovseg_jax.inference.amg.AutomaticMaskGenerator`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ovseg_jax.inference.inputs import InputError

MODEL_TYPES = ("default", "vit_h", "vit_l", "vit_b")
METADATA_HEADER = ("id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
                   "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h")
# --flag -> AutomaticMaskGenerator argument; unset flags keep the generator's defaults.
AMG_FLAGS = (
    ("points-per-side", int, "sample a grid with this many points a side (default 32)"),
    ("points-per-batch", int, "points decoded together (default 64)"),
    ("pred-iou-thresh", float, "drop masks whose predicted IoU is not above this (default 0.88)"),
    ("stability-score-thresh", float, "drop masks whose stability score is below this (default 0.95)"),
    ("stability-score-offset", float, "logit offset of the stability score (default 1.0)"),
    ("box-nms-thresh", float, "box IoU above which a duplicate mask is dropped (default 0.7)"),
    ("crop-n-layers", int, "also run on 4^i crops for layers i = 1..n (default 0)"),
    ("crop-nms-thresh", float, "box IoU for duplicates between crops (default 0.7)"),
    ("crop-overlap-ratio", float, "overlap of first-layer crops, as a fraction of the short side (default 512/1500)"),
    ("crop-n-points-downscale-factor", int, "points a side divided by this per crop layer (default 1)"),
    ("min-mask-region-area", int, "fill holes and drop islands smaller than this many pixels (default 0: off)"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ovseg_jax.amg", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--output", required=True, help="folder for the masks (a folder or a .json per image)")
    p.add_argument("--checkpoint", required=True,
                   help="SAM checkpoint: sam_vit_{b,l,h}_*.pth (or .safetensors) or a transformers SamModel folder")
    p.add_argument("--model-type", choices=MODEL_TYPES, default=None,
                   help="check the checkpoint is this architecture ('default' is vit_h; default: read from the file)")
    p.add_argument("--convert-to-rle", action="store_true",
                   help="write one <stem>.json with COCO RLE masks per image instead of a folder of PNGs")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    settings = p.add_argument_group("AMG settings")
    for flag, kind, text in AMG_FLAGS:
        settings.add_argument(f"--{flag}", type=kind, default=None, help=text)
    return p


def amg_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The AMG settings given on the command line, as `AutomaticMaskGenerator` arguments."""
    values = {flag.replace("-", "_"): getattr(args, flag.replace("-", "_")) for flag, _, _ in AMG_FLAGS}
    return {name: value for name, value in values.items() if value is not None}


def list_inputs(path: Path) -> list[Path]:
    """An image file -> [it]; a folder -> its files (not subfolders), sorted by name."""
    if not path.exists():
        raise InputError(f"--input {path}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if not p.is_dir())
        if not files:
            raise InputError(f"--input {path}: the folder holds no files")
        return files
    return [path]


def check_outputs(inputs: Sequence[Path], output: Path, rle: bool) -> None:
    """Refuse before any work what the reference would fail on halfway: two inputs with one stem,
    or a mask folder that already exists (JSON files are overwritten, as the reference does)."""
    stems: dict[str, Path] = {}
    for path in inputs:
        if path.stem in stems:
            raise InputError(f"{stems[path.stem]} and {path} would both write {output / path.stem}")
        stems[path.stem] = path
        if not rle and (output / path.stem).exists():
            raise InputError(f"{output / path.stem} already exists; remove it or choose another --output")


def check_model_type(config, model_type: str | None, checkpoint: str) -> None:
    """Raise InputError when `--model-type` names another architecture than the checkpoint's."""
    if model_type is None:
        return
    from ovseg_jax.models.sam import SamConfig  # noqa: PLC0415

    name = "vit_h" if model_type == "default" else model_type
    expected = getattr(SamConfig, name)()
    fields = ("encoder_width", "encoder_depth", "encoder_heads", "global_attn_indexes")
    if any(getattr(config, f) != getattr(expected, f) for f in fields):
        found = ", ".join(f"{f}={getattr(config, f)}" for f in fields)
        raise InputError(f"--checkpoint {checkpoint} is not {model_type} ({found}); omit --model-type to use it as is")


def write_masks_to_folder(records: list[dict[str, Any]], folder: Path) -> None:
    """`<i>.png` (8-bit, 255 inside the mask) per record and `metadata.csv`, as the reference writes them."""
    folder.mkdir(parents=True)
    rows = [METADATA_HEADER]
    for i, record in enumerate(records):
        Image.fromarray(record["segmentation"].astype(np.uint8) * 255).save(folder / f"{i}.png")
        values = [i, record["area"], *record["bbox"], *record["point_coords"][0], record["predicted_iou"],
                  record["stability_score"], *record["crop_box"]]
        rows.append(",".join(str(v) for v in values))
    (folder / "metadata.csv").write_text("\n".join(rows))


def run(args: argparse.Namespace) -> int:
    """The command -> the number of images written."""
    import jax.numpy as jnp  # noqa: PLC0415

    import ovseg_jax.sam  # noqa: PLC0415
    from ovseg_jax.data.sources import BadExampleError, read_image  # noqa: PLC0415
    from ovseg_jax.inference.amg import AutomaticMaskGenerator  # noqa: PLC0415

    inputs = list_inputs(Path(args.input))
    output = Path(args.output)
    check_outputs(inputs, output, args.convert_to_rle)
    print("Loading model...")
    try:
        sam = ovseg_jax.sam.load(args.checkpoint, dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    except (ovseg_jax.sam.CheckpointError, FileNotFoundError) as e:
        raise InputError(str(e).splitlines()[0]) from None
    check_model_type(sam.config, args.model_type, args.checkpoint)
    try:
        generator = AutomaticMaskGenerator(sam, output_mode="coco_rle" if args.convert_to_rle else "binary_mask",
                                           **amg_kwargs(args))
    except ValueError as e:
        raise InputError(str(e)) from None
    output.mkdir(parents=True, exist_ok=True)
    written = 0
    for path in inputs:
        try:
            image = read_image(path)
        except BadExampleError as e:
            print(f"Could not load '{path}' as an image, skipping ({e})", file=sys.stderr)
            continue
        start = time.perf_counter()
        records = generator.generate(image)
        if args.convert_to_rle:
            (output / f"{path.stem}.json").write_text(json.dumps(records))
        else:
            write_masks_to_folder(records, output / path.stem)
        written += 1
        print(f"Processed '{path}': {len(records)} masks in {time.perf_counter() - start:.2f} s")
    print("Done!")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ovseg_jax.amg ...` -> exit status (0 ok, 2 bad input, 1 when no image could be read)."""
    from ovseg_jax.utils.host_memory import keep_freed_memory  # noqa: PLC0415

    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    try:
        written = run(args)
    except InputError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
