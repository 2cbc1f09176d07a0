"""Cross-entropy through the output head, chunk by chunk: the [B, T, V] logits never exist.

The head is the largest activation of a language model: at B x T = 8 x 256 and V = 32k one f32 [B, T, V] array is
250 MiB, and the plain loss (logits -> logsumexp -> gather, then autodiff) keeps about seven of them alive or written
per step (logits, exp, the one-hot scatter of the gather's gradient, the softmax gradient and XLA's transposed copies
of it for the two head matmuls; counted in the compiled HLO of bench125m).

`linear_ce_sum(x, w, targets, weights)` = sum over tokens of weights * (logsumexp(x @ w) - (x @ w)[target]), computed
over chunks of Tc positions (all B rows at once, so a batch-sharded x stays sharded) by a `lax.scan`. Its custom_vjp
computes the gradients inside the same scan, while each chunk's logits are at hand (the loss is a scalar, so
d loss / d logits = (softmax - onehot) * weight is known up to the incoming scalar cotangent): no second pass over the
head, no saved logits. Only one chunk's [B, Tc, V] block is alive at a time, plus dW [D, V] accumulated in f32.

`linear_ce_rows` returns the same sums per row [B] (a sequence's negative log-likelihood, for DPO). Its cotangent is
a vector known only in the backward, so that backward runs the chunks again (the head's forward twice in all).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Rows (B * Tc) per chunk: [rows, V] f32 blocks of ~32 MiB at V = 32k. Large enough that the chunk matmuls run at
# full speed ([256, 768] x [768, 32k] is compute bound), small enough to stay a small fraction of the step's memory.
CHUNK_ROWS = 256


def _chunks(B: int, T: int, rows: int) -> tuple[int, int]:
    """(Tc, C): positions per chunk and number of chunks (T padded up to C * Tc)."""
    Tc = max(1, min(T, rows // max(B, 1)))
    return Tc, -(-T // Tc)


def _split(a, Tc: int, C: int, fill=0):
    """[B, T, ...] -> [C, B, Tc, ...] (zero-padded along T)."""
    B, T = a.shape[:2]
    if C * Tc != T:
        a = jnp.pad(a, [(0, 0), (0, C * Tc - T)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
    return jnp.moveaxis(a.reshape(B, C, Tc, *a.shape[2:]), 1, 0)


def _logits(x_tD, w, w_vd: bool):
    eq = "tD,VD->tV" if w_vd else "tD,DV->tV"
    return jnp.einsum(eq, x_tD, w, preferred_element_type=jnp.float32)


def _run(x_BTD, w, targets_BT, weights_BT, rows: int, w_vd: bool, grads: bool, g_B=None):
    """(per-row sums [B] f32, dx, dw) with grads, else the per-row sums alone. The gradients are those of
    sum_b g_B[b] * sums[b] (g_B None: all ones, the plain sum)."""
    B, T, D = x_BTD.shape
    Tc, C = _chunks(B, T, rows)
    w_BT = weights_BT.astype(jnp.float32) * (1.0 if g_B is None else g_B.astype(jnp.float32)[:, None])
    xs, ts, ws = _split(x_BTD, Tc, C), _split(targets_BT, Tc, C), _split(weights_BT.astype(jnp.float32), Tc, C)
    gs = _split(w_BT, Tc, C)  # the weights scaled by each row's cotangent: what d loss / d logits carries

    def body(carry, chunk):
        sums, dw = carry
        # chunks stay [B, Tc] (B keeps its data sharding); inside, the chunk's B * Tc token rows are one axis (t), so dW
        # contracts over one dim and XLA:CPU does not transpose d (see jaxtx.layers.common.Dense)
        x_c, t_c, w_c, g_c = chunk[0].reshape(-1, D), chunk[1].reshape(-1), chunk[2].reshape(-1), chunk[3].reshape(-1)
        logits = _logits(x_c, w, w_vd)  # [t, V] f32
        m = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
        lse = m[:, 0] + jnp.log(jnp.exp(logits - m).sum(-1))
        picked = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
        sums = sums + ((lse - picked) * w_c).reshape(B, -1).sum(-1)
        if not grads:
            return (sums, dw), None
        # d loss / d logits = (softmax - onehot(target)) * weight, one fused elementwise pass over the block
        hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == t_c[:, None]
        d = (jnp.exp(logits - lse[:, None]) - hit) * g_c[:, None]
        dx = jnp.einsum("tV,VD->tD" if w_vd else "tV,DV->tD", d.astype(w.dtype), w,
                        preferred_element_type=jnp.float32).astype(x_BTD.dtype)
        dw = dw + jnp.einsum("tD,tV->VD" if w_vd else "tD,tV->DV", x_c, d.astype(x_c.dtype),
                             preferred_element_type=jnp.float32)
        return (sums, dw), dx.reshape(B, Tc, D)

    init = (jnp.zeros((B,), jnp.float32), jnp.zeros(w.shape, jnp.float32) if grads else jnp.zeros((), jnp.float32))
    (sums, dw), dxs = jax.lax.scan(body, init, (xs, ts, ws, gs))
    if not grads:
        return sums
    dx = jnp.moveaxis(dxs, 0, 1).reshape(B, C * Tc, D)[:, :T]
    return sums, dx, dw.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _linear_ce_sum(x_BTD, w, targets_BT, weights_BT, rows, w_vd):
    return _run(x_BTD, w, targets_BT, weights_BT, rows, w_vd, grads=False).sum()


def _fwd(x_BTD, w, targets_BT, weights_BT, rows, w_vd):
    sums, dx, dw = _run(x_BTD, w, targets_BT, weights_BT, rows, w_vd, grads=True)
    return sums.sum(), (dx, dw)


def _bwd(rows, w_vd, res, g):
    dx, dw = res  # the weights are a mask, not trained: no cotangent for them or the integer targets
    return (dx * g.astype(dx.dtype), dw * g.astype(dw.dtype), None, None)


_linear_ce_sum.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _linear_ce_rows(x_BTD, w, targets_BT, weights_BT, rows, w_vd):
    return _run(x_BTD, w, targets_BT, weights_BT, rows, w_vd, grads=False)


def _rows_fwd(x_BTD, w, targets_BT, weights_BT, rows, w_vd):
    # each row's cotangent is known only in the backward: save the inputs, run the head a second time there
    return _run(x_BTD, w, targets_BT, weights_BT, rows, w_vd, grads=False), (x_BTD, w, targets_BT, weights_BT)


def _rows_bwd(rows, w_vd, res, g_B):
    x_BTD, w, targets_BT, weights_BT = res
    _, dx, dw = _run(x_BTD, w, targets_BT, weights_BT, rows, w_vd, grads=True, g_B=g_B)
    return dx, dw, None, None


_linear_ce_rows.defvjp(_rows_fwd, _rows_bwd)


def _check(name, x_BTD, w, targets_BT, weights_BT, w_layout, chunk_rows) -> int:
    if w_layout not in ("DV", "VD"):
        raise ValueError(f"{name}: w_layout={w_layout!r}; expected 'DV' or 'VD'")
    D = x_BTD.shape[-1]
    d_w = w.shape[1] if w_layout == "VD" else w.shape[0]
    if x_BTD.ndim != 3 or w.ndim != 2 or d_w != D or targets_BT.shape != x_BTD.shape[:2] \
            or weights_BT.shape != x_BTD.shape[:2]:
        raise ValueError(f"{name}: expected x [B, T, D], w [{'V, D' if w_layout == 'VD' else 'D, V'}], "
                         f"targets and weights [B, T]; got x {x_BTD.shape}, w {w.shape}, targets "
                         f"{targets_BT.shape}, weights {weights_BT.shape}")
    chunk_rows = CHUNK_ROWS if chunk_rows is None else chunk_rows
    if chunk_rows < 1:
        raise ValueError(f"{name}: chunk_rows={chunk_rows}; expected >= 1")
    return int(chunk_rows)


def linear_ce_rows(x_BTD, w, targets_BT, weights_BT, *, w_layout: str = "DV", chunk_rows: int | None = None):
    """[B] float32: for each row b, sum_t weights[b, t] * -log softmax(x[b, t] @ W)[targets[b, t]] (a sequence's
    negative log-likelihood, as DPO needs it). Arguments as linear_ce_sum. The backward runs the head over the chunks
    a second time (each row's cotangent is known only then); the forward alone, as for a frozen reference, is one
    pass."""
    rows = _check("linear_ce_rows", x_BTD, w, targets_BT, weights_BT, w_layout, chunk_rows)
    return _linear_ce_rows(x_BTD, w, targets_BT.astype(jnp.int32), weights_BT, rows, w_layout == "VD")


def linear_ce_sum(x_BTD, w, targets_BT, weights_BT, *, w_layout: str = "DV", chunk_rows: int | None = None):
    """sum_{b,t} weights[b, t] * -log softmax(x[b, t] @ W)[targets[b, t]] as a float32 scalar.

    x [B, T, D] (compute dtype), w the head kernel as [D, V] (w_layout="DV", an untied LMHead) or [V, D] ("VD", a
    tied embedding table), targets [B, T] int in [0, V), weights [B, T] (0 = not counted; any float). Differentiable
    in x and w; the logits are computed in float32 [B, Tc, V] blocks of about `chunk_rows` rows (None: CHUNK_ROWS).
    """
    rows = _check("linear_ce_sum", x_BTD, w, targets_BT, weights_BT, w_layout, chunk_rows)
    return _linear_ce_sum(x_BTD, w, targets_BT.astype(jnp.int32), weights_BT, rows, w_layout == "VD")
