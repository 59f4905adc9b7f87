"""The local learning coefficient (LLC) of singular learning theory, estimated by localised SGLD.

At a local minimum w* of the loss L, the LLC estimate is (Lau et al. 2023, "Quantifying degeneracy
in singular models via the learning coefficient"; Hoogland et al. 2024)

    lambda_hat = n_beta * (E_w[L(w)] - L(w*)),

the expectation over the tempered posterior localised at w*, p(w) ~ exp(-n_beta L(w) - gamma/2
|w - w*|^2), sampled by stochastic-gradient Langevin dynamics (Welling and Teh 2011):

    w <- w - (eps/2) (n_beta grad L_batch(w) + gamma (w - w*)) + N(0, eps).

The RMSProp-preconditioned variant (Li et al. 2016; Hitchcock and Hoogland 2025, arXiv
2507.21449, who found it the most faithful local sampler) scales the drift and the noise by
G = 1 / (sqrt(V) + delta) per coordinate, where V is a running mean of the squared loss gradient
(n_beta grad L only: the localisation term does not enter the statistics, their appendix D.3).

Conventions, stated once:

- Chains are one axis. Every parameter tensor of ``init`` is (group, ...): a group is what one
  estimate is for (a member of an ensemble, or one toy problem). The sampler repeats each group
  ``chains`` times into a leading (group * chain) axis, group-major, and ``loss(params, step)``
  must return the (group * chain,) losses of every copy at once, each on its own batch: the
  batch of a copy at a step may depend on ``step`` and the copy's index, never on the weights,
  so the loss at w* can be evaluated on the very batches the draws see (common random numbers:
  L(w*) is subtracted draw by draw, which removes most of the batch noise from the estimate).
- ``mask`` (name -> tensor broadcastable to (group, ...), 1 = moves) freezes the rest at w*:
  the weight-refined LLC of a head moves only that head's parameters (Wang et al. 2024,
  "Differentiation and specialization of attention heads via the refined local learning
  coefficient", arXiv 2410.02984).
- Each chain gives its own estimate, n_beta times the mean over its draws of L(w) - L(w*); the
  group's estimate is the mean over its healthy chains, with the standard error over them. A
  chain whose loss becomes non-finite is *diverged*: it is left out of the mean and counted,
  never averaged in silently. A chain whose mean draw loss lies below L(w*) is flagged: w* was
  not a local minimum, or eps is too large (the calibration plot shows which).
- Defaults are those of the devinterp library's examples (timaeus, PyPI ``devinterp`` 2.0):
  eps 1e-3, gamma 100, 8 chains, 200 draws, no burn-in; n_beta has no default here, since it
  must be the same across every estimate that is compared (its usual choice, b / log b for
  batch size b, is ``default_n_beta``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from devinterp.model import even_passes

Params = dict[str, torch.Tensor]
LossFn = Callable[[Params, int], torch.Tensor]  # (params (copy, ...), step) -> (copy,) losses


def default_n_beta(batch_size: int) -> float:
    """b / log b, the inverse temperature the WBIC suggests for a batch of b (Watanabe 2013)."""
    if batch_size < 2:
        raise ValueError(f"batch_size: must be at least 2 for b / log b, got {batch_size}")
    return batch_size / math.log(batch_size)


@dataclass(frozen=True)
class SamplerConfig:
    """Hyperparameters of one LLC estimate; every one explicit (see the module docstring)."""

    n_beta: float
    eps: float = 1e-3
    gamma: float = 100.0
    chains: int = 8
    draws: int = 200
    burn_in: int = 0  # steps before the first draw, not counted
    steps_between_draws: int = 1
    sampler: str = "sgld"  # "sgld" or "rmsprop"
    rmsprop_decay: float = 0.99  # of the running mean of squared gradients
    rmsprop_delta: float = (
        1.0  # added to sqrt(V): G <= 1/delta, so flat regions never take larger steps than SGLD
    )
    rmsprop_freeze: bool = True  # adapt V during burn-in only, then hold it (see the docstring)
    trace_every: int = 1  # keep every k-th draw's loss in the trace

    def __post_init__(self) -> None:
        for name in ("n_beta", "eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a positive number, got {value!r}")
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise ValueError(f"gamma: must be a number >= 0, got {self.gamma!r}")
        for name in ("chains", "draws", "steps_between_draws", "trace_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)!r}")
        if self.burn_in < 0:
            raise ValueError(f"burn_in: must be >= 0, got {self.burn_in!r}")
        if self.sampler not in ("sgld", "rmsprop"):
            raise ValueError(f"sampler: expected 'sgld' or 'rmsprop', got {self.sampler!r}")
        if not 0 <= self.rmsprop_decay < 1:
            raise ValueError(f"rmsprop_decay: must be in [0, 1), got {self.rmsprop_decay!r}")


@dataclass(frozen=True)
class LLCEstimate:
    """One estimate per group, with the diagnostics it was made with."""

    llc: np.ndarray  # (group,) mean over healthy chains
    std_error: np.ndarray  # (group,) over healthy chains (NaN with fewer than 2)
    per_chain: np.ndarray  # (group, chain); NaN where the chain diverged
    init_loss: np.ndarray  # (group,) mean L(w*) over the draws' batches
    loss_trace: np.ndarray  # (group, chain, kept draw) L(w) at the kept draws
    below_init: np.ndarray  # (group, chain) bool: the chain's mean draw loss is below L(w*)
    diverged: np.ndarray  # (group, chain) bool: its loss became non-finite
    config: SamplerConfig


def _repeat(params: Params, chains: int) -> Params:
    return {name: value.repeat_interleave(chains, dim=0) for name, value in params.items()}


def _loss_and_grads(
    loss: LossFn, params: Params, step: int, copies_per_pass: int | None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(copy,) losses at ``params`` and their gradients, one forward and backward per pass."""
    n_copies = next(iter(params.values())).shape[0]
    passes = even_passes(n_copies, copies_per_pass)
    values, grads = [], [torch.empty_like(value) for value in params.values()]
    for copies in passes:
        part = {name: value[copies].detach().requires_grad_(True) for name, value in params.items()}
        value = loss(part, step) if len(passes) == 1 else loss(part, step, copies)
        expected = copies.stop - copies.start
        if value.shape != (expected,):
            raise ValueError(
                f"loss: expected ({expected},) losses, one per group and chain, got {tuple(value.shape)}"
            )
        for grad, found in zip(grads, torch.autograd.grad(value.sum(), list(part.values()))):
            grad[copies] = found
        values.append(value.detach())
    return torch.cat(values), grads


