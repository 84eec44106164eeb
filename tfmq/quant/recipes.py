"""Methods as data: each method is a recipe of named steps, looked up by name (docs/method.md section 8).

The engine never branches on a method's name; it reads the recipe's fields. A new method is a
new ``Recipe`` registered here (or by a user with ``register_recipe``), not an edit of the core.
"""
from __future__ import annotations

from dataclasses import dataclass


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
        block_recon: run BRECQ on the remaining blocks (False: round-to-nearest everywhere).
        activations: ``minmax`` (one min-max range), ``ema`` (one EMA min-max range), ``fsc``
            (per-timestep EMA ranges), ``learned`` (EMA init + Q-Diffusion step-size learning).
    """

    name: str
    policy: str
    attention_matmul: bool
    split_shortcut: bool
    temporal: str
    weight_set: str
    block_recon: bool
    activations: str
    description: str = ""


RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"method={name!r} is not a registered recipe; expected one of {', '.join(RECIPES)}") from None


register_recipe(Recipe(
    "naive", policy="all", attention_matmul=False, split_shortcut=False, temporal="nearest",
    weight_set="every_k", block_recon=False, activations="minmax",
    description="RTN: MSE-initialised weights rounded to nearest, one min-max activation range",
))
register_recipe(Recipe(
    "brecq", policy="tfmq", attention_matmul=False, split_shortcut=False, temporal="joint",
    weight_set="every_k", block_recon=True, activations="ema",
    description="BRECQ with the temporal layers optimised inside their blocks (the ablation baseline of the paper)",
))
register_recipe(Recipe(
    "freeze", policy="tfmq", attention_matmul=False, split_shortcut=False, temporal="nearest",
    weight_set="every_k", block_recon=True, activations="ema",
    description="BRECQ with the temporal layers frozen and rounded to nearest (the poster's 'Freeze')",
))
register_recipe(Recipe(
    "ptq4dm", policy="all", attention_matmul=False, split_shortcut=False, temporal="joint",
    weight_set="ptq4dm", block_recon=True, activations="ema",
    description="PTQ4DM: normally distributed calibration timesteps skewed to small t, then BRECQ",
))
register_recipe(Recipe(
    "qdiffusion", policy="all", attention_matmul=True, split_shortcut=True, temporal="joint",
    weight_set="every_k", block_recon=True, activations="learned",
    description="Q-Diffusion: time-step-aware calibration, BRECQ, shortcut splitting, learned activation steps",
))
register_recipe(Recipe(
    "tfmq", policy="tfmq", attention_matmul=False, split_shortcut=False, temporal="tiar",
    weight_set="every_k", block_recon=True, activations="fsc",
    description="TFMQ-DM: TIAR on the temporal information block, BRECQ with it frozen, finite set calibration",
))
