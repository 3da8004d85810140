"""Self-contained demo of OVSeg's CLIP branch: `python -m ovseg_jax.demo --out outputs/demo`.

Nothing can be downloaded here, so the demo builds everything it needs:
1. a tiny random transformers CLIP (`CLIPModel.save_pretrained`) with a word-level tokenizer,
   i.e. a checkpoint directory exactly like a user's HF CLIP folder;
2. loads it through `ovseg_jax.clip.load` with mask prompts of depth 2 (mask prompt tuning);
3. draws a scene with a few coloured shapes and uses their masks as mask proposals;
4. crops every proposal as OVSeg does (box, mean fill, CLIP normalisation, bicubic resize),
   encodes the crops with their region masks and classifies them against the template-ensembled
   text embeddings of an open vocabulary (`100 * f . T^T`, softmax);
5. prints the table and writes `predictions.json`, `scene.png`, `crops.png` and the checkpoint.

The CLIP weights are random, so the predicted classes are arbitrary: the demo exercises the real
loading, cropping, mask-prompted encoding and template-ensemble code paths end to end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

import ovseg_jax.clip as oclip
from ovseg_jax.masked_crops import CLIP_MEAN, CLIP_STD, masked_crops
from ovseg_jax.text import VILD_TEMPLATES, Tokenizer, write_word_vocab

CLASS_NAMES = ["red circle", "green square", "blue triangle", "yellow sky", "grass"]
SCENE_SIZE = 128
CROP_SIZE = 64  # the tiny CLIP's input resolution (224 for real ViT-B/16 and ViT-L/14)


def build_checkpoint(directory: Path, seed: int) -> Path:
    """Write a random tiny transformers CLIP + tokenizer to `directory` (a user-style HF folder)."""
    import torch  # optional dependency: only needed to create the demo checkpoint
    from transformers import CLIPConfig, CLIPModel

    words = sorted({w for t in VILD_TEMPLATES for w in t.replace("{}", " ").replace(".", " ").split()}
                   | {w for name in CLASS_NAMES for w in name.split()})
    write_word_vocab(words, directory)
    tok = Tokenizer.from_dir(directory, context_length=16)
    config = CLIPConfig(
        projection_dim=32,
        vision_config=dict(image_size=CROP_SIZE, patch_size=8, hidden_size=64, intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=4),
        text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=16, vocab_size=tok.vocab_size, eos_token_id=tok.eot_token_id,
                         bos_token_id=tok.sot_token_id, pad_token_id=tok.eot_token_id))
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(directory)
    tok.save(directory)
    return directory


def draw_scene(seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """`[S, S, 3]` uint8 scene, `[Q, S, S]` float32 proposal masks and their true names."""
    rs = np.random.RandomState(seed)
    s = SCENE_SIZE
    yy, xx = np.mgrid[:s, :s]
    image = np.empty((s, s, 3), np.uint8)
    image[: s // 3] = (230, 210, 40)  # sky band
    image[s // 3:] = (60, 150, 60)  # grass
    image = np.clip(image + rs.randint(-12, 12, image.shape), 0, 255).astype(np.uint8)
    circle = (yy - 80) ** 2 + (xx - 35) ** 2 < 18 ** 2
    square = (abs(yy - 70) < 15) & (abs(xx - 95) < 15)
    triangle = (yy > 20) & (yy < 52) & (abs(xx - 64) < (yy - 20) * 0.6)
    shapes = {"red circle": (circle, (220, 30, 30)), "green square": (square, (30, 200, 60)),
              "blue triangle": (triangle, (40, 60, 220))}
    for mask, colour in shapes.values():
        image[mask] = colour
    sky = (yy < s // 3) & ~triangle
    masks = [m for m, _ in shapes.values()] + [sky, np.zeros_like(sky)]  # the last one is empty
    names = list(shapes) + ["yellow sky", "(empty proposal)"]
    return image, np.stack(masks).astype(np.float32), names


def montage(crops: np.ndarray) -> np.ndarray:
    """`[Q, S, S, 3]` CLIP-normalised crops -> `[S, Q*S, 3]` uint8 strip."""
    rgb = crops * np.asarray(CLIP_STD) + np.asarray(CLIP_MEAN)
    return (np.clip(np.concatenate(list(rgb), axis=1), 0, 1) * 255).astype(np.uint8)


def run(out: Path, seed: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt = build_checkpoint(out / "clip_checkpoint", seed)
    clip = oclip.load(ckpt, mask_prompt_depth=2)
    print(f"loaded {ckpt} (ViT {clip.config.image_size}px/{clip.config.patch_size}, width "
          f"{clip.config.vision_width}, mask prompts depth {clip.config.mask_prompt_depth}) "
          f"on {jax.devices()[0].platform}")

    image, proposals, true_names = draw_scene(seed)
    crops = masked_crops(jnp.asarray(image, jnp.float32), jnp.asarray(proposals), threshold=0.4,
                         size=CROP_SIZE)
    features = clip.encode_image(crops.images, crops.region_masks)  # [Q, D]
    text = clip.class_embeddings(CLASS_NAMES)  # [C, D], 14 ViLD templates
    probs = np.asarray(jax.nn.softmax(100.0 * features @ text.T, axis=-1))
    valid = np.asarray(crops.valid)

    rows = []
    header = f"{'proposal':<18} {'pixels':>6} {'valid':>5}  {'predicted':<14} {'prob':>5}"
    print(header + "\n" + "-" * len(header))
    for q, name in enumerate(true_names):
        best = int(probs[q].argmax())
        row = {"proposal": name, "pixels": int(proposals[q].sum()), "valid": bool(valid[q]),
               "predicted": CLASS_NAMES[best] if valid[q] else None,
               "probabilities": {c: float(p) for c, p in zip(CLASS_NAMES, probs[q])} if valid[q] else None}
        rows.append(row)
        pred = f"{row['predicted']:<14} {probs[q, best]:5.2f}" if valid[q] else "-"
        print(f"{name:<18} {row['pixels']:>6} {str(row['valid']):>5}  {pred}")
    print("(random CLIP weights: the predicted classes are arbitrary; see README for real checkpoints)")

    Image.fromarray(image).save(out / "scene.png")
    Image.fromarray(montage(np.asarray(crops.images)[valid])).save(out / "crops.png")
    result = {"checkpoint": str(ckpt), "classes": CLASS_NAMES, "templates": list(VILD_TEMPLATES),
              "proposals": rows, "seconds": round(time.perf_counter() - t0, 2)}
    (out / "predictions.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'predictions.json'}, scene.png, crops.png in {result['seconds']} s")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(args.out, args.seed)


if __name__ == "__main__":
    main()
