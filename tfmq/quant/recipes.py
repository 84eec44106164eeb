"""Methods as data: each method is a recipe of named steps, looked up by name (docs/method.md section 8).

The engine never branches on a method's name: each step field of a ``Recipe`` names a handler
registered in ``tfmq.quant.steps`` (built-ins and the built-in recipes: ``tfmq.quant.methods``), checked when the recipe
is registered. A new method is a new ``Recipe`` (``register_recipe``), a new step a new handler
(``register_step``), neither an edit of the core.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import POLICIES
from .registry import RECIPES
from .steps import validate_steps


@dataclass(frozen=True)
class Recipe:
    """One PTQ method.

    Attributes:
        policy: default layer policy (``tfmq`` or ``all``).
        attention_matmul: quantize q/k/v/softmax by default.
        split_shortcut: Q-Diffusion's shortcut splitting by default.
        temporal: ``tiar`` (TIAR on the TIB, then frozen), ``nearest`` (TIB rounded to nearest and
            frozen: the poster's "Freeze"), or ``joint`` (temporal layers reconstructed with their
            blocks, time-embedding Linears layer by layer: BRECQ / Q-Diffusion).
        weight_set: calibration rows for weight reconstruction: ``every_k`` or ``ptq4dm``.
        block_recon: ``brecq`` (BRECQ on the remaining blocks) or ``nearest`` (round-to-nearest
            everywhere); ``True``/``False`` are accepted for these two.
        activations: ``minmax`` (one min-max range), ``ema`` (one EMA min-max range), ``fsc``
            (per-timestep EMA ranges), ``learned`` (EMA init + Q-Diffusion step-size learning).
        correction: ``none`` or ``ptqd`` (PTQD's per-timestep correction of the noise prediction,
            fitted after the activations on the finished model).

    Each step field may also name a handler added with ``tfmq.register_step(kind, name, fn)``.
    """

    name: str
    policy: str
    attention_matmul: bool
    split_shortcut: bool
    temporal: str
    weight_set: str
    block_recon: str
    activations: str
    description: str = ""
    correction: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.block_recon, bool):  # the two built-in choices, by their old boolean spelling
            object.__setattr__(self, "block_recon", "brecq" if self.block_recon else "nearest")


def register_recipe(recipe: Recipe, *, replace: bool = False) -> Recipe:
    """Add ``recipe`` under ``recipe.name`` after checking every field (ValueError naming the bad one).

    Args:
        recipe: the method; each step field must name a registered step handler.
        replace: allow replacing a registered recipe of that name (refused by default, so that a
            user recipe never silently redefines a built-in method).
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"register_recipe expects a tfmq.Recipe, got {type(recipe).__name__}")
    if not isinstance(recipe.name, str) or not recipe.name:
        raise ValueError(f"Recipe name {recipe.name!r}: expected a non-empty string")
    if recipe.name in RECIPES and not replace:
        raise ValueError(f"recipe {recipe.name!r} is already registered; pass replace=True to replace it")
    if recipe.policy not in POLICIES:
        raise ValueError(f"Recipe {recipe.name!r}: policy={recipe.policy!r}; expected one of {', '.join(POLICIES)}")
    for flag in ("attention_matmul", "split_shortcut"):
        if not isinstance(getattr(recipe, flag), bool):
            raise ValueError(f"Recipe {recipe.name!r}: {flag}={getattr(recipe, flag)!r}; expected True or False")
    validate_steps(recipe)
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"method={name!r} is not a registered recipe; expected one of {', '.join(RECIPES)}") from None
