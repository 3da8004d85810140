"""An independent PyTorch CLIP in OpenAI's layout with OVSeg's mask prompts (reference 1.9).

Written from the reference text for tests only: its `state_dict()` has OpenAI key names, so it
produces OpenAI / OVSeg / open_clip files, and its forward is the ground truth for ours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_2 = nn.LayerNorm(width)
        self.causal = causal

    def forward(self, x):  # [L, N, W]
        mask = None
        if self.causal:
            n = x.shape[0]
            mask = torch.full((n, n), float("-inf")).triu(1)
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, causal: bool = False):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, causal) for _ in range(layers)])


class VisionTransformer(nn.Module):
    def __init__(self, resolution, patch, width, layers, heads, output_dim, mask_depth=0, shared=False):
        super().__init__()
        self.patch = patch
        grid = resolution // patch
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.mask_depth = mask_depth
        if mask_depth:
            self.mask_embedding = nn.Parameter(torch.randn(mask_depth, 1 if shared else grid * grid, width))

    def forward(self, x, mask=None):  # x [N, 3, H, W], mask [N, 1, H, W] of 0/1
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [N, P, W]
        if self.mask_depth and mask is not None:
            m = F.avg_pool2d(mask, kernel_size=self.patch, stride=self.patch)
            m = torch.ceil(m.reshape(m.shape[0], -1)).unsqueeze(-1)  # [N, P, 1]
            x = x * m + self.mask_embedding[0] * (1 - m)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)  # [L, N, W]
        for i, block in enumerate(self.transformer.resblocks):
            x = block(x)
            if self.mask_depth and mask is not None and i + 1 < self.mask_depth:
                mm = m.permute(1, 0, 2)  # [P, N, 1]
                x = torch.cat([x[:1], x[1:] * mm + self.mask_embedding[i + 1].unsqueeze(1) * (1 - mm)], dim=0)
        x = self.ln_post(x.permute(1, 0, 2)[:, 0])
        return x @ self.proj


class OpenAIClip(nn.Module):
    def __init__(self, embed_dim=16, resolution=32, patch=8, vision_width=64, vision_layers=2,
                 context=12, vocab=60, text_width=64, text_layers=1, mask_depth=0, shared=False):
        super().__init__()
        self.visual = VisionTransformer(resolution, patch, vision_width, vision_layers,
                                        vision_width // 64, embed_dim, mask_depth, shared)
        self.transformer = Transformer(text_width, text_layers, text_width // 64, causal=True)
        self.token_embedding = nn.Embedding(vocab, text_width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context, text_width))
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(text_width**-0.5 * torch.randn(text_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        # Randomise norms and biases too, so that a mis-mapped parameter cannot go unnoticed.
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias") or ".ln" in name or name.startswith("ln_"):
                    p.add_(0.1 * torch.randn_like(p))

    def encode_image(self, images_nchw, masks=None):
        return self.visual(images_nchw, masks)

    def encode_text(self, ids):  # [N, L] int64; EOT = the largest id (argmax pooling)
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        x = self.transformer.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ self.text_projection
