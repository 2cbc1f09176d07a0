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


def _run(x_BTD, w, targets_BT, weights_BT, rows: int, w_vd: bool, grads: bool):
    B, T, D = x_BTD.shape
    Tc, C = _chunks(B, T, rows)
    xs, ts, ws = _split(x_BTD, Tc, C), _split(targets_BT, Tc, C), _split(weights_BT.astype(jnp.float32), Tc, C)

    def body(carry, chunk):
        loss, dw = carry
        # chunks stay [B, Tc] (B keeps its data sharding); inside, the chunk's B * Tc token rows are one axis (t), so dW
        # contracts over one dim and XLA:CPU does not transpose d (see jaxtx.layers.common.Dense)
        x_c, t_c, w_c = chunk[0].reshape(-1, D), chunk[1].reshape(-1), chunk[2].reshape(-1)
        logits = _logits(x_c, w, w_vd)  # [t, V] f32
        m = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
        lse = m[:, 0] + jnp.log(jnp.exp(logits - m).sum(-1))
        picked = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
        loss = loss + ((lse - picked) * w_c).sum()
        if not grads:
            return (loss, dw), None
        # d loss / d logits = (softmax - onehot(target)) * weight, one fused elementwise pass over the block
        hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == t_c[:, None]
        d = (jnp.exp(logits - lse[:, None]) - hit) * w_c[:, None]
        dx = jnp.einsum("tV,VD->tD" if w_vd else "tV,DV->tD", d.astype(w.dtype), w,
                        preferred_element_type=jnp.float32).astype(x_BTD.dtype)
        dw = dw + jnp.einsum("tD,tV->VD" if w_vd else "tD,tV->DV", x_c, d.astype(x_c.dtype),
                             preferred_element_type=jnp.float32)
        return (loss, dw), dx.reshape(B, Tc, D)

    init = (jnp.zeros((), jnp.float32), jnp.zeros(w.shape, jnp.float32) if grads else jnp.zeros((), jnp.float32))
    (loss, dw), dxs = jax.lax.scan(body, init, (xs, ts, ws))
    if not grads:
        return loss
    dx = jnp.moveaxis(dxs, 0, 1).reshape(B, C * Tc, D)[:, :T]
    return loss, dx, dw.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _linear_ce_sum(x_BTD, w, targets_BT, weights_BT, rows, w_vd):
    return _run(x_BTD, w, targets_BT, weights_BT, rows, w_vd, grads=False)


def _fwd(x_BTD, w, targets_BT, weights_BT, rows, w_vd):
    loss, dx, dw = _run(x_BTD, w, targets_BT, weights_BT, rows, w_vd, grads=True)
    return loss, (dx, dw)


def _bwd(rows, w_vd, res, g):
    dx, dw = res  # the weights are a mask, not trained: no cotangent for them or the integer targets
    return (dx * g.astype(dx.dtype), dw * g.astype(dw.dtype), None, None)


_linear_ce_sum.defvjp(_fwd, _bwd)


def linear_ce_sum(x_BTD, w, targets_BT, weights_BT, *, w_layout: str = "DV", chunk_rows: int | None = None):
    """sum_{b,t} weights[b, t] * -log softmax(x[b, t] @ W)[targets[b, t]] as a float32 scalar.

    x [B, T, D] (compute dtype), w the head kernel as [D, V] (w_layout="DV", an untied LMHead) or [V, D] ("VD", a
    tied embedding table), targets [B, T] int in [0, V), weights [B, T] (0 = not counted; any float). Differentiable
    in x and w; the logits are computed in float32 [B, Tc, V] blocks of about `chunk_rows` rows (None: CHUNK_ROWS).
    """
    if w_layout not in ("DV", "VD"):
        raise ValueError(f"linear_ce_sum: w_layout={w_layout!r}; expected 'DV' or 'VD'")
    D = x_BTD.shape[-1]
    d_w = w.shape[1] if w_layout == "VD" else w.shape[0]
    if x_BTD.ndim != 3 or w.ndim != 2 or d_w != D or targets_BT.shape != x_BTD.shape[:2] \
            or weights_BT.shape != x_BTD.shape[:2]:
        raise ValueError(f"linear_ce_sum: expected x [B, T, D], w [{'V, D' if w_layout == 'VD' else 'D, V'}], "
                         f"targets and weights [B, T]; got x {x_BTD.shape}, w {w.shape}, targets "
                         f"{targets_BT.shape}, weights {weights_BT.shape}")
    chunk_rows = CHUNK_ROWS if chunk_rows is None else chunk_rows
    if chunk_rows < 1:
        raise ValueError(f"linear_ce_sum: chunk_rows={chunk_rows}; expected >= 1")
    return _linear_ce_sum(x_BTD, w, targets_BT.astype(jnp.int32), weights_BT, int(chunk_rows), w_layout == "VD")
