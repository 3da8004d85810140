"""The `segment_anything` reference for tests, importable without torchvision.

`segment-anything` 1.0 (installed with `pip install --no-deps segment-anything`) imports four
torchvision functions; torchvision's C operators do not load with the CPU torch on this project's
machines, and the package is not installed. `import_segment_anything()` puts a pure-torch
stand-in for exactly those functions into `sys.modules` (only when torchvision is absent or
broken) and imports the package:

- `torchvision.ops.boxes.box_area(boxes [N, 4] XYXY) -> [N]`;
- `torchvision.ops.boxes.batched_nms(boxes, scores, idxs, iou_threshold) -> kept indices`, sorted
  by decreasing score (greedy NMS per category; a box is suppressed when its IoU with a kept
  higher-scoring box of its category is > the threshold, as torchvision's kernel does);
- `torchvision.transforms.functional.to_pil_image(uint8 HWC ndarray) -> PIL.Image`;
- `torchvision.transforms.functional.resize(PIL image, [h, w])`: PIL's bilinear resize, which is
  what torchvision does for PIL inputs.

`tiny_sam(...)` builds a small random `segment_anything.modeling.Sam` whose parameters are all
non-trivial (the reference initialises `pos_embed` and the relative position tables to zeros).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
from functools import partial

import numpy as np


def _box_area(boxes):
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _nms(boxes, scores, iou_threshold: float):
    import torch

    order = torch.sort(scores, descending=True, stable=True).indices
    boxes = boxes[order]
    area = _box_area(boxes)
    top_left = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    iou = inter / (area[:, None] + area[None, :] - inter)
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i].double() > iou_threshold  # float32 IoU vs the float64 threshold, as torchvision's kernel
    return order[torch.tensor(keep, dtype=torch.long)]


def _batched_nms(boxes, scores, idxs, iou_threshold: float):
    import torch

    kept = [torch.nonzero(idxs == c).flatten()[_nms(boxes[idxs == c], scores[idxs == c], iou_threshold)]
            for c in torch.unique(idxs)]
    if not kept:
        return torch.zeros(0, dtype=torch.long)
    keep = torch.cat(kept)
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def _to_pil_image(image):
    from PIL import Image

    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3:
        raise TypeError(f"stand-in to_pil_image takes uint8 HWC arrays; got {array.dtype} {array.shape}")
    return Image.fromarray(array)


def _resize(image, size):
    from PIL import Image

    h, w = size
    return image.resize((w, h), Image.BILINEAR)


def install_torchvision_stand_in() -> None:
    """Register the stand-in modules unless a working torchvision is importable.

    Only the two leaf modules segment_anything imports from are registered (with module specs);
    `sys.modules["torchvision"]` is set to None, which `from torchvision.ops.boxes import ...`
    never looks at but `importlib.util.find_spec("torchvision")` reads as "not installed", so
    transformers (which probes for torchvision) keeps behaving as it does without it."""
    if getattr(sys.modules.get("torchvision.ops.boxes"), "__stand_in__", False):
        return
    try:
        import torchvision.ops  # noqa: F401

        return
    except Exception:  # absent, or its C operators do not load
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    boxes = types.ModuleType("torchvision.ops.boxes")
    boxes.box_area, boxes.batched_nms = _box_area, _batched_nms
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.resize, functional.to_pil_image = _resize, _to_pil_image
    for module in (boxes, functional):
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
        module.__stand_in__ = True
        sys.modules[module.__name__] = module
    sys.modules["torchvision"] = None


def import_segment_anything():
    """`segment_anything`, imported with the torchvision stand-in if needed."""
    install_torchvision_stand_in()
    return importlib.import_module("segment_anything")


def randomize_(module, seed: int = 0, scale: float = 0.5) -> None:
    """Overwrite every parameter and buffer of a torch module with N(0, scale^2) draws (norm
    weights around 1), so that no output depends on a zero initialisation."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator) * scale
            is_norm_weight = tensor.ndim == 1 and ("norm" in name or "neck.1" in name or "neck.3" in name
                                                   or name.endswith(("downscaling.1.weight", "downscaling.4.weight",
                                                                     "upscaling.1.weight")))
            tensor.copy_(1.0 + noise if is_norm_weight and name.endswith("weight") else noise)


def tiny_sam(*, image_size: int = 128, patch_size: int = 16, embed_dim: int = 32, depth: int = 4,
             num_heads: int = 2, global_attn_indexes=(1, 3), window_size: int = 3, prompt_embed_dim: int = 32,
             mask_in_chans: int = 8, decoder_heads: int = 8, decoder_mlp_dim: int = 64, seed: int = 0):
    """A small random `segment_anything.modeling.Sam` in eval mode (float32), built as
    `segment_anything.build_sam._build_sam` builds the released models, at a small size. The
    defaults: an 8 x 8 token grid with 3 x 3 windows (padded to 9 x 9) in blocks 0 and 2 and
    global attention in blocks 1 and 3; 8 decoder heads, as released (the head count is not in
    the state dict's shapes)."""
    import torch

    sa = import_segment_anything()
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    grid = image_size // patch_size
    model = Sam(
        image_encoder=ImageEncoderViT(
            depth=depth, embed_dim=embed_dim, img_size=image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=num_heads, patch_size=patch_size,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=tuple(global_attn_indexes),
            window_size=window_size, out_chans=prompt_embed_dim),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim, image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size), mask_in_chans=mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_embed_dim, mlp_dim=decoder_mlp_dim,
                                          num_heads=decoder_heads),
            transformer_dim=prompt_embed_dim, iou_head_depth=3, iou_head_hidden_dim=prompt_embed_dim),
    )
    del sa
    randomize_(model.image_encoder, seed + 1, scale=0.3)
    randomize_(model.prompt_encoder, seed + 2, scale=0.5)
    randomize_(model.mask_decoder, seed + 3, scale=0.3)
    return model.eval()
