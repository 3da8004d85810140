"""Shared building blocks: attention in PyTorch's fused `in_proj` layout, MLPs, DropPath, and
`run_layers`, which applies a stack of identical blocks in a Python loop or a `jax.lax.scan`,
with optional rematerialisation (`REMAT`).

Conventions for every module in `ovseg_jax.models`:
- NHWC images, `[B, L, D]` token sequences.
- Parameters are float32 (`param_dtype`); `dtype` is the compute dtype (float32 or bfloat16).
- LayerNorm eps is 1e-5 everywhere (PyTorch's default; Flax's is 1e-6).
- Softmax and normalisation statistics run in float32 whatever the compute dtype.
- Matrix products go through `einsum` / `dot_general` below: in bfloat16 (or float16) they
  accumulate in float32 and round once, in the forward and the backward pass.
"""

from __future__ import annotations

import functools
import string
import weakref
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

LN_EPS = 1e-5


LOW_PRECISION = (jnp.bfloat16, jnp.float16)
# `checkpoint_name` of low-precision products without batch dimensions (see `REMAT`).
WEIGHT_PRODUCT = "weight_product"


def _is_low_precision(*arrays: jax.Array) -> bool:
    return all(a.dtype in LOW_PRECISION for a in arrays) and len({a.dtype for a in arrays}) == 1


