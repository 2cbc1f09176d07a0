"""Beam search: 1 beam is greedy; on a handcrafted chain the best beam beats greedy and finds the exhaustive optimum."""
import itertools

import numpy as np

from jaxtx.infer import generate
from jaxtx.infer.beam import beam_search

from infer_models import markov, small_model

# From token 0, token 1 is most likely (0.5) but leads to a flat distribution; token 2 (0.4) leads to an almost
# certain continuation. Greedy takes 1; the best 3-token continuation goes through 2.
T = np.array([[0.0, 0.5, 0.4, 0.1],
              [0.3, 0.3, 0.2, 0.2],
              [0.0, 0.0, 0.01, 0.99],
              [0.05, 0.05, 0.0, 0.9]]) + 1e-9
T = T / T.sum(1, keepdims=True)


def _logp(seq, start=0):
    prev, s = start, 0.0
    for t in seq:
        s += np.log(T[prev, t])
        prev = t
    return s


def test_best_beam_beats_greedy_and_is_optimal():
    model, params = markov(T)
    greedy = generate(model, params, [[0]], max_new_tokens=3).tokens[0]
    assert greedy[0] == 1
    res = beam_search(model, params, [[0], [1]], num_beams=2, max_new_tokens=3, length_penalty=0.0)
    best = max(itertools.product(range(4), repeat=3), key=_logp)
    assert res.tokens[0] == list(best) == [2, 3, 3]
    assert _logp(res.tokens[0]) > _logp(greedy) + 0.5
    np.testing.assert_allclose(res.scores[0], _logp(res.tokens[0]), atol=1e-4)
    # row 1 (prompt [1]): W=2 prunes token 2 at the first step (0.2 < 0.3, 0.3), so it finds a good beam, not the
    # optimum; its score is still exactly the log-prob of its tokens and no worse than greedy's
    g1 = generate(model, params, [[1]], max_new_tokens=3).tokens[0]
    np.testing.assert_allclose(res.scores[1], _logp(res.tokens[1], 1), atol=1e-4)
    assert res.scores[1] >= _logp(g1, 1) - 1e-6
    assert beam_search(model, params, [[1]], num_beams=4, max_new_tokens=3, length_penalty=0.0).tokens[0] == \
        list(max(itertools.product(range(4), repeat=3), key=lambda s: _logp(s, 1)))


def test_eos_and_length_penalty():
    model, params = markov(T)
    # with token 3 as EOS: [2, 3] finishes with logp log .4 + log .99 (length 2); greedy-ish paths through 1 are worse
    res = beam_search(model, params, [[0]], num_beams=3, max_new_tokens=4, eos_id=3, length_penalty=1.0)
    assert res.tokens[0] == [2]
    np.testing.assert_allclose(res.scores[0], (np.log(0.4) + np.log(0.99)) / 2, atol=1e-4)
    assert all(s <= res.scores[0] + 1e-6 for s in res.beam_scores[0])


def test_one_beam_is_greedy_on_a_transformer():
    model, params = small_model("llama")
    prompts = [[5, 17, 3], [9, 1, 2, 60, 33, 7, 8]]
    g = generate(model, params, prompts, max_new_tokens=8)
    b = beam_search(model, params, prompts, num_beams=1, max_new_tokens=8, length_penalty=0.0)
    assert b.tokens == g.tokens
    # with EOS: the greedy token at step 3 of row 0 ends both
    eos = g.tokens[0][3]
    g = generate(model, params, prompts, max_new_tokens=8, eos_id=eos)
    b = beam_search(model, params, prompts, num_beams=1, max_new_tokens=8, eos_id=eos, length_penalty=0.0)
    assert b.tokens == g.tokens


def test_beams_on_a_transformer_score_at_least_greedy():
    model, params = small_model("llama")
    prompts = [[5, 17, 3]]
    import jax
    import jax.numpy as jnp
    from infer_models import full_forward

    def logp(seq):
        full = np.asarray(jax.nn.log_softmax(full_forward(model)(params, jnp.asarray([prompts[0] + seq])), -1))[0]
        return sum(full[len(prompts[0]) - 1 + i, t] for i, t in enumerate(seq))

    g = generate(model, params, prompts, max_new_tokens=6).tokens[0]
    b = beam_search(model, params, prompts, num_beams=4, max_new_tokens=6, length_penalty=0.0)
    np.testing.assert_allclose(b.scores[0], logp(b.tokens[0]), atol=1e-3)
    assert b.scores[0] >= logp(g) - 1e-4
