"""The acceptance rule alone: the emitted tokens follow the target distribution whatever the draft proposes."""
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from jaxtx.infer.speculative_rule import accept

V = 6


def _dists(seed, n):
    return np.asarray(jax.nn.softmax(jax.random.normal(jax.random.key(seed), (n, V)) * 1.5, -1), np.float64)


def test_emitted_tokens_follow_target():
    p = _dists(0, 3)  # target at positions 1, 2 and the bonus position 3 (context-free for this test)
    q = _dists(1, 2)  # a different draft
    n = 40000
    kd, ka = jax.random.split(jax.random.key(2))
    d = jax.vmap(lambda k: jax.random.categorical(k, jnp.log(jnp.asarray(q, jnp.float32))))(jax.random.split(kd, n))
    n_acc, toks = accept(d.astype(jnp.int32), jnp.broadcast_to(jnp.asarray(q, jnp.float32), (n, 2, V)),
                         jnp.broadcast_to(jnp.asarray(p, jnp.float32), (n, 3, V)), jax.random.split(ka, n))
    toks, n_acc = np.asarray(toks), np.asarray(n_acc)
    for pos in range(3):  # the token emitted at position pos (when the row got that far) ~ p[pos]
        got = toks[n_acc >= pos, pos] if pos else toks[:, 0]
        assert (got >= 0).all()
        counts = np.bincount(got, minlength=V)
        pvalue = stats.chisquare(counts, p[pos] / p[pos].sum() * counts.sum()).pvalue
        assert pvalue > 1e-3, (pos, counts / counts.sum(), p[pos])
    # the expected acceptance of the first draft is sum_x min(p, q)
    np.testing.assert_allclose((n_acc >= 1).mean(), np.minimum(p[0], q[0]).sum(), atol=0.01)
    # and the draft's own distribution is clearly not the target's (the test above has something to detect)
    counts = np.bincount(np.asarray(d)[:, 0], minlength=V)
    assert stats.chisquare(counts, p[0] / p[0].sum() * counts.sum()).pvalue < 1e-6


def test_greedy_one_hot_is_target_argmax():
    p = jax.nn.one_hot(jnp.asarray([[2, 4, 1, 3]]), V)  # target argmaxes at 4 positions (k = 3)
    for draft, n_exp, out_exp in [([2, 4, 1], 3, [2, 4, 1, 3]), ([2, 5, 1], 1, [2, 4, -1, -1]),
                                  ([0, 4, 1], 0, [2, -1, -1, -1])]:
        d = jnp.asarray([draft])
        n_acc, toks = accept(d, jax.nn.one_hot(d, V), p, jax.random.split(jax.random.key(0), 1))
        assert int(n_acc[0]) == n_exp and np.asarray(toks)[0].tolist() == out_exp


def test_draft_equal_target_accepts_everything():
    p = jnp.asarray(_dists(3, 4), jnp.float32)[None].repeat(500, 0)
    d = jax.vmap(lambda k: jax.random.categorical(k, jnp.log(p[0, :3])))(jax.random.split(jax.random.key(4), 500))
    n_acc, _ = accept(d.astype(jnp.int32), p[:, :3], p, jax.random.split(jax.random.key(5), 500))
    assert (np.asarray(n_acc) == 3).all()