def _matmul_f32_accumulation(spec: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """`einsum(spec, x, y)` -> float32. XLA:CPU runs low-precision x low-precision -> float32
    products in its YNNPACK kernels, and its fallback kernel, which a product with several batch
    dimensions can reach, refuses them ("Unsupported element type for DotThunk"); so a product
    with batch indices runs as one `[batch, M, K] x [batch, K, N]` product. One without (weight
    products and their gradients) goes to `dot_general` in the operands' own layouts: transposing
    them first (an activation's copy for each weight gradient) made a bfloat16 linear layer's
    forward and backward 25% slower on CPU."""
    inputs, out = spec.split("->")
    x_spec, y_spec = inputs.split(",")
    batch = [c for c in out if c in x_spec and c in y_spec]
    contract = [c for c in x_spec if c in y_spec and c not in out]
    x_free = [c for c in x_spec if c not in y_spec]
    y_free = [c for c in y_spec if c not in x_spec]
    if not batch:
        contracted = ((tuple(x_spec.index(c) for c in contract), tuple(y_spec.index(c) for c in contract)), ((), ()))
        product = jax.lax.dot_general(x, y, contracted, preferred_element_type=jnp.float32)
        return jnp.einsum(f"{''.join(x_free + y_free)}->{out}", product)
    size = dict(zip(x_spec, x.shape)) | dict(zip(y_spec, y.shape))
    prod = lambda idx: int(np.prod([size[c] for c in idx], dtype=np.int64))  # noqa: E731
    lhs = jnp.einsum(f"{x_spec}->{''.join(batch + x_free + contract)}", x)
    rhs = jnp.einsum(f"{y_spec}->{''.join(batch + contract + y_free)}", y)
    lhs = lhs.reshape(prod(batch), prod(x_free), prod(contract))
    rhs = rhs.reshape(prod(batch), prod(contract), prod(y_free))
    product = jax.lax.dot_general(lhs, rhs, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
    product = product.reshape([size[c] for c in batch + x_free + y_free])
    return jnp.einsum(f"{''.join(batch + x_free + y_free)}->{out}", product)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _einsum_f32_accumulation(spec: str, out_dtype, x: jax.Array, y: jax.Array) -> jax.Array:
    return _matmul_f32_accumulation(spec, x, y).astype(out_dtype)


def _einsum_fwd(spec, out_dtype, x, y):
    return _einsum_f32_accumulation(spec, out_dtype, x, y), (x, y)


def _einsum_bwd(spec, out_dtype, residuals, cotangent):
    x, y = residuals
    inputs, out = spec.split("->")
    x_spec, y_spec = inputs.split(",")
    cotangent = cotangent.astype(x.dtype)
    return (_einsum_f32_accumulation(f"{out},{y_spec}->{x_spec}", x.dtype, cotangent, y),
            _einsum_f32_accumulation(f"{x_spec},{out}->{y_spec}", y.dtype, x, cotangent))


_einsum_f32_accumulation.defvjp(_einsum_fwd, _einsum_bwd)


def einsum(spec: str, x: jax.Array, y: jax.Array, *, out_dtype=None) -> jax.Array:
    """Two-operand `jnp.einsum` (explicit `"ab,bc->ac"` form) -> `out_dtype` (default: the
    operands' result dtype).

    bfloat16/float16 operands are multiplied with float32 accumulation and rounded once, and
    the two products of the backward pass likewise (cotangent rounded to the operands' dtype
    first). Accelerators accumulate low-precision products in float32 anyway; XLA:CPU runs a
    bfloat16 product with float32 accumulation about 2x faster than float32 and one with a
    bfloat16 result about 2x slower (measured on this project's AMD EPYC, AVX512-BF16), so
    without this a bfloat16 step is slower than a float32 one on CPU. Other dtypes go to
    `jnp.einsum` unchanged.
    """
    if not _is_low_precision(x, y):
        out = jnp.einsum(spec, x, y)
        return out if out_dtype is None else out.astype(out_dtype)
    inputs, out = spec.replace(" ", "").split("->")
    x_spec, y_spec = inputs.split(",")
    for name, own, other in (("first", x_spec, y_spec), ("second", y_spec, x_spec)):
        if "." in own or len(set(own)) != len(own) or not set(own) <= set(other) | set(out):
            raise ValueError(f"einsum {spec!r}: the {name} operand's indices must be distinct letters, "
                             "each in the other operand or the output (no ellipsis)")
    product = _einsum_f32_accumulation(f"{x_spec},{y_spec}->{out}", out_dtype or x.dtype, x, y)
    if set(x_spec) & set(y_spec) & set(out):  # batch dimensions: not a weight product
        return product
    return checkpoint_name(product, WEIGHT_PRODUCT)


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                preferred_element_type=None, **kwargs) -> jax.Array:
    """`jax.lax.dot_general` with `einsum`'s float32 accumulation for low-precision operands (the
    `dot_general` that `linear` layers use; an explicit `out_sharding` goes to `jax.lax`)."""
    if not _is_low_precision(lhs, rhs) or kwargs.get("out_sharding") is not None:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, **kwargs)
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    letters = iter(string.ascii_letters)
    lhs_idx, rhs_idx = [""] * lhs.ndim, [""] * rhs.ndim
    for i, j in (*zip(lhs_batch, rhs_batch), *zip(lhs_contract, rhs_contract)):
        lhs_idx[i] = rhs_idx[j] = next(letters)
    lhs_idx = [c or next(letters) for c in lhs_idx]
    rhs_idx = [c or next(letters) for c in rhs_idx]
    out = ([lhs_idx[i] for i in lhs_batch]
           + [c for i, c in enumerate(lhs_idx) if i not in lhs_batch and i not in lhs_contract]
           + [c for j, c in enumerate(rhs_idx) if j not in rhs_batch and j not in rhs_contract])
    return einsum(f"{''.join(lhs_idx)},{''.join(rhs_idx)}->{''.join(out)}", lhs, rhs,
                  out_dtype=preferred_element_type)


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
    """Look an activation up by its PyTorch/transformers name. Low-precision inputs are evaluated
    in float32 and rounded once (sigmoid and erf in bfloat16 are 2x slower than in float32 on
    XLA:CPU; on accelerators the casts fuse away)."""
    try:
        fn = ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None
    return lambda x: fn(x.astype(jnp.float32)).astype(x.dtype) if x.dtype in LOW_PRECISION else fn(x)


def layer_norm(dim: int, *, dtype, rngs: nnx.Rngs, eps: float = LN_EPS) -> nnx.LayerNorm:
    """LayerNorm with PyTorch's eps (1e-5 unless given) and float32 parameters."""
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def _promote_keeping_bias(arrays, *, dtype=None, inexact=True):
    """`promote_dtype` for `Linear` / `Conv`: input and kernel to the compute dtype, the bias kept
    float32 (so `y + bias` is float32 and the layer rounds once)."""
    inputs, kernel, bias = arrays
    dtype = dtype or jnp.result_type(inputs, kernel)
    return inputs.astype(dtype), kernel.astype(dtype), bias


