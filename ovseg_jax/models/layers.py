"""Shared building blocks: attention in PyTorch's fused `in_proj` layout, MLPs, DropPath, and
`run_layers`, which applies a stack of identical blocks in a Python loop or a `jax.lax.scan`,
with optional rematerialisation (`REMAT`).

Conventions for every module in `ovseg_jax.models`:
- NHWC images, `[B, L, D]` token sequences.
- Parameters are float32 (`param_dtype`); `dtype` is the compute dtype (float32 or bfloat16).
- LayerNorm eps is 1e-5 everywhere (PyTorch's default; Flax's is 1e-6).
- Softmax and normalisation statistics run in float32 whatever the compute dtype.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

LN_EPS = 1e-5


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's activation, `x * sigmoid(1.702 x)`."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_exact(x: jax.Array) -> jax.Array:
    """PyTorch `nn.GELU()` (erf form; Flax's default is the tanh approximation)."""
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": gelu_exact,
    "relu": jax.nn.relu,
}


def activation(name: str):
    """Look an activation up by its PyTorch/transformers name."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


def layer_norm(dim: int, *, dtype, rngs: nnx.Rngs, eps: float = LN_EPS) -> nnx.LayerNorm:
    """LayerNorm with PyTorch's eps (1e-5 unless given) and float32 parameters."""
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def linear(din: int, dout: int, *, dtype, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    """Linear layer, kernel `[din, dout]` (the transpose of PyTorch's weight)."""
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """`[B, L, D] -> [B, L, heads, D / heads]`."""
    b, l, d = x.shape
    return x.reshape(b, l, num_heads, d // num_heads)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    num_heads: int,
    *,
    bias: jax.Array | None = None,
    is_causal: bool = False,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Multi-head scaled dot-product attention on already-projected inputs.

    q `[B, Lq, D]`, k/v `[B, Lk, D]` -> `[B, Lq, D]`. `bias` broadcasts to `[B, heads, Lq, Lk]`
    and is added to the logits (e.g. Swin's relative position bias + shift mask). Logits and
    softmax are computed in float32. Attention-weight dropout is applied only when
    `dropout_rate > 0` and a `dropout_rng` is given (training).
    """
    dtype = q.dtype
    qh, kh, vh = (split_heads(t, num_heads) for t in (q, k, v))
    head_dim = qh.shape[-1]
    if dropout_rate == 0.0 or dropout_rng is None:
        out = jax.nn.dot_product_attention(
            qh, kh, vh, bias=None if bias is None else bias.astype(dtype),
            scale=head_dim**-0.5, is_causal=is_causal,
        )
        return out.reshape(q.shape[:2] + (-1,))
    # Explicit path for attention dropout (not supported by jax.nn.dot_product_attention).
    logits = jnp.einsum("bqhd,bkhd->bhqk", qh * head_dim**-0.5, kh,
                        preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if is_causal:
        lq, lk = logits.shape[-2:]
        causal = jnp.tril(jnp.ones((lq, lk), bool))
        logits = jnp.where(causal, logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0).astype(dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, vh)
    return out.reshape(q.shape[:2] + (-1,))


class MultiHeadAttention(nnx.Module):
    """`torch.nn.MultiheadAttention` with a fused input projection.

    Parameters mirror PyTorch's names: `in_proj` (kernel `[D, 3D]` = columns [q | k | v], the
    transpose of `in_proj_weight`) and `out_proj`. Heads are contiguous slices of q, k, v.
    """

    def __init__(self, dim: int, num_heads: int, *, dtype=jnp.float32, dropout: float = 0.0,
                 rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.dim = dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj = linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
        self.out_proj = linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, is_causal: bool = False, bias: jax.Array | None = None,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
        """Self-attention: `[B, L, D] -> [B, L, D]`."""
        q, k, v = jnp.split(self.in_proj(x), 3, axis=-1)
        out = dot_product_attention(q, k, v, self.num_heads, bias=bias, is_causal=is_causal,
                                    dropout_rate=self.dropout, dropout_rng=dropout_rng)
        return self.out_proj(out)

    def attend(self, query: jax.Array, key: jax.Array, value: jax.Array, *,
               bias: jax.Array | None = None, dropout_rng: jax.Array | None = None) -> jax.Array:
        """General attention with distinct query/key/value inputs (e.g. DETR's `q = k = tgt + pos`,
        `v = tgt`): query `[B, Lq, D]`, key/value `[B, Lk, D]` -> `[B, Lq, D]`."""
        kernel = self.in_proj.kernel[...].astype(query.dtype)
        bias_qkv = self.in_proj.bias[...].astype(query.dtype)
        d = self.dim
        q = query @ kernel[:, :d] + bias_qkv[:d]
        k = key @ kernel[:, d:2 * d] + bias_qkv[d:2 * d]
        v = value @ kernel[:, 2 * d:] + bias_qkv[2 * d:]
        out = dot_product_attention(q, k, v, self.num_heads, bias=bias,
                                    dropout_rate=self.dropout, dropout_rng=dropout_rng)
        return self.out_proj(out)


class Mlp(nnx.Module):
    """Two-layer MLP `fc1 -> act -> fc2` with configurable parameter names.

    CLIP names the layers `c_fc` / `c_proj`; Swin `fc1` / `fc2`. Use `names` to mirror the
    checkpoint so converters stay name tables.
    """

    def __init__(self, dim: int, hidden: int, *, act: str, dtype=jnp.float32,
                 names: tuple[str, str] = ("fc1", "fc2"), rngs: nnx.Rngs):
        self.act = act
        self.names = names
        setattr(self, names[0], linear(dim, hidden, dtype=dtype, rngs=rngs))
        setattr(self, names[1], linear(hidden, dim, dtype=dtype, rngs=rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        fc1, fc2 = (getattr(self, n) for n in self.names)
        return fc2(activation(self.act)(fc1(x)))


def drop_path(x: jax.Array, rate: float | jax.Array, rng: jax.Array | None) -> jax.Array:
    """Stochastic depth: drop the whole residual branch per example. Identity when `rng` is None
    (or `rate` is the number 0). `rate` may be a traced scalar (a scanned per-block rate)."""
    if rng is None or (isinstance(rate, (int, float)) and rate == 0.0):
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


# ------------------------------------------------------------------ stacks of identical blocks

# Rematerialisation policies (`jax.checkpoint`) for each block of a stack:
# - "none": keep every activation the backward pass needs (fastest, most memory);
# - "block": keep only each block's input and recompute the block in the backward pass
#   (`nothing_saveable`; about one extra forward pass of compute);
# - "dots": keep the outputs of the weight matmuls (dots without batch dimensions) and recompute
#   the rest: norms, activations, attention logits and softmax (`dots_with_no_batch_dims_saveable`).
REMAT = ("none", "block", "dots")
_REMAT_POLICIES = {"block": jax.checkpoint_policies.nothing_saveable,
                   "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def check_stack_options(scan_layers: Any, remat: Any, where: str = "stack options") -> None:
    """Raise a ValueError naming `where` (e.g. "config.remat") unless `scan_layers` is a bool and
    `remat` one of `REMAT`."""
    if not isinstance(scan_layers, bool):
        raise ValueError(f"{where}: scan_layers must be true or false; got {scan_layers!r}")
    if remat not in REMAT:
        raise ValueError(f"{where}: remat must be one of {REMAT} (none: keep all activations; block: keep each "
                         "block's input and recompute the block for the gradient; dots: keep the weight matmuls' "
                         f"outputs, recompute the rest); got {remat!r}")


def run_layers(step: Callable[[Any, Any, Any], tuple[Any, Any]], blocks: Sequence[nnx.Module], carry: Any,
               per_layer: Any = None, *, scan: bool = False, remat: str = "none") -> tuple[Any, Any]:
    """Apply a stack of blocks: `carry, y = step(block, carry, inputs)` for each block in order.

    `blocks`: modules of identical structure and static attributes; `per_layer`: None or a pytree
    of arrays with a leading axis of `len(blocks)` holding what differs between blocks (prompts,
    Swin's shifts and drop-path rates, PRNG keys): block i gets `inputs = per_layer[i]`. Returns
    `(carry, ys)`, the `y`s stacked on a leading axis (None when `step` returns None).

    `scan=False` unrolls a Python loop; `scan=True` runs one `jax.lax.scan` over the blocks'
    parameters, stacked on a leading axis inside the computation (one copy of the stack's weights
    per call), so the block is traced and compiled once. The parameters stay one module per block:
    checkpoints, converters, sharding and optimiser rules see the same paths either way. `remat`
    wraps each block's step in `jax.checkpoint` with the `REMAT` policy. `step` must not change
    module state (it runs on copies made by `nnx.merge`).
    """
    if not blocks:
        return carry, None
    scan = scan and len(blocks) > 1  # a one-block scan is the loop (which has remat's CSE barriers)
    splits = [nnx.split(block) for block in blocks]

    def body_for(graphdef):
        def body(carry, state_and_inputs):
            state, inputs = state_and_inputs
            return step(nnx.merge(graphdef, state), carry, inputs)
        if remat == "none":
            return body
        return jax.checkpoint(body, policy=_REMAT_POLICIES[remat], prevent_cse=not scan)

    if scan:
        graphdef = splits[0][0]
        if any(g != graphdef for g, _ in splits[1:]):
            raise ValueError(f"scan_layers: the {len(blocks)} blocks ({type(blocks[0]).__name__}) differ in "
                             "structure or static attributes; they cannot share one scanned body")
        return jax.lax.scan(body_for(graphdef), carry, (_stack([state for _, state in splits]), per_layer))
    ys = []
    for i, (graphdef, state) in enumerate(splits):
        inputs = None if per_layer is None else jax.tree.map(lambda a: a[i], per_layer)
        carry, y = body_for(graphdef)(carry, (state, inputs))
        ys.append(y)
    return carry, _stack(ys)


def _stack(trees: list) -> Any:
    """Stack equal pytrees leaf by leaf on a new leading axis (a list of None gives None)."""
    return None if trees[0] is None else jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


class Stack(nnx.Module):
    """Base of the modules that hold a stack of identical blocks (CLIP's `Transformer`, a Swin
    stage, the MaskFormer decoder). `scan_layers` / `remat` (class defaults: loop, no remat) choose
    how `run_stack` applies the blocks; `set_stack_options` sets them on a whole model."""

    scan_layers: bool = False
    remat: str = "none"

    def run_stack(self, step, units, carry, per_layer=None):
        """`run_layers` with this stack's options."""
        return run_layers(step, units, carry, per_layer, scan=self.scan_layers, remat=self.remat)


def set_stack_options(model: nnx.Module, *, scan_layers: bool = False, remat: str = "none") -> nnx.Module:
    """Set how every `Stack` inside `model` runs (in place) -> `model`. Execution only: parameters,
    their paths and the outputs (to float rounding) are the same for every setting."""
    check_stack_options(scan_layers, remat, "set_stack_options")
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Stack):
            module.scan_layers, module.remat = scan_layers, remat
    return model
