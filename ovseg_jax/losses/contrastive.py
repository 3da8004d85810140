"""Symmetric CLIP InfoNCE over the global batch (reference 4.2).

Under `jax.jit` on batch-sharded global arrays, the `[B, B]` logits span the whole global batch,
so every other text/image on every device is a negative (XLA inserts the all-gather). This is
the loss open_clip computes on each GPU after gathering features; its DDP gradient is this
gradient divided by the world size, a constant factor Adam does not see (up to its epsilon).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MAX_LOGIT_SCALE = math.log(100.0)


def clip_contrastive_loss(image_features: jax.Array, text_features: jax.Array,
                          logit_scale: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`image_features [B, D]`, `text_features [B, D]` (unnormalised; row i of each is a pair),
    `logit_scale` (log of the temperature multiplier) -> (loss, metrics).

    loss = mean of the image->text and text->image cross-entropies of `exp(logit_scale) *
    img_n @ txt_n.T` with the diagonal as targets. Repeated texts are not de-duplicated.
    """
    img = image_features.astype(jnp.float32)
    txt = text_features.astype(jnp.float32)
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    scale = jnp.exp(logit_scale.astype(jnp.float32))
    logits = scale * img @ txt.T  # [B, B]: images x texts
    diag = jnp.diagonal(logits)
    loss_i2t = jnp.mean(jax.nn.logsumexp(logits, axis=1) - diag)
    loss_t2i = jnp.mean(jax.nn.logsumexp(logits, axis=0) - diag)
    loss = 0.5 * (loss_i2t + loss_t2i)
    labels = jnp.arange(logits.shape[0])
    metrics = {
        "loss_i2t": loss_i2t,
        "loss_t2i": loss_t2i,
        "acc_i2t": jnp.mean(jnp.argmax(logits, axis=1) == labels),
        "acc_t2i": jnp.mean(jnp.argmax(logits, axis=0) == labels),
        "logit_scale": scale,
    }
    return loss, metrics


def clamp_logit_scale(logit_scale: jax.Array) -> jax.Array:
    """open_clip's post-step clamp of the log scale to `[0, ln 100]`."""
    return jnp.clip(logit_scale, 0.0, MAX_LOGIT_SCALE)
