"""Low-precision matrix products (`layers.einsum` / `layers.dot_general`): float32 accumulation in
the forward and the backward pass, the same values as float32 products of the rounded inputs, the
`dots` remat policy still keeping weight products, and attention equal to jax.nn's."""

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


def test_linear_layers_use_the_float32_accumulating_product():
    from flax import nnx

    layer = layers.linear(8, 5, dtype=BF16, rngs=nnx.Rngs(0))
    x = _random((3, 8), 0)
    out = layer(x)
    kernel = layer.kernel[...].astype(BF16).astype(jnp.float32)
    expected = (x.astype(jnp.float32) @ kernel).astype(BF16).astype(jnp.float32) + layer.bias[...]
    assert out.dtype == BF16
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=2 ** -7, atol=1e-6)


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


@pytest.mark.parametrize("causal", [False, True])
def test_attention_equals_jax_nn_in_float32_and_stays_close_in_bfloat16(causal):
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (2, 9, 16)) for key in keys[:3])
    bias = None if causal else jax.random.normal(keys[3], (1, 4, 9, 9))
    ours = layers.dot_product_attention(q, k, v, 4, bias=bias, is_causal=causal)
    split = lambda t: t.reshape(2, 9, 4, 4)  # noqa: E731
    reference = jax.nn.dot_product_attention(split(q), split(k), split(v), bias=bias, is_causal=causal)
    np.testing.assert_allclose(ours, reference.reshape(2, 9, 16), atol=2e-6)
    low = layers.dot_product_attention(*(t.astype(BF16) for t in (q, k, v)), 4, bias=bias, is_causal=causal)
    assert low.dtype == BF16
    np.testing.assert_allclose(np.asarray(low, np.float32), ours, atol=0.05)
