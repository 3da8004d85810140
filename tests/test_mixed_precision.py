"""Low-precision matrix products (`layers.einsum` / `layers.dot_general`): float32 accumulation in
the forward and the backward pass, the same values as float32 products of the rounded inputs, the
`dots` remat policy still keeping weight products, attention equal to jax.nn's, and `broadcast_to`'s
gradient (a product with ones) equal to jnp.broadcast_to's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from ovseg_jax.models import layers

BF16 = jnp.bfloat16


def _random(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(BF16)


def _dots(jaxpr) -> list:
    """Every dot_general equation of `jaxpr`, custom-VJP and sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for value in eqn.params.values():
            for inner in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(inner, jax.extend.core.ClosedJaxpr):
                    found += _dots(inner.jaxpr)
                elif isinstance(inner, jax.extend.core.Jaxpr):
                    found += _dots(inner)
    return found


@pytest.mark.parametrize("spec, shapes", [
    ("nd,de->ne", [(6, 8), (8, 5)]),
    ("bqhd,bkhd->bhqk", [(2, 7, 3, 4), (2, 9, 3, 4)]),
    ("lbqc,bhwc->lbqhw", [(3, 2, 5, 4), (2, 6, 7, 4)]),
])
@pytest.mark.slow
def test_low_precision_einsum_equals_float32_products_of_the_rounded_inputs(spec, shapes):
    x, y = (_random(s, i) for i, s in enumerate(shapes))
    cotangent_f32 = jax.random.normal(jax.random.key(9), jnp.einsum(spec, x, y).shape)

    def ours(x, y):
        return jnp.vdot(layers.einsum(spec, x, y, out_dtype=jnp.float32), cotangent_f32)

    def exact(x, y):
        return jnp.vdot(jnp.einsum(spec, x.astype(jnp.float32), y.astype(jnp.float32),
                                   precision="highest"), cotangent_f32)

    out = layers.einsum(spec, x, y)
    assert out.dtype == BF16
    reference = jnp.einsum(spec, x.astype(jnp.float32), y.astype(jnp.float32), precision="highest")
    # one rounding of a float32 sum: within half a bfloat16 ulp of the exact product
    np.testing.assert_allclose(np.asarray(out, np.float32), reference, rtol=2 ** -8, atol=1e-6)
    grads, expected = jax.grad(ours, (0, 1))(x, y), jax.grad(exact, (0, 1))(x, y)
    for g, e in zip(grads, expected):
        assert g.dtype == BF16
        # the cotangent is rounded to bfloat16 before the backward products: 2 roundings
        np.testing.assert_allclose(np.asarray(g, np.float32), e, rtol=2 ** -6, atol=2e-2 * float(jnp.abs(e).max()))


def test_every_product_of_forward_and_backward_accumulates_low_precision_inputs_in_float32():
    x, w = _random((4, 6, 8), 0), _random((8, 5), 1)
    layer_out = lambda x, w: layers.dot_general(x, w, (((2,), (0,)), ((), ())))  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: layer_out(x, w).astype(jnp.float32).sum(), (0, 1)))(x, w)
    dots = _dots(jaxpr.jaxpr)
    assert len(dots) == 3  # forward, and the two products of the backward pass
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [BF16, BF16], eqn
        assert eqn.params["preferred_element_type"] == jnp.float32, eqn


