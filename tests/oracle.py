"""Float64 NumPy oracles, written independently of jattn (no shared code with jattn.reference).

Attention returns probabilities too, and `attention_vjp` is the textbook backward, so gradients
are checked against formulas rather than against JAX's autodiff of the same code.
"""

import numpy as np


def _broadcast_4d(x, shape):
    x = np.asarray(x)
    return np.broadcast_to(x.reshape((1,) * (4 - x.ndim) + x.shape), shape)


def attention_visibility(
    batch,
    heads,
    q_len,
    kv_len,
    *,
    mask=None,
    is_causal=False,
    q_offset=None,
    window=None,
    q_lengths=None,
    kv_lengths=None,
    segment_ids=None,
):
    """[B, N, T, S] bool: which key each query may see."""
    visible = np.ones((batch, heads, q_len, kv_len), bool)
    offset = np.zeros(batch, int) if q_offset is None else np.broadcast_to(q_offset, (batch,))
    for b in range(batch):
        for i in range(q_len):
            pos = i + offset[b]
            for j in range(kv_len):
                ok = True
                if is_causal and j > pos:
                    ok = False
                if window is not None and not (pos - window[0] <= j <= pos + window[1]):
                    ok = False
                if q_lengths is not None and i >= q_lengths[b]:
                    ok = False
                if kv_lengths is not None and j >= kv_lengths[b]:
                    ok = False
                if segment_ids is not None and segment_ids[0][b, i] != segment_ids[1][b, j]:
                    ok = False
                visible[b, :, i, j] = ok
    if mask is not None:
        visible &= _broadcast_4d(mask, visible.shape)
    return visible


def attention(q, k, v, bias=None, *, scale=None, soft_cap=None, visible=None):
    """Returns out [B,T,N,H], lse [B,T,N], and the pieces the backward needs."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_len, heads, dim = q.shape
    groups = heads // k.shape[2]
    k_rep, v_rep = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scale = dim**-0.5 if scale is None else scale
    s = scale * np.einsum("btnh,bsnh->bnts", q, k_rep)
    x = s if soft_cap is None else soft_cap * np.tanh(s / soft_cap)
    if bias is not None:
        x = x + _broadcast_4d(np.asarray(bias, np.float64), x.shape)
    if visible is None:
        visible = np.ones(x.shape, bool)
    has_keys = visible.any(-1, keepdims=True)
    x_masked = np.where(visible, x, -np.inf)
    m = np.where(has_keys, x_masked.max(-1, keepdims=True), 0.0)
    p = np.where(visible, np.exp(x_masked - m), 0.0)
    total = p.sum(-1, keepdims=True)
    p = p / np.where(has_keys, total, 1.0)
    out = np.einsum("bnts,bsnh->btnh", p, v_rep)
    lse = np.where(has_keys, m + np.log(np.where(has_keys, total, 1.0)), -np.inf)[..., 0]
    cache = dict(
        q=q, k_rep=k_rep, v_rep=v_rep, s=s, p=p, scale=scale, soft_cap=soft_cap, groups=groups
    )
    return out, lse.transpose(0, 2, 1), cache


def attention_vjp(cache, d_out, d_lse=None, bias_shape=None):
    """Textbook backward: dq, dk, dv (and dbias reduced to bias_shape)."""
    p, v_rep, k_rep, q = cache["p"], cache["v_rep"], cache["k_rep"], cache["q"]
    d_out = np.asarray(d_out, np.float64)
    d_v_rep = np.einsum("bnts,btnh->bsnh", p, d_out)
    d_p = np.einsum("btnh,bsnh->bnts", d_out, v_rep)
    d_x = p * (d_p - (d_p * p).sum(-1, keepdims=True))
    if d_lse is not None:
        d_x = d_x + p * np.asarray(d_lse, np.float64).transpose(0, 2, 1)[..., None]
    d_s = d_x
    if cache["soft_cap"] is not None:
        d_s = d_x * (1 - np.tanh(cache["s"] / cache["soft_cap"]) ** 2)
    d_s = d_s * cache["scale"]
    d_q = np.einsum("bnts,bsnh->btnh", d_s, k_rep)
    d_k_rep = np.einsum("bnts,btnh->bsnh", d_s, q)

    def ungroup(x):
        b, s, n, h = x.shape
        return x.reshape(b, s, n // cache["groups"], cache["groups"], h).sum(3)

    d_bias = None
    if bias_shape is not None:
        shape4 = (1,) * (4 - len(bias_shape)) + tuple(bias_shape)
        axes = tuple(i for i, n in enumerate(shape4) if n == 1 and d_x.shape[i] != 1)
        d_bias = d_x.sum(axis=axes, keepdims=True).reshape(bias_shape)
    return d_q, ungroup(d_k_rep), ungroup(d_v_rep), d_bias


def tssa(w, temperature, *, causal=False, denom_bias=None):
    """Token Statistics Self-Attention, transcribed from the official ToST code, token by token."""
    w = np.asarray(w, np.float64)
    batch, q_len, heads, dim = w.shape
    t = np.asarray(temperature, np.float64)
    y = np.zeros_like(w)
    for b in range(batch):
        x = w[b].transpose(1, 0, 2)  # [N, T, H] as the torch code holds it (b h n d)
        if causal:
            sq = x**2
            denom = np.maximum(np.cumsum(sq, axis=1), 1e-12)
            normed = sq / denom
            if denom_bias is not None:
                normed = normed + np.asarray(denom_bias, np.float64)[:, :q_len, None]
            logits = normed.sum(-1) * t[:, None]  # [N, T]
            pi = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
            dots = np.cumsum(sq * pi[..., None], axis=1) / (np.cumsum(pi, axis=1) + 1e-8)[..., None]
        else:
            norm = np.maximum(np.sqrt((x**2).sum(1, keepdims=True)), 1e-12)  # F.normalize, dim=-2
            logits = ((x / norm) ** 2).sum(-1) * t[:, None]
            pi = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
            pi_normed = pi / (pi.sum(-1, keepdims=True) + 1e-8)
            dots = np.einsum("nt,nth->nh", pi_normed, x**2)[:, None, :]
        out = -(x * pi[..., None]) / (1 + dots)
        y[b] = out.transpose(1, 0, 2)
    return y


def decode(q, k_cache, v_cache, lengths, *, scale=None):
    """[B, N, H] and lse [B, N]: one query per sequence against its first lengths[b] entries."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k_cache, v_cache))
    batch, heads, dim = q.shape
    groups = heads // k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    out = np.zeros((batch, heads, dim))
    lse = np.full((batch, heads), -np.inf)
    for b in range(batch):
        n_keys = int(lengths[b])
        if n_keys == 0:
            continue
        for n in range(heads):
            logits = scale * k[b, :n_keys, n // groups] @ q[b, n]
            m = logits.max()
            e = np.exp(logits - m)
            out[b, n] = e @ v[b, :n_keys, n // groups] / e.sum()
            lse[b, n] = m + np.log(e.sum())
    return out, lse


def segment_softmax(logits, segment_ids, num_segments):
    logits = np.asarray(logits, np.float64)
    out = np.zeros_like(logits)
    for seg in range(num_segments):
        rows = np.flatnonzero(segment_ids == seg)
        if rows.size == 0:
            continue
        x = logits[rows]
        finite = np.isfinite(x).any(0)
        m = np.where(finite, np.where(np.isfinite(x), x, -np.inf).max(0), 0.0)
        e = np.exp(x - m)
        total = e.sum(0)
        out[rows] = np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.0)
    return out
