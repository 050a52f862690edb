"""The gated delta rule: a step-by-step reference and the chunked parallel form, in pure PyTorch.

Shapes: q, k [B, H, T, Dk]; v [B, H, T, Dv]; beta, g [B, H, T]; state S [B, H, Dk, Dv]. Per head:

    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,      out_t = S_t^T q_t

with g_t <= 0 the log-decay (g = 0: the plain delta rule) and beta_t in (0, 1). Nothing is scaled or
normalised here: the layer L2-normalises q and k and scales q. Both functions return (out [B, H, T, Dv],
final state [B, H, Dk, Dv]); a missing initial state is zeros.

The chunked form (docs/deltanet.md has the derivation) cuts time into chunks of C steps. Within a chunk,
with G_t the cumulative sum of g from the chunk's start and S the state entering the chunk, the
delta-rule updates u_t (S_C = exp(G_C) S + sum_i exp(G_C - G_i) k_i u_i^T) solve a unit lower-triangular
system (the UT transform of the WY representation):

    (I + L) U = diag(beta) V - diag(beta exp(G)) K S,     L_ti = beta_t exp(G_t - G_i) k_t.k_i  (i < t)

so U = U_v - W S with U_v, W from one triangular solve per chunk, computed for all chunks at once. Only
the state is carried across chunks, by a loop over chunks (not over tokens). Every decay is
exp(G_t - G_i) with i <= t, i.e. exp of a sum of g's <= 0, computed in log space and masked to -inf
above the diagonal before the exp: nothing overflows, however long the chunk or strong the decay.
"""

import torch
import torch.nn.functional as F


def delta_rule_reference(q, k, v, beta, g, state=None):
    """The recurrence as written, one time step after another (the definition the tests compare against)."""
    batch, heads, length, dk = q.shape
    dv = v.shape[-1]
    if state is None:
        state = q.new_zeros(batch, heads, dk, dv)
    outs = []
    for t in range(length):
        k_t, v_t = k[:, :, t], v[:, :, t]
        decayed = torch.exp(g[:, :, t])[..., None, None] * state
        recalled = (decayed.transpose(-1, -2) @ k_t[..., None]).squeeze(-1)  # [B, H, Dv]
        u_t = beta[:, :, t, None] * (v_t - recalled)
        state = decayed + k_t[..., :, None] @ u_t[..., None, :]  # rank-1 update, as a matmul
        outs.append((state.transpose(-1, -2) @ q[:, :, t, :, None]).squeeze(-1))
    return torch.stack(outs, dim=2), state


def _pad_time(x, pad):
    """Zeros appended along the time axis (dimension 2) of a [B, H, T, ...] tensor."""
    if pad == 0:
        return x
    widths = [0, 0] * (x.dim() - 3) + [0, pad]
    return F.pad(x, widths)


def delta_rule_chunked(q, k, v, beta, g, state=None, chunk_size=64):
    """The same recurrence in chunks of `chunk_size` steps: parallel within a chunk, a loop across chunks.

    Any length works: the sequence is padded to whole chunks with k = v = q = 0, beta = 0, g = 0, which
    leave the state unchanged; the padded outputs are dropped.
    """
    batch, heads, length, dk = q.shape
    dv = v.shape[-1]
    if state is None:
        state = q.new_zeros(batch, heads, dk, dv)
    if length == 0:
        return v.new_zeros(batch, heads, 0, dv), state
    size = min(chunk_size, length)
    pad = (-length) % size
    n = (length + pad) // size
    q, k, v = (_pad_time(x, pad).reshape(batch, heads, n, size, x.shape[-1]) for x in (q, k, v))
    beta, g = (_pad_time(x, pad).reshape(batch, heads, n, size) for x in (beta, g))

    cum = g.cumsum(-1)  # G_t within each chunk, [B, H, N, C]
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    # exp(G_t - G_i) for i <= t, 0 above the diagonal (masked in log space, before the exp)
    decay = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")))
    strictly_lower = decay.tril(-1)

    # The UT transform: (I + L) [U_v, W] = [diag(beta) V, diag(beta exp(G)) K], for all chunks at once
    system = (
        torch.eye(size, dtype=q.dtype, device=q.device)
        + beta[..., :, None] * (k @ k.transpose(-1, -2)) * strictly_lower
    )
    rhs = torch.cat([beta[..., None] * v, (beta * cum.exp())[..., None] * k], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u_v, w = solved[..., :dv], solved[..., dv:]

    scores = (q @ k.transpose(-1, -2)) * decay  # intra-chunk attention, [B, H, N, C, C]
    q_decayed = q * cum.exp()[..., None]  # reads the entering state: exp(G_t) q_t
    last = cum[..., -1:]  # G_C
    k_to_end = k * torch.exp(last - cum)[..., None]  # exp(G_C - G_i) k_i
    chunk_decay = last.exp()[..., None]  # exp(G_C), [B, H, N, 1, 1]

    outs = []
    # unbind, not [:, :, c]: indexing in a loop would make backward build N full-size gradients
    per_chunk = (t.unbind(2) for t in (u_v, w, q_decayed, scores, k_to_end, chunk_decay))
    for u_v_c, w_c, q_c, scores_c, k_c, decay_c in zip(*per_chunk):
        u = u_v_c - w_c @ state
        outs.append(q_c @ state + scores_c @ u)
        state = decay_c * state + k_c.transpose(-1, -2) @ u
    out = torch.stack(outs, dim=2).reshape(batch, heads, n * size, dv)
    return out[:, :, :length], state