def test_dot_general_with_batch_dimensions_equals_lax():
    x, y = _random((2, 5, 7, 8), 0), _random((2, 7, 8, 3), 1)
    numbers = (((3,), (2,)), ((0, 2), (0, 1)))
    ours = layers.dot_general(x, y, numbers)
    reference = jax.lax.dot_general(x.astype(jnp.float32), y.astype(jnp.float32), numbers, precision="highest")
    assert ours.shape == reference.shape == (2, 7, 5, 3)
    np.testing.assert_allclose(np.asarray(ours, np.float32), reference, rtol=2 ** -8, atol=1e-6)
    # float32 operands go to jax.lax unchanged
    x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
    np.testing.assert_array_equal(layers.dot_general(x32, y32, numbers), jax.lax.dot_general(x32, y32, numbers))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_layers_add_the_bias_in_float32_and_round_once(kind):
    """`x @ kernel + bias` rounded once; the bias gradient is a float32 reduction (a bfloat16 one is
    about 40x slower on XLA:CPU)."""
    from flax import nnx

    if kind == "linear":
        layer, x = layers.linear(8, 5, dtype=BF16, rngs=nnx.Rngs(0)), _random((3, 8), 0)
        exact = lambda x, k: x @ k  # noqa: E731
    else:
        layer, x = layers.Conv(8, 5, (3, 3), dtype=BF16, param_dtype=jnp.float32, rngs=nnx.Rngs(0)), _random((1, 6, 6, 8), 0)
        exact = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")
    layer.bias[...] = jax.random.normal(jax.random.key(3), layer.bias.shape)
    out = layer(x)
    assert out.dtype == BF16
    kernel = layer.kernel[...].astype(BF16).astype(jnp.float32)
    product = exact(x.astype(jnp.float32), kernel)
    error = np.abs(np.asarray(out, np.float32) - (product + layer.bias[...]))
    if kind == "linear":  # one rounding of the float32 sum
        assert (error <= 2 ** -8 * np.abs(product + layer.bias[...]) + 1e-6).all(), error.max()
    else:  # XLA's bfloat16 convolution rounds its product, then the float32 sum is rounded
        assert (error <= 2 ** -8 * (2 * np.abs(product) + np.abs(layer.bias[...])) + 1e-6).all(), error.max()

    graphdef, params = nnx.split(layer)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: nnx.merge(graphdef, p)(x).astype(jnp.float32).sum()))(params)
    sums = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "reduce_sum"]
    assert sums and all(e.invars[0].aval.dtype == jnp.float32 for e in sums), sums


def test_dots_remat_policy_keeps_low_precision_weight_products(capsys):
    w1, w2 = _random((8, 16), 0), _random((16, 8), 1)

    def block(x, w1, w2):
        h = jnp.sin(layers.einsum("nd,de->ne", x, w1))
        return layers.einsum("ne,ed->nd", h, w2).astype(jnp.float32).sum()

    print_saved_residuals(jax.checkpoint(block, policy=layers._REMAT_POLICIES["dots"]), _random((4, 8), 2), w1, w2)
    kept = [line for line in capsys.readouterr().out.splitlines() if line and "from the argument" not in line]
    # the first product only (the second's output is not needed; sin is recomputed from the first)
    assert len(kept) == 1 and kept[0].startswith("bf16[4,16]") and layers.WEIGHT_PRODUCT in kept[0], kept


def test_low_precision_einsum_refuses_specs_it_cannot_transpose():
    x, y = _random((2, 3), 0), _random((3, 4), 1)
    with pytest.raises(ValueError, match="distinct letters"):
        layers.einsum("...d,de->...e", x, y)
    with pytest.raises(ValueError, match="distinct letters"):
        layers.einsum("ad,de->e", x, y)  # `a` summed out of one operand alone


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16_attention_stays_close_to_jax_nn_in_float32(causal):
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (2, 9, 16)) for key in keys[:3])
    bias = None if causal else jax.random.normal(keys[3], (1, 4, 9, 9))
    split = lambda t: t.reshape(2, 9, 4, 4)  # noqa: E731
    reference = jax.nn.dot_product_attention(split(q), split(k), split(v), bias=bias, is_causal=causal)
    low = layers.dot_product_attention(*(t.astype(BF16) for t in (q, k, v)), 4, bias=bias, is_causal=causal)
    assert low.dtype == BF16
    np.testing.assert_allclose(np.asarray(low, np.float32), reference.reshape(2, 9, 16), atol=0.05)


@pytest.mark.slow
def test_attention_gradient_runs_under_vmap_in_bfloat16():
    """`jax.vmap` adds a batch dimension to every product of the attention."""
    q = jax.random.normal(jax.random.key(0), (3, 2, 16, 8))
    attend = jax.vmap(lambda t: layers.dot_product_attention(t, t, t, 2))
    grad = jax.grad(lambda t: attend(t).astype(jnp.float32).sum())
    low, full = grad(q.astype(BF16)), grad(q)
    assert low.dtype == BF16
    np.testing.assert_allclose(np.asarray(low, np.float32), full, atol=0.05 * float(jnp.abs(full).max()))