def estimate_llc(
    loss: LossFn,
    init: Params,
    config: SamplerConfig,
    mask: Params | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    anchor_loss: Callable[[int], torch.Tensor] | None = None,
    copies_per_pass: int | None = None,
) -> LLCEstimate:
    """Sample every group's ``config.chains`` chains at once from w* = ``init`` and estimate the
    LLC of each group. ``progress(done, total)`` is called after every step. ``anchor_loss(step)``
    gives the (copy,) losses at w* on the step's batches where the caller has them cheaper than
    a forward pass (default: ``loss(w*, step)``).

    ``copies_per_pass`` splits the copies into passes of about that many, each its own forward
    and backward, for a loss that takes ``loss(params, step, copies)``: the params of the copies
    ``copies`` (a slice) -> their losses. The estimate is the same (every copy's loss and noise
    are its own); on a CPU, passes whose activations fit the last-level cache are faster per copy
    than one pass over all (bench/llc_speed.py)."""
    n_groups = {value.shape[0] for value in init.values()}
    if len(n_groups) != 1:
        raise ValueError(f"init: every parameter needs the same leading (group) axis, got {n_groups}")
    (groups,) = n_groups
    chains = config.chains
    anchor = {name: value.detach() for name, value in _repeat(init, chains).items()}
    moving = {name: value.clone() for name, value in anchor.items()}
    masks = {}
    for name, value in (mask or {}).items():
        if name not in init:
            raise ValueError(f"mask: no parameter named {name!r}")
        masks[name] = torch.broadcast_to(value.to(init[name].dtype), init[name].shape).repeat_interleave(
            chains, dim=0
        )
    device = next(iter(anchor.values())).device  # every buffer lives there: no host sync per step
    generator = torch.Generator(device=device).manual_seed(seed)
    square_mean = {name: torch.zeros_like(value) for name, value in anchor.items()}
    adapted = dict.fromkeys(anchor, 0)  # steps that updated each running mean
    n_copies = groups * chains
    draw_losses = torch.zeros(n_copies, config.draws, dtype=torch.float64, device=device)
    init_losses = torch.zeros(n_copies, config.draws, dtype=torch.float64, device=device)
    diverged = torch.zeros(n_copies, dtype=torch.bool, device=device)
    total = config.burn_in + config.draws * config.steps_between_draws
    draw = 0
    for step in range(total):
        value, grads = _loss_and_grads(loss, moving, step, copies_per_pass)  # (copy,), per parameter
        taken = step >= config.burn_in and (step - config.burn_in + 1) % config.steps_between_draws == 0
        if taken:
            with torch.no_grad():
                draw_losses[:, draw] = value.double()
                at_anchor = loss(anchor, step) if anchor_loss is None else anchor_loss(step)
                init_losses[:, draw] = at_anchor.double()
            draw += 1
        diverged |= ~torch.isfinite(value)
        with torch.no_grad():
            for (name, weight), grad in zip(moving.items(), grads):
                loss_grad = config.n_beta * grad
                drift = loss_grad + config.gamma * (weight - anchor[name])
                noise = torch.randn(
                    weight.shape, generator=generator, dtype=weight.dtype, device=weight.device
                )
                if config.sampler == "rmsprop":
                    decay = config.rmsprop_decay
                    if step < config.burn_in or not config.rmsprop_freeze:
                        square_mean[name].mul_(decay).add_((1 - decay) * loss_grad**2)
                        adapted[name] = step + 1
                    corrected = square_mean[name] / (1 - decay ** adapted[name])
                    step_size = config.eps / (corrected.sqrt() + config.rmsprop_delta)
                    noise_size = step_size.sqrt()
                else:  # plain SGLD: scalars, no per-weight tensors
                    step_size, noise_size = config.eps, math.sqrt(config.eps)
                update = -0.5 * step_size * drift + noise_size * noise
                if name in masks:
                    update = update * masks[name]
                weight.add_(update)
                # a diverged chain goes back to w*, so it cannot poison the others (no branch: no sync)
                bad = ~torch.isfinite(weight).flatten(1).all(dim=1)  # (copy,)
                diverged |= bad
                weight.copy_(torch.where(bad.view(-1, *[1] * (weight.dim() - 1)), anchor[name], weight))
        if progress is not None:
            progress(step + 1, total)
    draw_losses, init_losses, diverged = draw_losses.cpu(), init_losses.cpu(), diverged.cpu()
    gap = (draw_losses - init_losses).reshape(groups, chains, -1)
    bad = diverged.reshape(groups, chains) | ~torch.isfinite(gap).all(dim=2)
    per_chain = (config.n_beta * gap.mean(dim=2)).numpy()
    per_chain[bad.numpy()] = np.nan
    healthy = (~bad).sum(dim=1).numpy()
    llc = np.array([np.nanmean(row) if n else np.nan for row, n in zip(per_chain, healthy)])
    std_error = np.array(
        [np.nanstd(row, ddof=1) / math.sqrt(n) if n > 1 else np.nan for row, n in zip(per_chain, healthy)]
    )
    return LLCEstimate(
        llc=llc,
        std_error=std_error,
        per_chain=per_chain,
        init_loss=init_losses.reshape(groups, chains, -1).mean(dim=(1, 2)).numpy(),
        loss_trace=draw_losses.reshape(groups, chains, -1)[:, :, :: config.trace_every].numpy(),
        below_init=(gap.mean(dim=2) < 0).numpy() & ~bad.numpy(),
        diverged=bad.numpy(),
        config=config,
    )
