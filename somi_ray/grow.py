"""Function-preserving growth: more features, more Parts, more Systems.

Each operation leaves the logits of every input unchanged in evaluation mode (up to float
rounding) and then recalibrates the cascade, so later learning uses constants that fit the
new size. The caller rebuilds its optimizer afterwards because parameters change shape.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn

from somi_ray.model import Part, SomiModel, Tract, tract_key

logger = logging.getLogger(__name__)


def _pad(tensor: torch.Tensor, shape: tuple[int, ...], value: float = 0.0) -> torch.Tensor:
    out = torch.full(shape, value, dtype=tensor.dtype, device=tensor.device)
    out[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return out


@torch.no_grad()
def grow_hidden(model: SomiModel, new_hidden: int, generator: torch.Generator | None = None) -> None:
    """Grow every Part from H to new_hidden features without changing the logits.

    New features start with zero embedding, target and decoder columns and no connections
    (W = 0), so their drive and field stay zero and the fixed-width norms ignore them. Their
    mask gets random edges to existing features so local learning can connect them later.
    Their mass is set so that their isolated mode has exactly the eigenvalue of the shared
    complement oscillator: the complement's mean eigenvalue, and with it the settled field
    of the old features, stays the same.
    """
    config = model.config
    H = config.hidden_size
    if new_hidden <= H:
        raise ValueError(f"new hidden size {new_hidden} must exceed the current {H}")
    added = new_hidden - H
    V = config.vocab_size

    model.embedding.weight = nn.Parameter(_pad(model.embedding.weight.data, (V, new_hidden)))
    model.target_embedding = _pad(model.target_embedding, (V, new_hidden))
    model.decoder.weight = nn.Parameter(_pad(model.decoder.weight.data, (V, new_hidden)))
    model.decoder.in_features = new_hidden
    model.final_gain = nn.Parameter(_pad(model.final_gain.data, (new_hidden,), 1.0))

    for part in model.parts:
        free, _ = part.operators()
        precision_new = float(part.precision.mean())
        diagonal = (config.alpha1 + config.lambda_e) + config.alpha0 + 1.0 + config.kappa0 * precision_new
        mass_new = min(max(diagonal / free.complement_eigenvalue, config.mass_min), config.mass_max)

        part.W = _pad(part.W, (new_hidden, new_hidden))
        mask = _pad(part.mask, (new_hidden, new_hidden), False)
        k = min(config.sparsity, H)
        for feature in range(H, new_hidden):
            neighbours = torch.randperm(H, generator=generator)[:k]
            mask[feature, neighbours] = True
            mask[neighbours, feature] = True
        part.mask = mask
        part.mass = _pad(part.mass, (new_hidden,), mass_new)
        part.precision = _pad(part.precision, (new_hidden,), precision_new)
        part.output_gain = nn.Parameter(_pad(part.output_gain.data, (new_hidden,), float(part.output_gain.mean())))
        part.drive_gain = nn.Parameter(_pad(part.drive_gain.data, (new_hidden,), 1.0))
        part.context_gain = nn.Parameter(_pad(part.context_gain.data, (new_hidden,), 1.0))
        part.invalidate()

    for tract in model.tracts.values():
        rank = tract.down.shape[1]
        tract.down = nn.Parameter(_pad(tract.down.data, (new_hidden, rank)))
        tract.up = nn.Parameter(_pad(tract.up.data, (new_hidden, rank)))

    config.hidden_size = new_hidden
    _recalibrate_keeping_modes(model)
    logger.info("grew hidden size %d -> %d (%d features added)", H, new_hidden, added)


# Cascade constants that the forward pass of existing features reads. A structural change
# keeps them, because re-deriving them from the new H would change the logits: field_tau,
# for one, grows with log2(H) and sets the temporal memory of every feature.
FORWARD_CONSTANTS = (
    "alpha1", "lambda_e", "alpha0", "kappa0", "damping", "settle_time", "correction_dt", "field_tau",
)


def _recalibrate_keeping_modes(model: SomiModel) -> None:
    """Recompute the cascade but keep the forward constants; each Part keeps its mode count K
    until its next local step.

    Changing K changes which modes are settled exactly, and with it the function, so the
    new K takes effect when local learning next refreshes the Part's eigen cache. The
    learning constants (rates, EMAs, sparsity of new edges, tract rank, intervals) follow
    the new size at once.
    """
    config = model.config
    kept = {name: getattr(config, name) for name in FORWARD_CONSTANTS}
    config.recalibrate()
    for name, value in kept.items():
        setattr(config, name, value)
    config.validate()
    for part in model.parts:
        part.n_modes.fill_(min(int(part.n_modes), model.config.hidden_size - 1))
        part.invalidate()


def _extended_copy(tract: Tract, extra_rank: int, generator: torch.Generator | None) -> Tract:
    """A copy of a tract with extra rank whose new `up` columns are zero.

    The copy computes exactly what the original does, but its new columns receive gradients
    the original cannot, so two Systems built from one route can diverge while learning.
    """
    H, rank = tract.down.shape
    copy = Tract(H, rank + extra_rank)
    with torch.no_grad():
        down = torch.randn(H, rank + extra_rank, generator=generator) / math.sqrt(H)
        down[:, :rank] = tract.down.data
        copy.down = nn.Parameter(down.to(tract.down))
        copy.up = nn.Parameter(_pad(tract.up.data, (H, rank + extra_rank)))
    return copy


def _split_system_weight(model: SomiModel, parent: int) -> None:
    """Give a new System half of its parent's softmax weight; the mix is unchanged when both
    Systems compute the same output."""
    logits = model.system_logits.data
    half = logits[parent] - math.log(2.0)
    new_logits = torch.cat([logits, half.reshape(1)])
    new_logits[parent] = half
    model.system_logits = nn.Parameter(new_logits)


@torch.no_grad()
def add_system(model: SomiModel, parent: int = 0, generator: torch.Generator | None = None) -> int:
    """Add a System that follows the parent's route with its own copies of the tracts."""
    config = model.config
    if not 0 <= parent < len(config.routes):
        raise ValueError(f"parent System {parent} does not exist; the model has {len(config.routes)}")
    route = list(config.routes[parent])
    new_system = len(config.routes)
    for position in range(1, len(route)):
        source = model.tracts[tract_key(parent, position)]
        model.tracts[tract_key(new_system, position)] = _extended_copy(source, 1, generator)
    config.routes.append(route)
    _split_system_weight(model, parent)
    _recalibrate_keeping_modes(model)
    logger.info("added System %d on route %s", new_system, route)
    return new_system


