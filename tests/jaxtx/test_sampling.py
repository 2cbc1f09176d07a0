"""Samplers against closed forms: exact supports of top-k / top-p / min-p, penalties, and empirical frequencies that
match the filtered distribution (chi-square at a fixed seed)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxtx import sampling
from jaxtx import stop as stop_lib

# probabilities 0.4, 0.3, 0.15, 0.1, 0.05 (shuffled positions so nothing depends on token order)
P = np.array([0.1, 0.4, 0.05, 0.3, 0.15])
LOGITS = jnp.log(jnp.asarray(P))[None]


def support(x):
    return set(np.nonzero(np.asarray(x)[0] > sampling.NEG / 2)[0].tolist())


@pytest.mark.parametrize("k,expected", [(1, {1}), (2, {1, 3}), (3, {1, 3, 4}), (5, {0, 1, 2, 3, 4}),
                                        (0, {0, 1, 2, 3, 4})])
def test_top_k_support(k, expected):
    assert support(sampling.top_k_filter(LOGITS, k)) == expected


# mass sorted: 0.4, 0.7, 0.85, 0.95, 1.0 -> the smallest prefix with mass >= p
@pytest.mark.parametrize("p,expected", [(0.3, {1}), (0.4, {1}), (0.41, {1, 3}), (0.7, {1, 3}), (0.71, {1, 3, 4}),
                                        (0.9, {1, 3, 4, 0}), (0.999, {0, 1, 2, 3, 4})])
def test_top_p_support(p, expected):
    assert support(sampling.top_p_filter(LOGITS, p - 1e-6 if p in (0.4, 0.7) else p)) == expected


# prob >= min_p * 0.4
@pytest.mark.parametrize("p,expected", [(1.0, {1}), (0.7, {1, 3}), (0.3, {1, 3, 4}), (0.2, {1, 3, 4, 0}),
                                        (0.1, {0, 1, 2, 3, 4})])
def test_min_p_support(p, expected):
    assert support(sampling.min_p_filter(LOGITS, p)) == expected


def test_filters_are_per_row():
    x = jnp.asarray([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    out = np.asarray(sampling.top_k_filter(x, 1))
    assert out[0, 2] == 2.0 and out[1, 0] == 2.0 and (out[0, :2] < -1e29).all() and (out[1, 1:] < -1e29).all()


def test_penalties_closed_form():
    x = jnp.asarray([[2.0, -2.0, 1.0, 0.5]])
    seen = jnp.asarray([[True, True, False, False]])
    counts = jnp.asarray([[0, 0, 3, 1]])
    s = sampling.Sampling(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    out = sampling.apply_penalties(x, s, seen_BV=seen, counts_BV=counts)
    np.testing.assert_allclose(out, [[1.0, -4.0, 1.0 - 1.5 - 0.25, 0.5 - 0.5 - 0.25]])


def test_penalty_state_tracks_prompt_and_output():
    s = sampling.Sampling(repetition_penalty=1.3, frequency_penalty=0.1)
    seen, counts = sampling.init_penalty_state(jnp.asarray([[1, 2, 0]]), jnp.asarray([[1, 1, 0]]), 5, s)
    assert np.asarray(seen)[0].tolist() == [False, True, True, False, False]  # padding token 0 not seen
    seen, counts = sampling.update_penalty_state(seen, counts, jnp.asarray([4]), jnp.asarray([True]))
    seen, counts = sampling.update_penalty_state(seen, counts, jnp.asarray([4]), jnp.asarray([True]))
    assert np.asarray(seen)[0, 4] and np.asarray(counts)[0].tolist() == [0, 0, 0, 0, 2]
    assert sampling.init_penalty_state(jnp.zeros((1, 2), int), jnp.ones((1, 2)), 5, sampling.GREEDY) == (None, None)


def test_greedy_is_argmax_and_ignores_keys():
    x = jax.random.normal(jax.random.key(0), (4, 50))
    np.testing.assert_array_equal(sampling.sample(x, sampling.GREEDY), np.argmax(np.asarray(x), -1))


def _chi2_pvalue(draws, expected_p):
    counts = np.bincount(draws, minlength=len(expected_p))
    assert counts[expected_p == 0].sum() == 0, "sampled a token outside the support"
    keep = expected_p > 0
    return stats.chisquare(counts[keep], expected_p[keep] * len(draws)).pvalue


@pytest.mark.parametrize("s", [sampling.Sampling(temperature=1.0), sampling.Sampling(temperature=0.7, top_k=3),
                               sampling.Sampling(temperature=1.0, top_p=0.8),
                               sampling.Sampling(temperature=1.5, min_p=0.2),
                               sampling.Sampling(temperature=1.0, top_k=4, top_p=0.9, min_p=0.1)])
def test_sampling_frequencies_match_filtered_distribution(s):
    n = 20000
    logits = jnp.broadcast_to(LOGITS, (n, 5))
    keys = sampling.row_keys(jnp.arange(n), 0)
    draws = np.asarray(jax.jit(lambda l, k: sampling.sample(l, s, k))(logits, keys))
    # the filtered distribution in closed form
    q = P ** (1.0 / s.temperature)
    q = q / q.sum()
    order = np.argsort(-q)
    keep = np.zeros(5, bool)
    keep[order[: s.top_k or 5]] = True
    qk = np.where(keep, q, 0) / np.where(keep, q, 0).sum()
    mass_before = np.cumsum(qk[order]) - qk[order]
    keep_p = np.zeros(5, bool)
    keep_p[order[mass_before < s.top_p]] = True
    keep &= keep_p
    qp = np.where(keep, qk, 0) / np.where(keep, qk, 0).sum()
    keep &= qp >= s.min_p * qp.max()
    expected = np.where(keep, q, 0) / np.where(keep, q, 0).sum()
    np.testing.assert_allclose(np.asarray(sampling.probs(LOGITS, s))[0], expected, atol=1e-6)
    assert _chi2_pvalue(draws, expected) > 1e-3


def test_sampling_rejects_a_wrong_distribution():
    """The chi-square check above has power: the unfiltered draws fail against the top-k distribution."""
    n = 20000
    draws = np.asarray(sampling.sample(jnp.broadcast_to(LOGITS, (n, 5)), sampling.Sampling(temperature=1.0),
                                       sampling.row_keys(jnp.arange(n), 0)))
    wrong = np.array([0.1, 0.4, 0.0, 0.3, 0.15]) / 0.95
    counts = np.bincount(draws, minlength=5)
    kept = [0, 1, 3, 4]
    assert counts[2] > 0 and stats.chisquare(counts[kept], wrong[kept] * counts[kept].sum()).pvalue < 0.5


def test_per_row_seeds_are_independent_of_batch():
    x = jax.random.normal(jax.random.key(1), (3, 100))
    s = sampling.Sampling(temperature=1.0)
    together = sampling.sample(x, s, sampling.row_keys(jnp.asarray([7, 8, 9]), 5))
    alone = sampling.sample(x[1:2], s, sampling.row_keys(jnp.asarray([8]), 5))
    assert int(together[1]) == int(alone[0])
    # the stream advances with the step: over 64 rows, step 5 and step 6 draws differ somewhere
    y = jnp.zeros((64, 100))
    seeds = jnp.arange(64)
    step5 = sampling.sample(y, s, sampling.row_keys(seeds, 5))
    assert not np.array_equal(np.asarray(step5), np.asarray(sampling.sample(y, s, sampling.row_keys(seeds, 6))))


def test_token_logprobs():
    lp = sampling.token_logprobs(LOGITS, jnp.asarray([3]))
    np.testing.assert_allclose(lp, [np.log(0.3)], rtol=1e-5)


def test_sampling_validation_names_the_field():
    with pytest.raises(ValueError, match="top_p"):
        sampling.Sampling(top_p=0.0)


def test_stop_sequences_on_device():
    packed = stop_lib.pack_stop_sequences([5, [7, 8]])
    out = jnp.asarray([[1, 5, -1, -1], [7, 8, -1, -1], [8, 7, 8, -1], [1, 2, 3, 8], [8, -1, -1, -1]])
    n = jnp.asarray([2, 2, 3, 4, 1])
    assert np.asarray(stop_lib.ends_with_stop(out, n, packed)).tolist() == [True, True, True, False, False]
    assert stop_lib.pack_stop_sequences([]) is None


def test_truncate_text():
    assert stop_lib.truncate_text("hello world\n\nbye", ["\n\n", "bye"]) == ("hello world", True)
    assert stop_lib.truncate_text("hello", ["x"]) == ("hello", False)
