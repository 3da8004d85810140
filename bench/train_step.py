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
the same architecture doing the same step (`--dtype bfloat16`: under `torch.autocast`). Prints the
first (compiling) step's time, steps/s (from `--iters` rounds in which the two implementations
take turns, half of them in each order, so that a shared machine's load hits both alike, each half
after `--warmup` untimed rounds), examples/s, the step's FLOPs per device (XLA's cost analysis of
the compiled, partitioned step; loop bodies counted once), achieved TFLOP/s per device and, where
the device's dense bf16 peak is known, model FLOPs utilisation against it.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import jax
import numpy as np

from ovseg_jax import configs
from ovseg_jax.models.clip import ClipConfig
from ovseg_jax.training.trainer import Trainer

from common import environment_lines, interleaved, record  # bench/common.py

# Dense bf16 peak TFLOP/s per device, by `device_kind` prefix (first match wins: specific kinds first).
PEAK_TFLOPS = {"NVIDIA H100 PCIe": 756.0, "NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0,
               "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
               "TPU v6": 918.0}


def peak_tflops(device) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if device.device_kind.startswith(k)), None)


def random_batch(preset: ClipConfig, batch: int) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(0)
    ids = rs.randint(1, preset.eot_token_id, (batch, preset.context_length)).astype(np.int32)
    ids[:, 10] = preset.eot_token_id
    return {"image": rs.randn(batch, preset.image_size, preset.image_size, 3).astype(np.float32), "token_ids": ids}


def clip_step_jax(preset: ClipConfig, batch: dict, dtype: str):
    config = configs.clip_finetune(preset, total_steps=10_000, batch_size=len(batch["image"]))
    return trainer_step(config, batch, dtype)


def trainer_step(config, batch: dict, dtype: str, trainer: Trainer | None = None):
    """The trainer's step on `batch` in `dtype` -> (step function, FLOPs per device and step from
    XLA's cost analysis of the compiled step, seconds of tracing + compiling). Each call of the
    function runs one step on the state the previous call left (the trainer donates it). `trainer`:
    one already built from `config` with `dtype`."""
    config.dtype = dtype
    trainer = trainer or Trainer(config)
    gbatch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in batch.items()}
    t0 = time.perf_counter()
    compiled = trainer.train_step.lower(trainer.state, gbatch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    state = [trainer.state]

    def step():
        state[0], metrics = compiled(state[0], gbatch)
        return metrics

    return step, flops, compile_s


def clip_step_torch(preset: ClipConfig, batch: dict, dtype: str):
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

    return step


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


def segmenter_config(batch_size: int, workdir: str):
    """The Swin-B segmenter recipe's config (171 classes, a tiny frozen CLIP written to `workdir` for
    the text bank), at `batch_size`."""
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
                                        total_steps=120_000, batch_size=batch_size)
    return config


def segmenter_step_jax(batch: dict, dtype: str, workdir: str):
    return trainer_step(segmenter_config(len(batch["image"]), workdir), batch, dtype)


def segmenter_step_torch(batch: dict, dtype: str):
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
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step():
        with autocast:
            loss = model(pixel_values=pixels, mask_labels=mask_labels, class_labels=class_labels,
                         output_hidden_states=True).loss  # the decoder states feed the auxiliary losses
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        opt.step()
        return loss

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["vit_b16", "vit_l14", "swin_b"], default="vit_b16",
                        help="CLIP fine-tuning step (ViT) or segmenter step (swin_b)")
    parser.add_argument("--size", type=int, default=640, help="segmenter crop size")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3, help="timed rounds (each implementation once per round)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed rounds before the timed ones (in each order)")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers reference")
    parser.add_argument("--record", help="append the comparison as a JSON line here (make bench)")
    args = parser.parse_args()

    device = jax.devices()[0]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "swin_b":
            batch = segmenter_batch(args.batch, args.size)
            jax_step, flops, compile_s = segmenter_step_jax(batch, args.dtype, tmp)
            steps = {"ovseg_jax": jax_step}
            if not args.no_torch:
                steps["transformers (torch)"] = segmenter_step_torch(batch, args.dtype)
            what = f"segmenter Swin-B {args.size}x{args.size} training step"
        else:
            preset: ClipConfig = getattr(ClipConfig, args.model)()
            batch = random_batch(preset, args.batch)
            jax_step, flops, compile_s = clip_step_jax(preset, batch, args.dtype)
            steps = {"ovseg_jax": jax_step}
            if not args.no_torch:
                steps["transformers (torch)"] = clip_step_torch(preset, batch, args.dtype)
            what = f"CLIP {args.model} fine-tuning step"
        # Half the rounds in each order: on the shared 2-core machine the order of the implementations
        # within a round moved the figures (up to 1.5x for identical steps).
        # Warm-up rounds: the first steps of a process grow its heap (page faults, slow on virtual
        # machines) and fragment it when torch allocates in between; a training loop runs in steady state.
        times = interleaved(steps, (args.iters + 1) // 2, warmup=args.warmup)
        if len(steps) > 1 and args.iters > 1:
            reverse = interleaved(dict(reversed(steps.items())), args.iters // 2, warmup=args.warmup)
            times = {k: (times[k][0], times[k][1], (times[k][2] + reverse[k][2]) / 2) for k in times}
    peak = peak_tflops(device)
    print("\n".join(environment_lines()))
    print(f"\n{what}, batch {args.batch}, {args.dtype}, {jax.device_count()} x {device.device_kind}; "
          f"{flops / 1e9:.1f} GFLOP/step per device (XLA); {args.iters} interleaved rounds")
    print(f"{'implementation':24s} {'first step s':>12s} {'steps/s':>9s} {'examples/s':>11s} "
          f"{'TFLOP/s':>8s} {'MFU':>6s}")
    times["ovseg_jax"] = (compile_s + times["ovseg_jax"][0], *times["ovseg_jax"][1:])  # compiled ahead
    for name, (first, _, step_s) in times.items():
        tflops = flops / step_s / 1e12  # per device: the cost analysis is of the partitioned step
        mfu = f"{100 * tflops / peak:5.1f}%" if peak else "  n/a"
        print(f"{name:24s} {first:12.2f} {1 / step_s:9.3f} {args.batch / step_s:11.2f} {tflops:8.3f} {mfu:>6s}")
    if len(times) == 2:
        (_, _, ours), (_, _, theirs) = times.values()
        print(f"ovseg_jax / torch steps/s ratio: {theirs / ours:.2f}")
        reference = "torch autocast bfloat16" if args.dtype == "bfloat16" else "transformers float32"
        record(args.record, f"{what}, batch {args.batch}, {args.dtype}", f"{1 / ours:.3f} steps/s",
               f"{reference} {1 / theirs:.3f} steps/s", theirs / ours, unit="steps/s", rounds=args.iters)
    if peak:
        print(f"MFU: of the device's dense bf16 peak, {peak:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
