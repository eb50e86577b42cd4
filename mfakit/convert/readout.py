"""The output refit: a ridge regression of the converted layer's output projection on the source attention's
output, from per-fold statistics or, where those would not fit, from the calibration samples (kernel form). Pure
functions on tensors, like the factorization they refine, on the device of their inputs."""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import pairwise

import torch

from mfakit.convert.factorize import MFALayer

Tensor = torch.Tensor
RIDGES = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
TOKENS_PER_FEATURE_UNREGULARISED = 8  # from this many calibration tokens per readout feature on, no ridge is needed
STABLE_RIDGE = 1e-6


@dataclass
class ReadoutStats:
    """Statistics of one calibration fold for the readout refit: gram = sum_t u_t u_t^T, cross = sum_t u_t y_t^T,
    energy = sum_t ||y_t||^2 and the token count, where u_t is the converted layer's output-projection input and
    y_t the source attention output (bias removed)."""

    gram: Tensor
    cross: Tensor
    energy: float
    tokens: int

    def __add__(self, other: ReadoutStats) -> ReadoutStats:
        return ReadoutStats(
            self.gram + other.gram, self.cross + other.cross, self.energy + other.energy, self.tokens + other.tokens
        )


def _ridge_readout(stats: ReadoutStats, prior: Tensor, ridge: float) -> Tensor:
    """argmin_W sum_t ||y_t - W u_t||^2 + lam ||W - prior||^2 with lam = ridge * mean(diag(gram))
    = (cross^T + lam prior) (gram + lam I)^{-1}; (d, n)."""
    lam = ridge * stats.gram.diagonal().mean().clamp_min(1e-30)
    regularised = stats.gram.clone()
    regularised.diagonal().add_(lam)
    return torch.linalg.solve(regularised, stats.cross + lam * prior.T).T


def _readout_error(stats: ReadoutStats, w: Tensor) -> float:
    """sum_t ||y_t - W u_t||^2 from the fold's statistics."""
    return float(stats.energy - 2 * (w * stats.cross.T).sum() + (w @ stats.gram * w).sum())


def _fixed_ridge(tokens: int, features: int, n_folds: int) -> float | None:
    """The ridge when no validation is needed or possible (see `choose_ridge`), else None."""
    if tokens >= TOKENS_PER_FEATURE_UNREGULARISED * features:
        return STABLE_RIDGE
    return RIDGES[-1] if n_folds < 2 else None


def choose_ridge(folds: list[ReadoutStats], prior: Tensor) -> float:
    """The readout refit's ridge strength. With at least TOKENS_PER_FEATURE_UNREGULARISED tokens per feature the
    least-squares fit does not overfit and the ridge is STABLE_RIDGE (held-out layer error would ask for shrinkage
    that costs perplexity; docs/method.md has the measurements); with fewer tokens it is chosen by leave-one-fold-out
    error over RIDGES; with a single fold there is nothing to validate on, and the refit stays close to the prior
    (the largest ridge)."""
    total = sum(folds[1:], start=folds[0])
    fixed = _fixed_ridge(total.tokens, total.gram.shape[0], len(folds))
    if fixed is not None:
        return fixed
    errors = dict.fromkeys(RIDGES, 0.0)
    for k, held_out in enumerate(folds):
        rest = [f for j, f in enumerate(folds) if j != k]
        fitted_on = sum(rest[1:], start=rest[0])
        for ridge in RIDGES:
            errors[ridge] += _readout_error(held_out, _ridge_readout(fitted_on, prior, ridge))
    return min(errors, key=errors.get)


@dataclass
class ReadoutSamples:
    """The readout refit's calibration data kept whole, for layers with more readout features n than tokens N, where
    the (n, n) statistics would not fit: u (N, n) the converted layer's output-projection inputs (float32: the
    converted attention computes them in it), residual (N, d) the source attention's output less the converted one's
    (float64), and fold (N,) the cross-validation fold of each token."""

    u: Tensor
    residual: Tensor
    fold: Tensor


# A symmetric product needs only its blocks on and above the diagonal: with 4 x 4 blocks that is 10 products of 16,
# 0.64x the time of the whole product for the readout statistics of SmolLM2 at half the cache (n 1,728, 512 tokens
# per update; 8 x 8 blocks: 0.62x, 2 x 2: 0.76x), with the same sums.
GRAM_BLOCKS = 4