class Linear(nnx.Linear):
    """`nnx.Linear` (same parameters and initialisation) computing `x @ kernel` with float32
    accumulation (`dot_general`), adding the float32 bias and rounding once to the compute dtype.
    A bias added in bfloat16 makes its gradient a bfloat16 reduction, which XLA:CPU runs about 40x
    slower than a float32 one."""

    def __init__(self, din: int, dout: int, *, dtype, rngs: nnx.Rngs, use_bias: bool = True):
        super().__init__(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, dot_general=dot_general,
                         promote_dtype=_promote_keeping_bias, preferred_element_type=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x).astype(self.dtype or x.dtype)


class Conv(nnx.Conv):
    """`nnx.Conv` (same arguments, parameters and initialisation) adding its bias in float32 and
    rounding once to the compute dtype (see `Linear`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, promote_dtype=_promote_keeping_bias, **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x).astype(self.dtype or x.dtype)


class FixedKeyRngs:
    """Stands in for `nnx.Rngs` when only shapes matter: every stream returns the same key."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs) -> jax.Array:
        return jax.random.key(0)


def abstract_module(build: Callable[[Any], nnx.Module]) -> nnx.Module:
    """`nnx.eval_shape` of `build(rngs)`: every variable a `jax.ShapeDtypeStruct`, nothing drawn or
    allocated. `rngs` is a `FixedKeyRngs`: with a real `nnx.Rngs`, each draw's counter update inside
    the trace asks the tracer for `.sharding`, whose error message walks the whole trace: quadratic,
    16 s for SAM ViT-H and 3.9 s for the Swin-B segmenter against 1 s and 0.6 s (flax 0.12.8, jax 0.10.2)."""
    return nnx.eval_shape(lambda: build(FixedKeyRngs()))


_INFERENCE_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inference_split(module: nnx.Module) -> tuple[Any, nnx.State]:
    """`nnx.split(module)` for inference calls, with the kernels of the module's lower-precision
    `Linear` / `Conv` layers (compute dtype bfloat16 or float16) stored in that dtype.

    Such a layer casts its float32 kernel to the compute dtype where it is used, so the outputs are
    the same; what changes is that a jitted forward pass no longer casts every weight matrix again
    in each call (about 2.5% of a bfloat16 CLIP ViT-B/16 forward at 16 crops, bench/clip_encode.py;
    more with fewer crops). The cast copy (half the kernels' float32 bytes) is kept beside the module
    until its parameters change (other arrays, e.g. new weights loaded) or the module is freed; a
    float32 module is split as it is."""
    graphdef, state = nnx.split(module)
    leaves = jax.tree.leaves(state)
    kept = _INFERENCE_SPLITS.get(module)
    if kept is not None and kept[0] == graphdef and len(kept[1]) == len(leaves) \
            and all(a is b for a, b in zip(kept[1], leaves)):
        return kept[2]
    low = {path: layer.dtype for path, layer in nnx.iter_modules(module)
           if isinstance(layer, (nnx.Linear, nnx.Conv)) and layer.dtype is not None
           and jnp.dtype(layer.dtype).itemsize < 4}

    def cast(path, variable):
        dtype = low.get(path[:-1]) if path[-1] == "kernel" else None
        return variable if dtype is None else variable.replace(variable[...].astype(dtype))

    split = (graphdef, nnx.map_state(cast, state) if low else state)
    _INFERENCE_SPLITS[module] = (graphdef, leaves, split)  # one assignment: safe for threads sharing a module
    return split


def linear(din: int, dout: int, *, dtype, rngs: nnx.Rngs, use_bias: bool = True) -> Linear:
    """Linear layer, kernel `[din, dout]` (the transpose of PyTorch's weight)."""
    return Linear(din, dout, dtype=dtype, use_bias=use_bias, rngs=rngs)