@pytest.mark.parametrize("dtype", [jnp.float32, BF16])
@pytest.mark.parametrize("source, target", [
    ((4, 9, 9), (2, 3, 4, 9, 9)),  # missing leading dimensions (Swin's bias over images and windows)
    ((3, 1, 9, 9), (2, 3, 4, 9, 9)),  # a size-1 dimension between kept ones
    ((1, 4, 1, 5), (6, 4, 7, 5)),
    ((4, 5), (4, 5)),  # nothing to broadcast
])
def test_broadcast_to_gradient_sums_like_jnp(source, target, dtype):
    x = jax.random.normal(jax.random.key(0), source).astype(dtype)
    cotangent = jax.random.normal(jax.random.key(1), target)

    def loss(broadcast):
        return lambda x: jnp.vdot(broadcast(x, target).astype(jnp.float32), cotangent)

    ours = jax.grad(loss(layers.broadcast_to))(x)
    expected = jax.grad(loss(jnp.broadcast_to))(x.astype(jnp.float32))  # float32 sums of the same cotangent
    np.testing.assert_array_equal(layers.broadcast_to(x, target), jnp.broadcast_to(x, target))
    assert ours.dtype == dtype and ours.shape == source
    # bfloat16: the cotangent and the sum are each rounded to bfloat16 once
    tol = 1e-5 if dtype == jnp.float32 else 2 ** -7 * float(jnp.abs(expected).max())
    np.testing.assert_allclose(np.asarray(ours, np.float32), expected, rtol=1e-5, atol=tol)


def test_inference_split_keeps_bfloat16_kernels_and_gives_the_same_features():
    """`layers.inference_split` of a bfloat16 CLIP: Linear/Conv kernels stored in bfloat16, everything
    else float32, the image features bit-equal to the per-call cast of `nnx.split`; kept while the
    weights stay, made again when new weights are loaded; a float32 model is split as it is."""
    from flax import nnx

    from ovseg_jax.clip import Clip
    from ovseg_jax.models.clip import CLIP, ClipConfig

    config = ClipConfig(embed_dim=16, image_size=32, patch_size=8, vision_width=32, vision_layers=2,
                        vision_heads=2, vision_mlp_dim=64, context_length=8, vocab_size=64, text_width=16,
                        text_layers=1, text_heads=1, text_mlp_dim=32, eot_token_id=63)
    model = CLIP(config, dtype=BF16, rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    graphdef, state = layers.inference_split(model)
    dtypes = {"/".join(map(str, path)): variable[...].dtype for path, variable in nnx.to_flat_state(state)}
    assert dtypes["visual/transformer/resblocks/0/mlp/c_fc/kernel"] == BF16
    assert dtypes["visual/conv1/kernel"] == BF16
    assert all(dtype == jnp.float32 for path, dtype in dtypes.items() if not path.endswith("kernel"))

    def features(graphdef, state):
        return jax.jit(lambda s: nnx.merge(graphdef, s).encode_image(images))(state)

    np.testing.assert_array_equal(features(graphdef, state), features(*nnx.split(model)))
    assert layers.inference_split(model)[1] is state  # kept

    fresh = CLIP(config, dtype=BF16, rngs=nnx.Rngs(7))
    nnx.update(model, nnx.state(fresh))  # new weights loaded
    graphdef, again = layers.inference_split(model)
    assert again is not state
    np.testing.assert_array_equal(features(graphdef, again), features(*nnx.split(fresh)))
    np.testing.assert_array_equal(Clip(model).encode_image(images), Clip(fresh).encode_image(images))

    full = CLIP(config, rngs=nnx.Rngs(0))
    assert all(variable[...].dtype == jnp.float32
               for _, variable in nnx.to_flat_state(layers.inference_split(full)[1]))