def gram_blocks(n: int) -> list[tuple[int, int]]:
    """The (start, stop) of each of the GRAM_BLOCKS blocks of n rows."""
    return list(pairwise(n * i // GRAM_BLOCKS for i in range(GRAM_BLOCKS + 1)))


def add_gram_(gram: Tensor, u: Tensor) -> None:
    """gram += u^T u for u (tokens, n) and gram (n, n), on and above its diagonal blocks only (GRAM_BLOCKS x
    GRAM_BLOCKS): the blocks below stay as they are until `mirror_gram_` copies them from above, once, after the
    last update."""
    for start, stop in gram_blocks(gram.shape[0]):
        gram[start:stop, start:].addmm_(u[:, start:stop].T, u[:, start:])


def mirror_gram_(gram: Tensor) -> Tensor:
    """The blocks of an `add_gram_` sum below its diagonal blocks, set to the transposes of those above; returns
    gram, now symmetric."""
    for start, stop in gram_blocks(gram.shape[0]):
        gram[stop:, start:stop] = gram[start:stop, stop:].T
    return gram


KERNEL_BLOCK = 4096  # readout features cast to float64 at a time (the kernel's sums, the readout's update)


def sample_kernel(u: Tensor) -> Tensor:
    """K = U U^T in float64, (N, N), summed over blocks of KERNEL_BLOCK features so that no float64 copy of U
    exists."""
    kernel = torch.zeros(u.shape[0], u.shape[0], dtype=torch.float64, device=u.device)
    for block in u.split(KERNEL_BLOCK, dim=1):
        add_gram_(kernel, block.T.to(torch.float64))
    return mirror_gram_(kernel)


def choose_ridge_dual(kernel: Tensor, residual: Tensor, fold: Tensor, features: int) -> float:
    """`choose_ridge` on samples: the same rule and the same leave-one-fold-out error, from the (N, N) kernel
    K = U U^T and the residuals R = Y - U P^T, with one eigendecomposition K = V diag(mu) V^T for every fold and
    ridge. The fit without fold F leaves on F the residuals r_F = R_F - K_FT (K_TT + lam I)^{-1} R_T, which by the
    block inverse of A = K + lam I equal B^{-1} (A^{-1} R)_F with B = (A^{-1})_FF and A^{-1} = V diag(1 / (mu + lam))
    V^T; their energy is trace(B^{-1} W G W^T B^{-1}) for W = V_F diag(1 / (mu + lam)) (f, N) and
    G = V^T R R^T V (N, N), so each fold and ridge costs (f, N) products and (f, f) solves instead of an
    eigendecomposition of K_TT per fold and products with the d columns of R per ridge."""
    folds = fold.unique()
    fixed = _fixed_ridge(kernel.shape[0], features, len(folds))
    if fixed is not None:
        return fixed
    energy = kernel.diagonal()
    mu, vec = torch.linalg.eigh(kernel)
    mu = mu.clamp_min(0)  # K is positive semi-definite; rounding can leave its null directions slightly negative
    rotated = vec.T @ residual
    gram = rotated @ rotated.T
    del rotated
    errors = dict.fromkeys(RIDGES, 0.0)
    for k in folds:
        held = fold == k
        rows = vec[held]
        scale = float(energy[~held].sum() / features)
        for ridge in RIDGES:
            weighted = rows / (mu + ridge * scale)
            block = weighted @ rows.T
            half = torch.linalg.solve(block, weighted @ gram @ weighted.T)
            errors[ridge] += float(torch.linalg.solve(block, half.T).diagonal().sum())
    return min(errors, key=errors.get)


def dual_readout_update(kernel: Tensor, residual: Tensor, ridge: float, features: int) -> Tensor:
    """The coefficients A = (K + lam I)^{-1} R, (N, d), with lam = ridge * trace(K) / n, of the minimiser of
    `_ridge_readout` from samples: W = P + A^T U. Equal to the primal form by the push-through identity
    (U^T U + lam I)^{-1} U^T = U^T (U U^T + lam I)^{-1}."""
    lam = ridge * float(kernel.diagonal().sum() / features)
    shifted = kernel.clone()
    shifted.diagonal().add_(max(lam, 1e-30))
    return torch.linalg.solve(shifted, residual)


def refit_from_statistics(layer: MFALayer, folds: list[ReadoutStats]) -> tuple[MFALayer, float]:
    """Least-squares refit of the output projection against the source layer's attention output, from per-fold
    statistics: the readout absorbs what the truncated keys and values lose, shrunk towards the current readout
    (the least-squares reconstruction of the values) by the ridge of `choose_ridge`. Returns the layer and ridge."""
    d, h, v = layer.wo.shape
    prior = layer.wo.reshape(d, h * v).to(folds[0].gram.dtype)
    ridge = choose_ridge(folds, prior)
    wo = _ridge_readout(sum(folds[1:], start=folds[0]), prior, ridge)
    return replace(layer, wo=wo.reshape(d, h, v).to(layer.wo.dtype), readout_factors=None), ridge


UPDATE_CHECK_COLUMNS = 256  # columns of the readout update computed in both float64 and float32 to measure the error
FLOAT32_UPDATE_MARGIN = 64  # float32's measured error must be this many times below the written dtype's rounding


def update_dtype(coefficients: Tensor, u: Tensor, wo: Tensor, written: torch.dtype) -> torch.dtype:
    """The dtype in which to compute the readout update A^T U (A (N, d) `coefficients`, U (N, n), W (d, n) the
    readout before it): float32 where its error, measured on UPDATE_CHECK_COLUMNS evenly spaced columns S computed
    both ways, is negligible next to the rounding of the readout as written,
        ||(A^T U_S)_32 - (A^T U_S)_64|| <= eps(written) / FLOAT32_UPDATE_MARGIN * ||W_S + (A^T U_S)_64||
    for every column; float64 otherwise. A is large along the kernel's weak directions and its product with U cancels
    there, so float32 can fail at small ridges; a readout written in 32 bits or more always takes float64 (its own
    rounding leaves float32 no margin)."""
    if torch.finfo(written).bits >= 32:
        return torch.float64
    columns = torch.linspace(0, u.shape[1] - 1, min(UPDATE_CHECK_COLUMNS, u.shape[1]), device=u.device).long()
    sample = u[:, columns]
    exact = coefficients.T @ sample.to(torch.float64)
    error = (coefficients.T.float() @ sample.float()).double() - exact
    after = (wo[:, columns].to(torch.float64) + exact).norm(dim=0)
    bound = torch.finfo(written).eps / FLOAT32_UPDATE_MARGIN * after
    return torch.float32 if bool((error.norm(dim=0) <= bound).all()) else torch.float64


def refit_from_samples_(layer: MFALayer, samples: ReadoutSamples, written: torch.dtype = torch.float64) -> float:
    """`refit_from_statistics` from the samples themselves, in kernel form (same minimiser, same ridge rule), for
    layers whose (n, n) statistics would not fit in memory; the layer's output projection is updated in place,
    W += A^T U a block of features at a time (at 70B scale a second (d, n) copy would be gigabytes), in the dtype of
    `update_dtype` for a readout written in `written`. Returns the ridge."""
    d, h, v = layer.wo.shape
    kernel = sample_kernel(samples.u)
    ridge = choose_ridge_dual(kernel, samples.residual, samples.fold, h * v)
    update = dual_readout_update(kernel, samples.residual, ridge, h * v)
    if not layer.wo.is_contiguous():
        layer.wo = layer.wo.contiguous()
    wo = layer.wo.view(d, h * v)
    dtype = update_dtype(update, samples.u, wo, written)
    coefficients = update.T.to(dtype)
    for start, block in zip(range(0, h * v, KERNEL_BLOCK), samples.u.split(KERNEL_BLOCK, dim=1), strict=True):
        wo[:, start : start + block.shape[1]] += (coefficients @ block.to(dtype)).to(wo.dtype)
    layer.readout_factors = None  # no longer the output projection's factors
    return ridge


def inputs_memory(features: int, tokens: int) -> int:
    """Bytes of the (N, n) output-projection inputs in float32 (what a refit from samples holds, and what the
    sequential pass replays)."""
    return tokens * features * 4


def refit_memory(features: int, d: int, tokens: int, folds: int) -> dict[str, int]:
    """Bytes the output refit needs from statistics ((folds + 1) (n, n + d) sums in float64) and from samples (the
    (N, n) output-projection inputs in float32, the (N, d) residuals and the coefficients in float64, a float64 block
    of the inputs and of the update, the (N, N) kernel and the buffers of its eigenproblems and solves), for n readout
    features, model width d and N calibration tokens."""
    return {
        "statistics": (folds + 1) * features * (features + d) * 8,
        "samples": inputs_memory(features, tokens)
        + 3 * tokens * d * 8
        + (tokens + d) * KERNEL_BLOCK * 8
        + 5 * tokens * tokens * 8,
    }
