"""Training-step throughput: the CLIP fine-tuning step (reference 4.2) and the segmenter step
(reference 3) of ovseg_jax vs transformers (torch).

    .venv/bin/python bench/train_step.py                          # ViT-B/16, batch 8
    .venv/bin/python bench/train_step.py --model vit_l14 --batch 4 --dtype bfloat16
    .venv/bin/python bench/train_step.py --model swin_b --batch 2  # segmenter, 640 crops

The segmenter step (Swin-B + 6-layer decoder, 100 queries, 171-class text bank, 20 ground-truth
masks per image, Hungarian matching and deep-supervised losses on device) is compared with
transformers' `MaskFormerForInstanceSegmentation` of the same architecture computing its own
matching (scipy) and loss, AdamW step included.

Random weights, full-size towers (text tower frozen, visual + logit_scale trained with AdamW,
symmetric contrastive loss over the batch). The torch reference is transformers' `CLIPModel` of
the same architecture doing the same step. Prints compile time, steps/s, examples/s, the step's
FLOPs (XLA cost analysis), achieved TFLOP/s and, where the device's peak is known, model FLOPs
utilisation. Timings exclude the first (compiling) step and block on the result of every step.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import numpy as np

from ovseg_jax import configs
from ovseg_jax.models.clip import ClipConfig
from ovseg_jax.train import Trainer

from common import timed  # bench/common.py

# Dense bf16 peak TFLOP/s per device, by `device_kind` prefix.
PEAK_TFLOPS = {"NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0, "TPU v4": 275.0,
               "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6": 918.0}


def peak_tflops(device) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if device.device_kind.startswith(k)), None)


def random_batch(preset: ClipConfig, batch: int) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(0)
    ids = rs.randint(1, preset.eot_token_id, (batch, preset.context_length)).astype(np.int32)
    ids[:, 10] = preset.eot_token_id
    return {"image": rs.randn(batch, preset.image_size, preset.image_size, 3).astype(np.float32), "token_ids": ids}


def bench_jax(preset: ClipConfig, batch: dict, dtype: str, iters: int) -> dict:
    config = configs.clip_finetune(preset, total_steps=10_000, batch_size=len(batch["image"]))
    return _time_trainer(config, batch, dtype, iters)


def _time_trainer(config, batch: dict, dtype: str, iters: int) -> dict:
    """Compile the trainer's step for `batch`, then time `iters` steps -> first_s, step_s, flops."""
    config.dtype = dtype
    trainer = Trainer(config)
    gbatch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in batch.items()}
    compiled = trainer.train_step.lower(trainer.state, gbatch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    state = trainer.state
    t0 = time.perf_counter()
    state, metrics = trainer.train_step(state, gbatch)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        state, metrics = trainer.train_step(state, gbatch)
        jax.block_until_ready(metrics)
    return {"first_s": first, "step_s": (time.perf_counter() - t0) / iters, "flops": flops}


def bench_torch(preset: ClipConfig, batch: dict, dtype: str, iters: int) -> dict:
    import torch  # noqa: PLC0415
    from transformers import CLIPConfig, CLIPModel  # noqa: PLC0415

    from ovseg_jax.convert.clip_keys import hf_config_dict  # noqa: PLC0415

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(**hf_config_dict(preset))).train()
    trained = []
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(("vision_model.", "visual_projection.")) or name == "logit_scale"
        if p.requires_grad:
            trained.append(p)
    opt = torch.optim.AdamW(trained, lr=5e-6, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    pixels = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
    ids = torch.from_numpy(batch["token_ids"]).long()
    labels = torch.arange(len(ids))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step():
        with autocast:
            img = model.get_image_features(pixel_values=pixels)
            txt = model.get_text_features(input_ids=ids)
        img = getattr(img, "pooler_output", img).float()
        txt = getattr(txt, "pooler_output", txt).float()
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        logits = model.logit_scale.exp() * img @ txt.T
        loss = (torch.nn.functional.cross_entropy(logits, labels)
                + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss

    first, step_s = timed(step, iters)
    return {"first_s": first, "step_s": step_s}


SEG_CLASSES, SEG_MASKS = 171, 20


def segmenter_batch(batch: int, size: int) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(0)
    masks = np.zeros((batch, SEG_MASKS, size, size), np.uint8)
    labels = rs.randint(0, SEG_MASKS, (batch, size // 16, size // 16)).repeat(16, 1).repeat(16, 2)
    for g in range(SEG_MASKS):
        masks[:, g] = labels == g
    classes = np.stack([rs.choice(SEG_CLASSES, SEG_MASKS, replace=False) for _ in range(batch)]).astype(np.int32)
    return {"image": rs.randint(0, 256, (batch, size, size, 3)).astype(np.uint8), "masks": masks,
            "classes": classes, "valid": masks.any(axis=(2, 3))}


def bench_segmenter_jax(batch: dict, dtype: str, iters: int, workdir: str) -> dict:
    from transformers import CLIPConfig, CLIPModel  # noqa: PLC0415

    from ovseg_jax.models.maskformer import SegmenterConfig  # noqa: PLC0415
    from ovseg_jax.text import Tokenizer, write_word_vocab  # noqa: PLC0415

    names = [f"class{i}" for i in range(SEG_CLASSES)]
    words = sorted(set(names) | {w for t in ("a photo of a {}. this is there is the in scene small medium "
                                              "large",) for w in t.replace("{}", "").replace(".", "").split()})
    write_word_vocab(words, workdir)
    tok = Tokenizer.from_dir(workdir, context_length=16)
    clip = CLIPModel(CLIPConfig(projection_dim=768, vision_config=dict(image_size=32, patch_size=16, hidden_size=64,
                                                                       num_hidden_layers=1, num_attention_heads=1,
                                                                       intermediate_size=64),
                                text_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                                                 intermediate_size=64, max_position_embeddings=16,
                                                 vocab_size=tok.vocab_size, eos_token_id=tok.eot_token_id,
                                                 bos_token_id=tok.sot_token_id, pad_token_id=tok.eot_token_id)))
    clip.save_pretrained(workdir)
    tok.save(workdir)
    config = configs.segmenter_training(SegmenterConfig.swin_b().to_dict(), clip_init=workdir,
                                        class_names=names, lr=6e-5, weight_decay=0.01, backbone_lr_mult=1.0,
                                        total_steps=120_000, batch_size=len(batch["image"]))
    return _time_trainer(config, batch, dtype, iters)


def bench_segmenter_torch(batch: dict, iters: int) -> dict:
    import torch  # noqa: PLC0415
    from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, SwinConfig  # noqa: PLC0415

    swin = SwinConfig(image_size=384, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12,
                      drop_path_rate=0.3, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = MaskFormerConfig(backbone_config=swin, fpn_feature_size=256, mask_feature_size=256,
                              num_labels=SEG_CLASSES, use_auxiliary_loss=True, decoder_config=dict(
                                  model_type="detr", encoder_layers=0, d_model=256, decoder_layers=6,
                                  decoder_ffn_dim=2048, decoder_attention_heads=8, num_queries=100))
    torch.manual_seed(0)
    model = MaskFormerForInstanceSegmentation(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01)
    mean = torch.tensor([123.675, 116.28, 103.53]).reshape(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).reshape(1, 3, 1, 1)
    pixels = (torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).float() - mean) / std
    mask_labels = [torch.from_numpy(m[v]).float() for m, v in zip(batch["masks"], batch["valid"])]
    class_labels = [torch.from_numpy(c[v]).long() for c, v in zip(batch["classes"], batch["valid"])]

    def step():
        loss = model(pixel_values=pixels, mask_labels=mask_labels, class_labels=class_labels,
                     output_hidden_states=True).loss  # the decoder states feed the auxiliary losses
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        opt.step()
        return loss

    first, step_s = timed(step, iters)
    return {"first_s": first, "step_s": step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["vit_b16", "vit_l14", "swin_b"], default="vit_b16",
                        help="CLIP fine-tuning step (ViT) or segmenter step (swin_b)")
    parser.add_argument("--size", type=int, default=640, help="segmenter crop size")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers reference")
    args = parser.parse_args()

    device = jax.devices()[0]
    if args.model == "swin_b":
        import tempfile  # noqa: PLC0415

        batch = segmenter_batch(args.batch, args.size)
        with tempfile.TemporaryDirectory() as tmp:
            rows = [("ovseg_jax", bench_segmenter_jax(batch, args.dtype, args.iters, tmp))]
        if not args.no_torch:
            rows.append(("transformers (torch)", bench_segmenter_torch(batch, args.iters)))
        what = f"segmenter Swin-B {args.size}x{args.size} training step"
    else:
        preset: ClipConfig = getattr(ClipConfig, args.model)()
        batch = random_batch(preset, args.batch)
        rows = [("ovseg_jax", bench_jax(preset, batch, args.dtype, args.iters))]
        if not args.no_torch:
            rows.append(("transformers (torch)", bench_torch(preset, batch, args.dtype, args.iters)))
        what = f"CLIP {args.model} fine-tuning step"
    peak = peak_tflops(device)
    flops = rows[0][1]["flops"]
    print(f"\n{what}, batch {args.batch}, {args.dtype}, "
          f"{jax.device_count()} x {device.device_kind}; {flops / 1e9:.1f} GFLOP/step (XLA)")
    print(f"{'implementation':24s} {'first step s':>12s} {'steps/s':>9s} {'examples/s':>11s} "
          f"{'TFLOP/s':>8s} {'MFU':>6s}")
    for name, r in rows:
        tflops = flops / r["step_s"] / 1e12 / jax.device_count()
        mfu = f"{100 * tflops / peak:5.1f}%" if peak else "  n/a"
        print(f"{name:24s} {r['first_s']:12.2f} {1 / r['step_s']:9.3f} {args.batch / r['step_s']:11.2f} "
              f"{tflops:8.3f} {mfu:>6s}")
    if len(rows) == 2:
        print(f"ovseg_jax / torch steps/s ratio: {rows[1][1]['step_s'] / rows[0][1]['step_s']:.2f}")


if __name__ == "__main__":
    main()
