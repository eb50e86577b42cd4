"""Per-layer output reconstruction by gradient steps: the converted attention of one layer, started from the
closed-form factorization, trained to reproduce the source attention's output on the calibration batches.

The closed form fits keys, values and the readout one after the other, each against a proxy error; a few hundred
Adam steps on the layer's real output error let the three adapt to each other. Only the converted layer's own
parameters move, on its own calibration inputs (the converted stream when calibration is sequential)."""

from __future__ import annotations

import math

import torch
from torch import nn

from mfakit.convert.calibration import rows_of
from mfakit.convert.factorize import PER_HEAD_DTYPE, MFALayer


def reconstruct(
    module: nn.Module,
    x: list[torch.Tensor],
    target: list[torch.Tensor],
    layer_args: list,
    steps: int,
    lr: float,
    rows: int = 1,
) -> list[float]:
    """Adam on min_theta sum_b ||A_theta(x_b) - y_b||^2 / ||y_b||^2 over the module's parameters, `rows`
    sequences a step taken in a fixed cycle over the calibration batches, learning rate lr with a cosine decay to
    zero. x_b (n, s, d) inputs, y_b (n, s, d) the source attention's outputs, in the streams' dtype (the float32
    module reads them in float32). Returns the loss of every step.

    One sequence a step by default: for the same sequences read, twice the steps of one sequence beat steps of two
    on every development domain (docs/method.md, "Per-layer output reconstruction")."""
    sequences = [(b, r) for b, batch in enumerate(x) for r in range(0, batch.shape[0], rows)]
    params = [p for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    for step in range(steps):
        b, r = sequences[step % len(sequences)]
        kwargs = layer_args[b][1]
        out, _ = module(
            x[b][r : r + rows].float(),
            attention_mask=rows_of(kwargs.get("attention_mask"), slice(r, r + rows)),
            position_ids=rows_of(kwargs.get("position_ids"), slice(r, r + rows)),
        )
        y = target[b][r : r + rows].float()
        loss = (out - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        optimizer.step()
        losses.append(loss.detach().item())
    for p in params:
        p.requires_grad_(False)
    return losses


def layer_from_module(module: nn.Module, mfa: MFALayer) -> MFALayer:
    """The MFALayer whose tensors are the (plain, unfactored) module's parameters: rows with their bias as the
    last column, per-head query rows (h, C, d1) and output columns (d, h, v)."""

    def rows(linear: nn.Linear, like: torch.Tensor) -> torch.Tensor:
        bias = linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.weight.shape[0])
        return torch.cat([linear.weight, bias[:, None]], 1).detach().to(like.dtype).cpu()

    h, C, d1 = mfa.wq.shape
    d = mfa.wo.shape[0]
    return MFALayer(
        wq=rows(module.q_proj, mfa.wq).reshape(h, C, d1).to(PER_HEAD_DTYPE),
        wk=rows(module.k_proj, mfa.wk),
        wv=None if mfa.wv is None else rows(module.v_proj, mfa.wv),
        wo=module.o_proj.weight.detach().cpu().reshape(d, h, -1).to(PER_HEAD_DTYPE),
        bo=None if mfa.bo is None else module.o_proj.bias.detach().cpu().to(mfa.bo.dtype),
        rope_freqs=mfa.rope_freqs,
        scale=mfa.scale,
    )
