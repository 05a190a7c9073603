"""The one parameterization layer: convert a model output between epsilon, v and x0 predictions.

With x_t = sqrt(a) x0 + sqrt(1 - a) eps (a = alpha_bar_t) and v = sqrt(a) eps - sqrt(1 - a) x0, any one of
(eps, v, x0) together with x_t determines the other two. The loss and every sampler go through these functions.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES: dict[str, str] = {
    "epsilon": "epsilon",
    "eps": "epsilon",
    "v_prediction": "v_prediction",
    "v": "v_prediction",
    "sample": "sample",
    "x0": "sample",
}


def canonical_prediction_type(name: str) -> str:
    """Resolve a prediction type or alias (eps, v, x0) to its diffusers name, or raise listing the choices."""
    try:
        return PREDICTION_TYPES[name]
    except KeyError:
        raise ValueError(
            f"unknown prediction type {name!r}; expected one of {sorted(PREDICTION_TYPES)}"
        ) from None


def _broadcast(coef: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """Reshape a per-sample coefficient [B] so that it broadcasts over [B, ...]; scalars pass through."""
    if isinstance(coef, torch.Tensor) and coef.ndim == 1:
        return coef.reshape(-1, *([1] * (like.ndim - 1)))
    return coef


def split_prediction(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alpha_bar: torch.Tensor | float,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x0, eps) implied by ``model_output`` of the given type at noise level ``alpha_bar``.

    ``alpha_bar`` is a float, a 0-d tensor, or a [B] tensor (one level per sample).
    """
    kind = canonical_prediction_type(prediction_type)
    a = _broadcast(alpha_bar, x_t)
    sqrt_a, sqrt_1ma = a**0.5, (1 - a) ** 0.5
    if kind == "epsilon":
        x0 = (x_t - sqrt_1ma * model_output) / sqrt_a
        return x0, model_output
    if kind == "sample":
        eps = (x_t - sqrt_a * model_output) / sqrt_1ma
        return model_output, eps
    x0 = sqrt_a * x_t - sqrt_1ma * model_output
    eps = sqrt_a * model_output + sqrt_1ma * x_t
    return x0, eps


def eps_from_x0(x0: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """The noise implied by a (possibly clipped) x0 estimate at x_t."""
    a = _broadcast(alpha_bar, x_t)
    return (x_t - a**0.5 * x0) / (1 - a) ** 0.5


def make_prediction(
    x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor | float, prediction_type: str
) -> torch.Tensor:
    """The quantity a model of ``prediction_type`` should output: the training target."""
    kind = canonical_prediction_type(prediction_type)
    if kind == "epsilon":
        return eps
    if kind == "sample":
        return x0
    a = _broadcast(alpha_bar, x0)
    return a**0.5 * eps - (1 - a) ** 0.5 * x0


def convert_prediction(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alpha_bar: torch.Tensor | float,
    source: str,
    target: str,
) -> torch.Tensor:
    """Convert a model output from one prediction type to another at the same x_t and noise level."""
    x0, eps = split_prediction(model_output, x_t, alpha_bar, source)
    return make_prediction(x0, eps, alpha_bar, target)
