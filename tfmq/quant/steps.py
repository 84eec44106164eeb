"""Recipe steps as named handlers (docs/method.md section 8): one registry per step kind.

A ``Recipe`` names one handler per step kind; the stage verbs (``tfmq.quant.api``) look the name up
here and call it, so a method is data and a new step is ``register_step``, not an edit of the
engine. The built-in handlers are in ``tfmq.quant.methods``.

Step kinds and handler signatures:
    ``temporal`` (stage 1) and ``block_recon`` (stage 2): ``handler(ctx: StepContext) -> dict`` of stats.
    ``activations`` (stage 3): ``handler(ctx) -> dict``; not called for weight-only configs (``act_bits=None``).
    ``correction`` (end of stage 3, the model complete): ``handler(ctx) -> dict``; ``none`` or ``ptqd``
    (PTQD's correction of the noise prediction, ``tfmq.quant.ptqd``).
    ``weight_set``: ``handler(calib, config) -> dict[str, Tensor]``, the calibration rows (UNet
    forward kwargs) that weight reconstruction and other steps fit on (``ctx.weight_rows()``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

STEP_KINDS = ("temporal", "weight_set", "block_recon", "activations", "correction")
_HANDLERS: dict[str, dict[str, Callable]] = {kind: {} for kind in STEP_KINDS}

# config switch -> (step kind, the step it turns off, the step that replaces it): the paper's ablations
ABLATION_SWITCHES = {"tiar": ("temporal", "tiar", "nearest"), "fsc": ("activations", "fsc", "ema")}


@dataclass
class StepContext:
    """What a stage hands its step handler.

    Attributes:
        unet: the prepared UNet (in the quant state the previous stage left).
        calib: the ``tfmq.CalibrationSet``.
        config: the resolved ``QuantConfig`` stored at ``prepare_model``, with ``TFMQ_MAX_ITERS`` applied
            to this stage's iteration count.
        recipe: the method's ``Recipe``.
        device: ``torch.device`` the stage runs on.
        progress: show progress bars.
        resume: where the stage files its finished units (a ``tfmq.quant.resume.UnitProgress``), set by
            a stage's ``resume_dir=``; the built-in handlers pass it to TIAR, BRECQ, FSC and Q-Diffusion's
            step-size learning. ``None``: nothing is read or written.
        memory: where BRECQ and step-size learning keep their unit caches (a ``tfmq.quant.cache.MemoryPolicy``).
    """

    unet: nn.Module
    calib: Any
    config: Any
    recipe: Any
    device: torch.device
    progress: bool = True
    resume: Any = None
    memory: Any = None

    def weight_rows(self) -> dict[str, torch.Tensor]:
        """The recipe's weight calibration set (its ``weight_set`` handler)."""
        return get_step("weight_set", self.recipe.weight_set)(self.calib, self.config)


def _check_kind(kind: str) -> None:
    if kind not in _HANDLERS:
        raise ValueError(f"step kind {kind!r} is unknown; expected one of {', '.join(STEP_KINDS)}")


def register_step(kind: str, name: str, fn: Callable | None = None, *, replace: bool = False):
    """Register ``fn`` as the handler ``name`` of step ``kind``; usable as a decorator.

    Args:
        kind: one of ``temporal``, ``weight_set``, ``block_recon``, ``activations``.
        name: the value a ``Recipe`` field names it by (e.g. ``Recipe(..., activations="percentile")``).
        fn: the handler (see the module docstring for its signature); omitted: returns a decorator.
        replace: allow replacing an existing handler of that name (refused by default, so that a
            user handler never silently changes a built-in method).

    Example:
        >>> @tfmq.register_step("activations", "percentile")
        ... def percentile(ctx):
        ...     ...
        ...     return {"quantizers": n}
    """
    _check_kind(kind)
    if not isinstance(name, str) or not name:
        raise ValueError(f"step name {name!r}: expected a non-empty string")

    def add(f: Callable) -> Callable:
        if not callable(f):
            raise TypeError(f"register_step({kind!r}, {name!r}): handler must be callable, got {type(f).__name__}")
        if name in _HANDLERS[kind] and not replace:
            raise ValueError(f"{kind} step {name!r} is already registered; pass replace=True to replace it")
        _HANDLERS[kind][name] = f
        return f

    return add if fn is None else add(fn)


def step_names(kind: str) -> tuple[str, ...]:
    _check_kind(kind)
    return tuple(_HANDLERS[kind])


def get_step(kind: str, name: str) -> Callable:
    _check_kind(kind)
    try:
        return _HANDLERS[kind][name]
    except (KeyError, TypeError):
        raise ValueError(
            f"{kind}={name!r} is not a registered {kind} step; registered: {', '.join(_HANDLERS[kind])} "
            f"(add one with tfmq.register_step({kind!r}, name, handler))"
        ) from None


def validate_steps(recipe) -> None:
    """Every step a recipe names must be registered: ValueError naming the field, the value and the choices."""
    for kind in STEP_KINDS:
        name = getattr(recipe, kind)
        if not isinstance(name, str) or name not in _HANDLERS[kind]:
            raise ValueError(
                f"Recipe {recipe.name!r}: {kind}={name!r} is not a registered {kind} step; "
                f"expected one of {', '.join(_HANDLERS[kind])} (or register one with tfmq.register_step({kind!r}, ...))"
            )


def resolve_step(kind: str, recipe, config) -> str:
    """The handler name stage ``kind`` runs: the recipe's, unless an ablation switch of ``config`` is off."""
    name = getattr(recipe, kind)
    for switch, (k, off, substitute) in ABLATION_SWITCHES.items():
        if k == kind and name == off and not getattr(config, switch):
            return substitute
    return name