@torch.no_grad()
def add_part(model: SomiModel, parent: int = 0, generator: torch.Generator | None = None) -> int:
    """Add a Part at the end of a new System that follows the parent System's route.

    The new Part's output gain starts at zero (its output equals its input) and the tract
    into it starts with zero output, so the new System computes what its parent computes.
    """
    config = model.config
    if not 0 <= parent < len(config.routes):
        raise ValueError(f"parent System {parent} does not exist; the model has {len(config.routes)}")
    new_part_index = config.n_parts
    part = Part(config, generator)
    part.output_gain.data.zero_()
    part.to(model.embedding.weight.device)
    model.parts.append(part)
    config.n_parts += 1

    route = list(config.routes[parent]) + [new_part_index]
    new_system = len(config.routes)
    for position in range(1, len(route) - 1):
        source = model.tracts[tract_key(parent, position)]
        model.tracts[tract_key(new_system, position)] = _extended_copy(source, 1, generator)
    model.tracts[tract_key(new_system, len(route) - 1)] = Tract(config.hidden_size, config.tract_rank, generator).to(
        model.embedding.weight.device)
    config.routes.append(route)
    _split_system_weight(model, parent)
    _recalibrate_keeping_modes(model)
    logger.info("added Part %d in System %d on route %s", new_part_index, new_system, route)
    return new_part_index
