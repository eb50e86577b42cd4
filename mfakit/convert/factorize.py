"""The factorization math: one source attention layer (plus the second moment of its input) in, MFA weights out.

Pure functions on tensors; no I/O, no progress bars, and no device of their own: every tensor is made on the
device of the inputs (`new_zeros`, `device=`), never on the default device, so the math runs wherever the
calibration ran (`--device cuda`: on the GPU). Statistics, eigenproblems and solves are in float64;
the per-head query rows (h, C, d1) and output columns (d, h, C) of a converted layer are in float32
(PER_HEAD_DTYPE): they grow with heads times latent width (one hidden-4096 layer at C = 1024: 0.5 GB each in float32) and are only ever products
of float64 factors, rounded once, well above the precision of the checkpoints they are written to.

Notation for one layer: attention input x in R^d, augmented with a constant 1 so that biases are ordinary weight
columns (x~ = [x; 1], d1 = d + 1); Sigma = E[x~ x~^T] (d1 x d1) from calibration text. The source has h query heads and
g key/value heads of width d_h; query head i reads key/value head j(i) = i // (h / g).

Canonical RoPE layout (what the adapters produce): in each head, channels t and t + P (t < P, P = number of rotary
pairs) form a pair rotating at frequency theta_t; channels 2P..d_h-1 carry no position (NoPE). Writing a pair as the
complex number z = x_t + i x_{t+P}, RoPE multiplies z by e^{i p theta_t}, and the pair's share of q.k is
Re(z_q conj(z_k) e^{i (p_q - p_k) theta_t}). A complex-linear map that mixes pairs of one frequency commutes with RoPE,
so a pair is written here as one complex row c (d1,): its value is c . x~.

The MFA latent of width C uses the same layout over the whole latent: channels p and p + C/2 are a pair rotating at
rope_freqs[p] (0: NoPE).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

Tensor = torch.Tensor
EIG_RTOL = 1e-10  # eigen-directions below this fraction of the largest carry nothing and are never chosen
PER_HEAD_DTYPE = torch.float32  # the per-head query rows and output columns: the layer's largest tensors
PER_HEAD_COMPLEX = torch.complex64


@dataclass
class SourceAttention:
    """One source attention layer in canonical form (float64).

    wq: (h, d_h, d1), wk: (g, d_h, d1), wv: (g, d_v, d1): projection rows, bias in the last column.
    wo: (d, h, d_v): output projection, per head. bo: (d,) or None.
    rope_freqs: (P,) rotary frequencies; channels t, t + P are pair t; channels >= 2P are NoPE.
    scale: softmax scale. The flags say which source projections carry a bias.
    """

    wq: Tensor
    wk: Tensor
    wv: Tensor
    wo: Tensor
    bo: Tensor | None
    rope_freqs: Tensor
    scale: float
    q_bias: bool = False
    k_bias: bool = False
    v_bias: bool = False

    @property
    def num_heads(self) -> int:
        return self.wq.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.wk.shape[0]

    @property
    def group(self) -> Tensor:
        """j(i) for every query head i."""
        return torch.arange(self.num_heads, device=self.wq.device) // (self.num_heads // self.num_kv_heads)

    @property
    def num_pairs(self) -> int:
        return self.rope_freqs.shape[0]

    def without_weights(self) -> SourceAttention:
        """The same attention with its projections on the meta device (shapes, flags and bias kept): what a
        converted layer still needs of its source once factorized, without the float64 weights."""
        meta = {k: getattr(self, k).to("meta") for k in ("wq", "wk", "wv", "wo")}
        return replace(self, **meta)

    def key_pairs(self) -> Tensor:
        """Complex key rows (g, P, d1)."""
        P = self.num_pairs
        return torch.complex(self.wk[:, :P], self.wk[:, P : 2 * P])

    def query_pairs(self) -> Tensor:
        """Complex query rows (h, P, d1)."""
        P = self.num_pairs
        return torch.complex(self.wq[:, :P], self.wq[:, P : 2 * P])


@dataclass
class Latent:
    """The channels of a latent before layout: complex RoPE pairs and real NoPE channels, with what reads them.

    pair_rows: (n_p, d1) complex, pair_freqs: (n_p,), real_rows: (n_r, d1): encoder rows.
    q_pair_rows: (h, n_p, d1) complex, q_real_rows: (h, n_r, d1): the query rows of every head that meet them
    (PER_HEAD_COMPLEX and PER_HEAD_DTYPE).
    """

    pair_rows: Tensor
    pair_freqs: Tensor
    real_rows: Tensor
    q_pair_rows: Tensor
    q_real_rows: Tensor

    @property
    def width(self) -> int:
        """Channels needed: two per pair, one per real channel, rounded up to even."""
        n = 2 * self.pair_rows.shape[0] + self.real_rows.shape[0]
        return n + n % 2


@dataclass
class MFALayer:
    """One converted layer: float64, but wq and wo in PER_HEAD_DTYPE.

    wq: (h, C, d1) per-head query rows; wk: (C, d1) key latent rows; wv: (v_dim, d1) value rows (MFA) or None
    (MFA-KR: the value is the pre-RoPE key latent); wo: (d, h, v_dim) output projection reading the value (MFA-KR:
    the latent); bo: (d,) or None; rope_freqs: (C/2,); scale: softmax scale. readout_factors: (W_O (d, h, dv),
    R (h, dv, v_dim)) with wo[:, i] = W_O[:, i] R[i], while the output projection is the factorization's product of
    the source's with the values' reconstruction (the refit's residual is cheaper from them); None otherwise.
    """

    wq: Tensor
    wk: Tensor
    wv: Tensor | None
    wo: Tensor
    bo: Tensor | None
    rope_freqs: Tensor
    scale: float
    readout_factors: tuple[Tensor, Tensor] | None = None

    @property
    def kv_dim(self) -> int:
        return self.wk.shape[0]

    @property
    def v_dim(self) -> int:
        return self.wk.shape[0] if self.wv is None else self.wv.shape[0]


def latent_slots(n_pairs: int, n_real: int, width: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Where the channels of a latent land: (real part of each pair, imaginary part of each pair, each real
    channel), as indices on `device`. Pair p takes slots p and p + width/2; real channels fill the remaining slots,
    real halves first."""
    half = width // 2
    if 2 * n_pairs + n_real > width:
        raise ValueError(f"{n_pairs} pairs and {n_real} real channels do not fit in width {width}")
    re = torch.arange(n_pairs, device=device)
    free = torch.cat([torch.arange(n_pairs, half, device=device), torch.arange(half + n_pairs, width, device=device)])
    return re, re + half, free[:n_real]


def place_channels(lat: Latent, width: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Real key rows (C, d1), query rows (h, C, d1) and RoPE table (C/2,) of a latent (unused slots are zero)."""
    width = lat.width if width is None else width
    n_p = lat.pair_rows.shape[0]
    re, im, real = latent_slots(n_p, lat.real_rows.shape[0], width, lat.real_rows.device)
    d1 = lat.real_rows.shape[1]
    wk = lat.real_rows.new_zeros(width, d1)
    wk[re], wk[im], wk[real] = lat.pair_rows.real, lat.pair_rows.imag, lat.real_rows
    h = lat.q_real_rows.shape[0]
    wq = lat.q_real_rows.new_zeros(h, width, d1)
    wq[:, re], wq[:, im], wq[:, real] = lat.q_pair_rows.real, lat.q_pair_rows.imag, lat.q_real_rows
    freqs = lat.pair_freqs.new_zeros(width // 2)
    freqs[:n_p] = lat.pair_freqs
    return wk, wq, freqs


def exact_value_readout(src: SourceAttention, value_slots: Tensor, width: int) -> Tensor:
    """Output projection (d, h, width) that reads head j(i)'s values from the given latent slots (g*d_v of them)."""
    d, h, dv = src.wo.shape
    wo = src.wo.new_zeros(d, h, width, dtype=PER_HEAD_DTYPE)
    for i, j in enumerate(src.group.tolist()):
        wo[:, i, value_slots[j * dv : (j + 1) * dv]] = src.wo[:, i].to(PER_HEAD_DTYPE)
    return wo


def exact_key_latent(src: SourceAttention) -> Latent:
    """The g key heads stacked, each pair keeping its frequency; query head i sits in group j(i)'s slice."""
    g, h, P = src.num_kv_heads, src.num_heads, src.num_pairs
    d1 = src.wk.shape[2]
    q_pairs = src.query_pairs()
    q_nope = src.wq[:, 2 * P :]
    n_nope = q_nope.shape[1]
    q_pair_rows = src.wq.new_zeros(h, g, P, d1, dtype=PER_HEAD_COMPLEX)
    q_real_rows = src.wq.new_zeros(h, g, n_nope, d1, dtype=PER_HEAD_DTYPE)
    for i, j in enumerate(src.group.tolist()):
        q_pair_rows[i, j], q_real_rows[i, j] = q_pairs[i], q_nope[i]
    return Latent(
        pair_rows=src.key_pairs().reshape(g * P, d1),
        pair_freqs=src.rope_freqs.repeat(g),
        real_rows=src.wk[:, 2 * P :].reshape(g * n_nope, d1),
        q_pair_rows=q_pair_rows.reshape(h, g * P, d1),
        q_real_rows=q_real_rows.reshape(h, g * n_nope, d1),
    )


def exact_mfa(src: SourceAttention) -> MFALayer:
    """Exact MFA embedding of a GQA/MHA layer, C = g * d_h.

    Key latent = the g key heads stacked; value latent = the g value heads stacked; output head i reads only slice
    j(i) of the value latent through W_O^i. Logits and outputs equal the source's.
    """
    wk, wq, freqs = place_channels(exact_key_latent(src))
    wv = src.wv.reshape(-1, src.wv.shape[2]).clone()
    wo = exact_value_readout(src, torch.arange(wv.shape[0], device=wv.device), wv.shape[0])
    return MFALayer(wq=wq, wk=wk, wv=wv, wo=wo, bo=src.bo, rope_freqs=freqs, scale=src.scale)


def with_value_channels(keys: Latent, values: Tensor) -> Latent:
    """An MFA-KR latent: the key channels, then value-only real channels (rows (n_v, d1)) that no query meets."""
    h, d1 = keys.q_real_rows.shape[0], values.shape[1]
    return Latent(
        pair_rows=keys.pair_rows,
        pair_freqs=keys.pair_freqs,
        real_rows=torch.cat([keys.real_rows, values]),
        q_pair_rows=keys.q_pair_rows,
        q_real_rows=torch.cat([keys.q_real_rows, values.new_zeros(h, values.shape[0], d1, dtype=PER_HEAD_DTYPE)], 1),
    )


def exact_mfa_kr(src: SourceAttention) -> MFALayer:
    """Exact MFA-KR embedding, C = g * (d_h + d_v): latent = [key pairs, NoPE key channels, value channels].

    Queries are zero on the value channels; output heads read only the value channels of the pre-RoPE latent.
    """
    keys = exact_key_latent(src)
    lat = with_value_channels(keys, src.wv.reshape(-1, src.wv.shape[2]))
    wk, wq, freqs = place_channels(lat)
    _, _, real = latent_slots(lat.pair_rows.shape[0], lat.real_rows.shape[0], wk.shape[0], wk.device)
    wo = exact_value_readout(src, real[keys.real_rows.shape[0] :], wk.shape[0])
    return MFALayer(wq=wq, wk=wk, wv=None, wo=wo, bo=src.bo, rope_freqs=freqs, scale=src.scale)


def fold_qk_norm(rows: Tensor, gamma: Tensor, eps: float, x: Tensor) -> Tensor:
    """Approximate an RMS norm applied to projected queries or keys by a fixed gain folded into the rows.

    rows: (n, d_h, d1) projection rows of n heads; gamma: (d_h,) a per-head norm (Qwen3) or (n * d_h,) one norm over
    the whole projection (OLMo-2); x: (N, d) calibration inputs. The norm maps y to gamma * y / rms(y); it is
    replaced by gamma * c * y with c per normalised group the least-squares gain over the calibration tokens,
    c = sum_t <gamma y_t / rms_t, gamma y_t> / sum_t |gamma y_t|^2. Exact when every token's rms is the same.
    """
    n, dh, d1 = rows.shape
    per_head = gamma.shape[0] == dh
    y = torch.cat([x, x.new_ones(x.shape[0], 1)], 1) @ rows.reshape(n * dh, d1).T
    y = y.reshape(-1, n, dh) if per_head else y.reshape(-1, 1, n * dh)
    scaled = gamma * y
    inv_rms = torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    gain = (scaled.pow(2) * inv_rms).sum((0, 2)) / scaled.pow(2).sum((0, 2)).clamp_min(torch.finfo(y.dtype).tiny)
    gains = gain.repeat_interleave(dh) if per_head else gain.expand(n * dh)
    factor = gamma.repeat(n) if per_head else gamma
    return rows * (factor * gains).reshape(n, dh, 1)


def nope_low_frequencies(src: SourceAttention, max_angle: float, context: int) -> SourceAttention:
    """Treat the RoPE pairs that turn by at most `max_angle` radians over `context` tokens as NoPE channels.

    Such a pair barely rotates within the context, so dropping its rotation costs little, and as NoPE channels the
    pairs of all these frequencies (and, in MFA-KR, the values) can be mixed freely by one real PCA. Only used below
    the exact budget; the pairs' true frequencies are gone from the converted layer's table (they read 0).
    """
    keep = int((src.rope_freqs * context > max_angle).sum())
    if keep == src.num_pairs:
        return src
    if not bool((src.rope_freqs[:keep] * context > max_angle).all()):
        raise ValueError("RoPE frequencies must decrease along the pairs")
    P = src.num_pairs
    order = [
        *range(keep),
        *range(P, P + keep),
        *range(keep, P),
        *range(P + keep, 2 * P),
        *range(2 * P, src.wk.shape[1]),
    ]
    idx = torch.tensor(order, device=src.wq.device)
    return replace(src, wq=src.wq[:, idx], wk=src.wk[:, idx], rope_freqs=src.rope_freqs[:keep])


# ---------------------------------------------------------------------------------------------------------------
# Keys under a budget: per-frequency weighted complex PCA


@dataclass
class KeyGroup:
    """The principal components of one key group: a RoPE frequency (complex) or the NoPE channels (real).

    freq: the group's frequency (0 for NoPE). gains: (n,) descending: the query-weighted key energy each component
    keeps (the logit error it removes, up to a constant). enc: (n, n_var) coefficients on the group's variables (a
    complex pair of each key head, or the real NoPE channels of all key heads); dec: (n_var, n) the least-squares
    reconstruction of the variables from the components.
    """

    freq: float
    is_complex: bool
    gains: Tensor
    enc: Tensor
    dec: Tensor

    @property
    def cost(self) -> int:
        """Latent channels one component takes."""
        return 2 if self.is_complex else 1


def query_energy(src: SourceAttention, sigma: Tensor) -> Tensor:
    """E[q_{i,c}^2] for every query head and channel, (h, d_h)."""
    return torch.einsum("hcd,de,hce->hc", src.wq, sigma, src.wq)


def _weighted_pca(cov: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted PCA of n_var variables y (real or complex) with covariance cov = E[y y^H] (n_var, n_var) and
    weights (n_var,) >= 0.

    M = W^{1/2} E[y y^H] W^{1/2} = V diag(lam) V^H. Component k is l_k = sum_v conj(V_vk) sqrt(w_v) y_v; it keeps
    lam_k of the weighted energy. The reconstruction y ~ R l with R = E[y l^H] E[l l^H]^{-1} = E[y y^H] W^{1/2} V
    diag(1/lam) is the least-squares one. Returns (lam (n,), enc (n, n_var), R (n_var, n)), lam descending, with
    the directions that carry nothing (lam below EIG_RTOL of the largest) left out.
    """
    root_w = weights.clamp_min(0).sqrt().to(cov.dtype)
    lam, vec = torch.linalg.eigh(root_w[:, None] * cov * root_w[None, :])
    lam, vec = lam.flip(0), vec.flip(1)
    keep = lam > EIG_RTOL * lam[0].clamp_min(torch.finfo(lam.dtype).tiny)
    lam, vec = lam[keep], vec[:, keep]
    enc = vec.conj().T * root_w[None, :]
    dec = (cov * root_w[None, :]) @ vec / lam.to(cov.dtype)[None, :]
    return lam, enc, dec


def key_spectrum(src: SourceAttention, sigma: Tensor, kv_sigma: Tensor) -> list[KeyGroup]:
    """Per-frequency key PCA, weighted by the query energy each key head meets.

    For frequency t the variables are the g complex key pairs z_{j,t} = a_{j,t} + i b_{j,t} (channels t and
    P + t); group j is weighted by w_{j,t} = sum_{i in j} E|z_{q,i,t}|^2, since a key error e_j costs
    E|Re(z_q conj(e_j) e^{i phi})|^2 = 1/2 w_{j,t} |e_j|^2 on average over the relative phase phi. The NoPE
    channels of all key heads form one real group, weighted the same way per channel. Every covariance is a block
    of the real key covariance K = W_k Sigma_kv W_k^T ((g d_h)^2, one product):
    E[z_j conj(z_k)] = K_aa + K_bb + i (K_ba - K_ab). The query energies come from `sigma` (every query counts
    alike), the key covariance from `kv_sigma` (the keys' second moment, attention-weighted or `sigma` itself).
    """
    g, P, dh = src.num_kv_heads, src.num_pairs, src.wk.shape[1]
    energy = query_energy(src, sigma)
    group = src.group
    heads_per_group = energy.new_zeros(g, src.num_heads)
    heads_per_group[group, torch.arange(src.num_heads, device=energy.device)] = 1.0
    pair_w = heads_per_group @ (energy[:, :P] + energy[:, P : 2 * P])  # (g, P)
    rows = src.wk.reshape(g * dh, -1)
    cov = (rows @ kv_sigma.to(rows.dtype) @ rows.T).reshape(g, dh, g, dh)
    groups = []
    for t, freq in enumerate(src.rope_freqs.tolist()):
        a, b = t, P + t
        pair_cov = torch.complex(cov[:, a, :, a] + cov[:, b, :, b], cov[:, b, :, a] - cov[:, a, :, b])
        lam, enc, dec = _weighted_pca(pair_cov, pair_w[:, t])
        groups.append(KeyGroup(freq, True, lam, enc, dec))
    if dh > 2 * P:
        nope_w = (heads_per_group @ energy[:, 2 * P :]).reshape(-1)
        nope_cov = cov[:, 2 * P :, :, 2 * P :].reshape(g * (dh - 2 * P), g * (dh - 2 * P))
        lam, enc, dec = _weighted_pca(nope_cov, nope_w)
        groups.append(KeyGroup(0.0, False, lam, enc, dec))
    return groups


def choose_components(groups: list[KeyGroup], n_channels: int) -> list[int]:
    """How many leading components of each group to keep within n_channels latent channels so that the summed kept
    energy is largest (a knapsack with costs 2 for a pair, 1 for a real channel, solved exactly).

    Each group's gains are sorted, so the best k pairs are the k largest pair gains over all complex groups (a
    prefix of every group), and the best m real channels the m largest real gains; the optimum is the best of the
    splits 2k + m <= n_channels, found in one pass over k.
    """

    def ranked(is_complex: bool) -> list[tuple[float, int]]:
        # A stable sort on the gain alone keeps each group's components in order where gains tie.
        found = [(g, idx) for idx, gr in enumerate(groups) if gr.is_complex == is_complex for g in gr.gains.tolist()]
        return sorted(found, key=lambda c: -c[0])

    pairs, reals = ranked(True), ranked(False)
    pair_sums, real_sums = [0.0], [0.0]
    for gain, _ in pairs:
        pair_sums.append(pair_sums[-1] + gain)
    for gain, _ in reals:
        real_sums.append(real_sums[-1] + gain)
    best_k = max(
        range(min(len(pairs), n_channels // 2) + 1),
        key=lambda k: pair_sums[k] + real_sums[min(len(reals), n_channels - 2 * k)],
    )
    counts = [0] * len(groups)
    for _, idx in pairs[:best_k] + reals[: min(len(reals), n_channels - 2 * best_k)]:
        counts[idx] += 1
    return counts


def key_latent(src: SourceAttention, groups: list[KeyGroup], counts: list[int]) -> Latent:
    """The latent of the chosen key components and the query rows that meet them.

    Pair component k of frequency t: key row sum_j enc_kj z_{k,j,t}; query head i meets it with
    conj(dec_{j(i),k}) z_{q,i,t}, which reproduces Re(z_q conj(z_k-hat) e^{i phi}) for the reconstruction z_k-hat =
    dec l. NoPE components alike with real rows.
    """
    P, h, d1 = src.num_pairs, src.num_heads, src.wk.shape[2]
    keys, queries = src.key_pairs(), src.query_pairs()
    group = src.group
    pair_counts = [n for gr, n in zip(groups, counts, strict=True) if gr.is_complex]
    pair_rows = keys.new_zeros(sum(pair_counts), d1)
    pair_freqs = src.rope_freqs.new_zeros(sum(pair_counts))
    q_pairs = queries.new_zeros(h, sum(pair_counts), d1, dtype=PER_HEAD_COMPLEX)
    real_rows = src.wk.new_zeros(0, d1)
    q_reals = src.wq.new_zeros(h, 0, d1, dtype=PER_HEAD_DTYPE)
    start = 0
    # key_spectrum lists the RoPE pairs first, in pair order, so group t of a complex group is pair t; the one real
    # (NoPE) group, if any, comes last.
    for t, (gr, n) in enumerate(zip(groups, counts, strict=True)):
        if n == 0:
            continue
        enc, dec = gr.enc[:n], gr.dec[:, :n]
        if gr.is_complex:
            block = slice(start, start + n)
            pair_rows[block] = enc @ keys[:, t]
            pair_freqs[block] = gr.freq
            q_pairs[:, block] = dec.conj()[group][:, :, None] * queries[:, t][:, None, :]
            start += n
        else:
            nope = src.wk[:, 2 * P :]
            g, n_nope, _ = nope.shape
            real_rows = enc @ nope.reshape(g * n_nope, d1)
            dec = dec.reshape(g, n_nope, n)[group]  # (h, n_nope, n)
            q_reals = torch.einsum("hck,hcd->hkd", dec.to(PER_HEAD_DTYPE), src.wq[:, 2 * P :].to(PER_HEAD_DTYPE))
    return Latent(
        pair_rows=pair_rows, pair_freqs=pair_freqs, real_rows=real_rows, q_pair_rows=q_pairs, q_real_rows=q_reals
    )


# ---------------------------------------------------------------------------------------------------------------
# Values under a budget: whitened PCA, least-squares readout


def _sym_sqrt(m: Tensor) -> Tensor:
    lam, vec = torch.linalg.eigh(m)
    return (vec * lam.clamp_min(0).sqrt()) @ vec.T


def value_metric(src: SourceAttention) -> Tensor:
    """G = blockdiag_j(sum_{i in j} W_O^i^T W_O^i), (g*d_v, g*d_v): the output energy a value error causes."""
    g, dv = src.num_kv_heads, src.wv.shape[1]
    G = src.wo.new_zeros(g * dv, g * dv)
    for i, j in enumerate(src.group.tolist()):
        block = slice(j * dv, (j + 1) * dv)
        G[block, block] += src.wo[:, i].T @ src.wo[:, i]
    return G


def value_rows(src: SourceAttention, sigma: Tensor, n: int, basis: Tensor | None = None) -> Tensor:
    """Encoder rows (n, d1) of n value channels: the principal directions of the output-whitened values
    v~ = G^{1/2} v, after least-squares regression on the channels `basis` (rows (m, d1)) when given, since those are
    in the latent already (MFA-KR: the pre-RoPE key channels are values too)."""
    wv = src.wv.reshape(-1, src.wv.shape[2])
    target = _sym_sqrt(value_metric(src)) @ wv
    if basis is not None and basis.shape[0]:
        target = target - ls_readout(target, basis, sigma) @ basis
    lam, vec = torch.linalg.eigh(target @ sigma @ target.T)
    top = vec[:, lam.argsort(descending=True)[:n]]
    return top.T @ target


def ls_readout(target: Tensor, enc: Tensor, sigma: Tensor, ridge: float = 1e-9) -> Tensor:
    """Least-squares reconstruction R (m, n) of the variables target . x~ (rows (m, d1)) from the channels
    enc . x~ (rows (n, d1)): R = T Sigma E^T (E Sigma E^T)^{-1}, with a tiny relative ridge for rank-deficient E."""
    enc_sigma = enc @ sigma  # once for both products: it is the costly one (n x d1 x d1)
    gram = enc_sigma @ enc.T
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    gram = gram + ridge * gram.diagonal().mean().clamp_min(1e-30) * eye
    return torch.linalg.solve(gram, enc_sigma @ target.T).T


def value_readout(src: SourceAttention, latent_rows: Tensor, sigma: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Output projection (d, h, n) reading the values from latent channels latent_rows (n, d1): O'_i = W_O^i R_{j(i)}
    with R the least-squares reconstruction of head j(i)'s values; and its factors (W_O (d, h, dv), R per head
    (h, dv, n))."""
    g, dv = src.num_kv_heads, src.wv.shape[1]
    R = ls_readout(src.wv.reshape(g * dv, -1), latent_rows, sigma).reshape(g, dv, -1).to(PER_HEAD_DTYPE)
    # Head by head into one contiguous (d, h, n) tensor: the refit later updates it in place as a (d, h n) matrix.
    wo = R.new_empty(src.wo.shape[0], src.num_heads, R.shape[2])
    for i, j in enumerate(src.group.tolist()):
        torch.mm(src.wo[:, i].to(PER_HEAD_DTYPE), R[j], out=wo[:, i])
    return wo, (src.wo.to(PER_HEAD_DTYPE), R[src.group])


# ---------------------------------------------------------------------------------------------------------------
# Whole layers under a budget


def compress_mfa(
    src: SourceAttention, sigma: Tensor, kv_dim: int, v_dim: int, kv_sigma: Tensor | None = None
) -> MFALayer:
    """MFA layer with a key latent of kv_dim channels and a value latent of v_dim channels."""
    kv_sigma = sigma if kv_sigma is None else kv_sigma
    groups = key_spectrum(src, sigma, kv_sigma)
    wk, wq, freqs = place_channels(key_latent(src, groups, choose_components(groups, kv_dim)), kv_dim)
    wv = value_rows(src, kv_sigma, v_dim)
    wo, factors = value_readout(src, wv, kv_sigma)
    return MFALayer(wq=wq, wk=wk, wv=wv, wo=wo, bo=src.bo, rope_freqs=freqs, scale=src.scale, readout_factors=factors)


def compress_mfa_kr(
    src: SourceAttention, sigma: Tensor, kv_dim: int, key_channels: int, kv_sigma: Tensor | None = None
) -> MFALayer:
    """MFA-KR layer of width kv_dim: key_channels channels of key components, the rest value-only (NoPE)
    channels chosen on what the key channels do not already carry; outputs read the whole pre-RoPE latent."""
    kv_sigma = sigma if kv_sigma is None else kv_sigma
    groups = key_spectrum(src, sigma, kv_sigma)
    keys = key_latent(src, groups, choose_components(groups, key_channels))
    key_real_rows = torch.cat([keys.pair_rows.real, keys.pair_rows.imag, keys.real_rows])
    n_values = kv_dim - 2 * keys.pair_rows.shape[0] - keys.real_rows.shape[0]
    values = value_rows(src, kv_sigma, n_values, basis=key_real_rows)
    wk, wq, freqs = place_channels(with_value_channels(keys, values), kv_dim)
    del keys  # its per-head query rows, as large as wq, are laid out in wq now
    wo, factors = value_readout(src, wk, kv_sigma)
    return MFALayer(wq=wq, wk=wk, wv=None, wo=wo, bo=src.bo, rope_freqs=freqs, scale=src.scale, readout_factors=factors)


# ---------------------------------------------------------------------------------------------------------------
# Query factorization and scale balancing


def key_energy(layer: MFALayer, sigma: Tensor) -> Tensor:
    """E[k_c^2] per key latent channel (C,), summed over each RoPE pair so that both halves weigh the same."""
    e = torch.einsum("cd,de,ce->c", layer.wk, sigma, layer.wk)
    half = e.shape[0] // 2
    pair = e[:half] + e[half:]
    return torch.cat([pair, pair])


def factor_query(layer: MFALayer, sigma: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Low-rank query q = Q_b (S_Q x~): S_Q (rank, d1) shared by all heads, Q_b (h*C, rank).

    Query errors are weighted by the key energy they meet: minimise E||K^{1/2} (W - Q_b S_Q) x~||^2 with
    K = diag(key energy of each head's channel), W = the (h*C, d1) query rows. The optimum keeps the top right
    singular vectors V (eigenvalues lam) of B = K^{1/2} W Sigma^{1/2}, found from the (d1, d1) matrix
    B^T B = Sigma^{1/2} M Sigma^{1/2} with M = W^T K W, never from the (h*C, h*C) one: S_Q = lam^{-1/2} V^T
    Sigma^{1/2} M (a combination of query rows, as the left singular vectors U give: S_Q = U^T K^{1/2} W) and
    Q_b = W Sigma^{1/2} V lam^{-1/2}. Channels that meet no key energy (MFA-KR value channels) get zero rows in Q_b.
    The rank is capped at that of B.
    """
    h, C, d1 = layer.wq.shape
    k = key_energy(layer, sigma)
    k_wide = k.to(layer.wq.dtype)
    m = sigma.new_zeros(d1, d1)  # W^T K W, head by head (a whole-W product would copy W)
    for head in layer.wq:
        m += ((head.T * k_wide) @ head).to(m.dtype)
    root_sigma = _sym_sqrt(sigma)
    lam, vec = torch.linalg.eigh(root_sigma @ m @ root_sigma)
    order = lam.argsort(descending=True)
    live_rank = int((lam > EIG_RTOL * lam.max()).sum())
    top = order[: min(rank, live_rank)]
    right = root_sigma @ vec[:, top] / lam[top].sqrt()  # (d1, r)
    q_b = layer.wq.reshape(h * C, d1) @ right.to(layer.wq.dtype)
    q_b[k.repeat(h) <= 0] = 0
    return right.T @ m, q_b


def balance_(layer: MFALayer, sigma: Tensor) -> None:
    """Rescale every latent channel pair to unit RMS on the calibration inputs, in place (the query rows and output
    columns are the layer's largest tensors; a copy would add their size to the conversion's peak memory).

    Pair p of the key latent can be scaled by s (key rows times s, query rows of every head divided by s, and in
    MFA-KR the output columns reading it divided by s) without changing the function; MFA value channels likewise
    against their output columns. PCA leaves these scales arbitrary and very uneven, which derails optimisers: an
    Adam step moves every weight by about the learning rate, and a weight's effect is proportional to its input, so
    the output columns reading a channel with a large activation are far more sensitive than the rest. Scaling
    by s = 1 / sqrt(w Sigma w^T) (Sigma: (d1, d1) second moment of the inputs, pairs scaled alike to keep RoPE)
    gives every channel the input scale of an ordinary layer.
    """
    half = layer.kv_dim // 2

    def unit_scales(rows: Tensor, paired: bool) -> Tensor:
        ms = ((rows @ sigma) * rows).sum(1).clamp_min(0)
        if paired:
            ms = ((ms[:half] + ms[half:]) / 2).repeat(2)
        return torch.where(ms > 0, ms.rsqrt(), torch.ones_like(ms))

    s = unit_scales(layer.wk, paired=True)
    layer.wk.mul_(s[:, None])
    layer.wq.div_(s.to(layer.wq.dtype)[None, :, None])
    if layer.wv is not None:
        s = unit_scales(layer.wv, paired=False)
        layer.wv.mul_(s[:, None])
    layer.wo.div_(s.to(layer.wo.dtype)[None, None, :])
    if layer.readout_factors is not None:
        layer.readout_factors[1].div_(s.to(layer.wo.dtype)[None, None, :])


def round_inputs_(layer: MFALayer, dtype: torch.dtype) -> None:
    """Round the query, key and value rows to the values a checkpoint in `dtype` holds, in place (each keeps its
    own dtype; rounding elementwise commutes with the slicing and stacking that lay them out for writing). The
    output refit and the sequential pass that follow then compute the attention the written checkpoint computes;
    the output columns are fitted afterwards and rounded when written."""
    for rows in (layer.wq, layer.wk, layer.wv):
        if rows is not None and torch.finfo(dtype).bits < torch.finfo(rows.dtype).bits:
            rows.copy_(rows.to(dtype))