def broadcast_to(x: jax.Array, shape: Sequence[int]) -> jax.Array:
    """`jnp.broadcast_to(x, shape)` whose gradient sums over the broadcast dimensions as a product
    with a vector of ones (float32, highest precision) instead of a reduction: XLA:CPU reduces
    over leading dimensions 10-50x slower than that matrix-vector product (Swin-B's relative
    position bias gradients, summed over images and windows, took 437 ms of a 256 px bfloat16
    step's operation time). The same numbers on every platform, up to float32 summation order."""
    shape = tuple(shape)
    padded = (1,) * (len(shape) - x.ndim) + x.shape
    summed = tuple(i for i, (a, b) in enumerate(zip(padded, shape)) if a == 1 and b != 1)
    if not summed:
        return jnp.broadcast_to(x, shape)
    kept = tuple(i for i in range(len(shape)) if i not in summed)

    @jax.custom_vjp
    def broadcast(x):
        return jnp.broadcast_to(x, shape)

    def backward(_, cotangent):
        rows = jnp.transpose(cotangent, summed + kept).reshape(-1, int(np.prod([shape[i] for i in kept])))
        total = jnp.dot(jnp.ones(rows.shape[0], rows.dtype), rows, precision=jax.lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32)
        return (total.reshape(x.shape).astype(x.dtype),)

    broadcast.defvjp(lambda x: (broadcast(x), None), backward)
    return broadcast(x)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """`[B, L, D] -> [B, L, heads, D / heads]`."""
    b, l, d = x.shape
    return x.reshape(b, l, num_heads, d // num_heads)


def heads_first(x: jax.Array, num_heads: int) -> jax.Array:
    """`[B, L, D] -> [B, heads, L, D / heads]` (head-major: each head's tokens contiguous)."""
    return split_heads(x, num_heads).transpose(0, 2, 1, 3)


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
    softmax are computed in float32; bfloat16 products accumulate in float32 (`einsum`).
    Attention-weight dropout is applied only when `dropout_rate > 0` and a `dropout_rng` is given
    (training).

    The heads are moved to the front once (`[B, heads, L, D / heads]`, fused by XLA with the
    projection's bias) and the two products batch over (image, head) in that layout: the logits
    come out as `[B, heads, Lq, Lk]` rows that the softmax and the value product read in place, and
    only the output is transposed back. jax.nn.dot_product_attention's token-major einsums made
    XLA:CPU transpose the attention weights and the output once more per layer; this form runs
    the CLIP ViT-B/16 forward 7% faster on one core of this project's AMD EPYC (float32, the
    same numbers to float32 rounding), and lets XLA fuse scores, softmax and value product.
    """
    dtype = q.dtype
    batch, length, width = q.shape
    qh, kh, vh = (heads_first(t, num_heads) for t in (q, k, v))
    logits = einsum("bhqd,bhkd->bhqk", qh, kh, out_dtype=jnp.float32) * (width // num_heads) ** -0.5
    if bias is not None:  # its gradient sums over what it broadcasts over (see `broadcast_to`)
        logits = logits + broadcast_to(bias.astype(jnp.float32), logits.shape)
    if is_causal:
        lq, lk = logits.shape[-2:]
        logits = jnp.where(jnp.tril(jnp.ones((lq, lk), bool)), logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    out = einsum("bhqk,bhkd->bhqd", weights.astype(dtype), vh)
    return out.transpose(0, 2, 1, 3).reshape(batch, length, width)


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
        kernel, bias_qkv = self.in_proj.kernel[...].astype(query.dtype), self.in_proj.bias[...]
        d = self.dim

        def project(x, part):  # as `Linear`: float32 accumulation and bias, one rounding
            columns = slice(part * d, (part + 1) * d)
            return (einsum("bld,de->ble", x, kernel[:, columns], out_dtype=jnp.float32)
                    + bias_qkv[columns]).astype(x.dtype)

        q, k, v = project(query, 0), project(key, 1), project(value, 2)
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
#   the rest: norms, activations, attention logits and softmax (`dots_with_no_batch_dims_saveable`;
#   low-precision products are custom_vjp calls, which that policy does not see: `einsum` names
#   their outputs `WEIGHT_PRODUCT` and the policy saves those too).
REMAT = ("none", "block", "dots")
_REMAT_POLICIES = {"block": jax.checkpoint_policies.nothing_saveable,
                   "dots": jax.checkpoint_policies.save_from_both_policies(
                       jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                       jax.checkpoint_policies.save_only_these_names(WEIGHT_PRODUCT))}


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
