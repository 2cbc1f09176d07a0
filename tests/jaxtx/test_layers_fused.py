"""The layer rewrites for training speed (issue 15): SwiGLU's hand-written backward and Dense's head-axis kernels
computed as one 2-D matmul must equal the plain formulas (values and gradients)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtx.config import ModelConfig
from jaxtx.layers.common import Dense, swiglu


def test_swiglu_value_and_grads_match_float64():
    rng = np.random.default_rng(0)
    g, u, dh = (rng.normal(size=(3, 5, 7)) * 3 for _ in range(3))
    sig = 1 / (1 + np.exp(-g))
    out, vjp = jax.vjp(swiglu, jnp.asarray(g, jnp.float32), jnp.asarray(u, jnp.float32))
    dg, du = vjp(jnp.asarray(dh, jnp.float32))
    np.testing.assert_allclose(np.asarray(out), g * sig * u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dg), dh * u * (sig + g * sig * (1 - sig)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(du), dh * g * sig, rtol=1e-5, atol=1e-6)


def test_dense_head_axes_equal_the_einsum():
    cfg = ModelConfig(d_model=16, n_heads=4, n_kv_heads=2, vocab_size=32, d_ff=32, n_layers=1)
    x = jax.random.normal(jax.random.key(0), (2, 3, 16))
    for shape, axes, eq, n_in, inp in [((16, 4, 8), ("embed", "heads", "head_dim"), "BTD,DNh->BTNh", 1, x),
                                       ((4, 8, 16), ("heads", "head_dim", "embed"), "BTHh,HhD->BTD", 2,
                                        x.reshape(2, 3, 4, 4).repeat(2, -1))]:
        layer = Dense(cfg, shape, axes, eq, n_in, use_bias=True)
        params = nn.unbox(layer.init(jax.random.key(1), inp))["params"]
        params = {**params, "bias": jax.random.normal(jax.random.key(2), params["bias"].shape)}

        def plain(p, x):
            return jnp.einsum(eq, x, p["kernel"]) + p["bias"]
        got, vjp_got = jax.vjp(lambda p, x: layer.apply({"params": p}, x), params, inp)
        want, vjp_want = jax.vjp(plain, params, inp)
        ct = jax.random.normal(jax.random.key(3), want.shape)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(vjp_got(ct)), jax.tree.leaves(vjp_want(ct))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
