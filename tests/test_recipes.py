"""Methods as data (docs/method.md section 8): each recipe field names a step handler from a registry,
checked when the recipe is registered; a user recipe with a user handler changes what the engine does
without an edit of the engine."""
import dataclasses

import pytest
import torch

import tfmq
from engine_fixtures import calib, run, small_config, tiny_unet, unet_inputs
from tfmq.quant import steps
from tfmq.quant.prepare import act_quantizers, get_state, quant_layers

pytestmark = pytest.mark.usefixtures("one_thread")

BUILTIN = {
    "temporal": ("tiar", "nearest", "joint"),
    "weight_set": ("every_k", "ptq4dm"),
    "block_recon": ("brecq", "nearest"),
    "activations": ("minmax", "ema", "learned", "fsc"),
    "correction": ("none", "ptqd"),
}


@pytest.fixture
def registries():
    """Restore the recipe and step registries after a test that adds to them."""
    recipes = dict(tfmq.RECIPES)
    handlers = {kind: dict(steps._HANDLERS[kind]) for kind in steps.STEP_KINDS}
    yield
    tfmq.RECIPES.clear()
    tfmq.RECIPES.update(recipes)
    for kind, table in handlers.items():
        steps._HANDLERS[kind].clear()
        steps._HANDLERS[kind].update(table)


def _rtn_recipe(name: str, **kw) -> tfmq.Recipe:
    base = dict(policy="all", attention_matmul=False, split_shortcut=False, temporal="nearest", weight_set="every_k",
                block_recon="nearest", activations="minmax")
    return tfmq.Recipe(name, **{**base, **kw})


def test_builtin_handlers_and_recipes():
    assert {kind: tfmq.step_names(kind) for kind in tfmq.STEP_KINDS} == BUILTIN
    got = {n: (r.temporal, r.weight_set, r.block_recon, r.activations, r.correction) for n, r in tfmq.RECIPES.items()}
    assert got == {
        "naive": ("nearest", "every_k", "nearest", "minmax", "none"), "brecq": ("joint", "every_k", "brecq", "ema", "none"),
        "freeze": ("nearest", "every_k", "brecq", "ema", "none"), "ptq4dm": ("joint", "ptq4dm", "brecq", "ema", "none"),
        "qdiffusion": ("joint", "every_k", "brecq", "learned", "none"),
        "ptqd": ("joint", "every_k", "brecq", "learned", "ptqd"), "tfmq": ("tiar", "every_k", "brecq", "fsc", "none"),
    }
    q, p = tfmq.get_recipe("qdiffusion"), tfmq.get_recipe("ptqd")  # PTQD = Q-Diffusion + its correction
    assert (q.policy, q.attention_matmul, q.split_shortcut) == (p.policy, p.attention_matmul, p.split_shortcut)
    assert _rtn_recipe("x", block_recon=True).block_recon == "brecq"  # the old boolean spelling
    assert _rtn_recipe("x", block_recon=False).block_recon == "nearest"


@pytest.mark.parametrize("field,bad", [("temporal", "TIAR"), ("weight_set", "every_10"), ("block_recon", "adaround"),
                                       ("activations", "percentile"), ("activations", None)])
def test_register_recipe_rejects_an_unknown_step_naming_field_value_and_choices(registries, field, bad):
    recipe = dataclasses.replace(tfmq.get_recipe("tfmq"), name="mine", **{field: bad})
    with pytest.raises(ValueError) as err:
        tfmq.register_recipe(recipe)
    msg = str(err.value)
    assert f"{field}={bad!r}" in msg and "'mine'" in msg
    assert all(name in msg for name in BUILTIN[field]), msg
    assert "mine" not in tfmq.RECIPES
    with pytest.raises(tfmq.ConfigError, match="'mine' is not a registered recipe"):
        tfmq.QuantConfig(method="mine")


def test_register_recipe_checks_the_other_fields_and_refuses_to_redefine(registries):
    with pytest.raises(ValueError, match=r"policy='ALL'; expected one of tfmq, all"):
        tfmq.register_recipe(_rtn_recipe("mine", policy="ALL"))
    with pytest.raises(ValueError, match=r"attention_matmul='yes'; expected True or False"):
        tfmq.register_recipe(_rtn_recipe("mine", attention_matmul="yes"))
    tfmq_recipe = tfmq.get_recipe("tfmq")
    with pytest.raises(ValueError, match=r"recipe 'tfmq' is already registered; pass replace=True"):
        tfmq.register_recipe(dataclasses.replace(tfmq_recipe, activations="ema"))
    assert tfmq.get_recipe("tfmq") is tfmq_recipe
    changed = tfmq.register_recipe(dataclasses.replace(tfmq_recipe, description="mine"), replace=True)
    assert tfmq.get_recipe("tfmq") is changed


def test_register_step_rejects_unknown_kinds_duplicates_and_non_callables(registries):
    with pytest.raises(ValueError, match=r"step kind 'activation' is unknown; expected one of temporal, weight_set"):
        tfmq.register_step("activation", "percentile", lambda ctx: {})
    with pytest.raises(ValueError, match=r"activations step 'fsc' is already registered"):
        tfmq.register_step("activations", "fsc", lambda ctx: {})
    with pytest.raises(TypeError, match="must be callable"):
        tfmq.register_step("activations", "percentile", "not a function")
    with pytest.raises(ValueError, match=r"activations='percentile' is not a registered activations step; registered: "
                                         r"minmax, ema, learned, fsc"):
        steps.get_step("activations", "percentile")

    @tfmq.register_step("activations", "percentile")
    def percentile(ctx):
        return {}

    assert steps.get_step("activations", "percentile") is percentile and "percentile" in tfmq.step_names("activations")


def test_ablation_switches_substitute_registered_steps():
    tfmq_recipe = tfmq.get_recipe("tfmq")
    assert steps.resolve_step("temporal", tfmq_recipe, tfmq.QuantConfig()) == "tiar"
    assert steps.resolve_step("temporal", tfmq_recipe, tfmq.QuantConfig(tiar=False)) == "nearest"
    assert steps.resolve_step("activations", tfmq_recipe, tfmq.QuantConfig()) == "fsc"
    assert steps.resolve_step("activations", tfmq_recipe, tfmq.QuantConfig(fsc=False)) == "ema"
    # a switch only turns off the step it names
    qd = tfmq.get_recipe("qdiffusion")
    off = tfmq.QuantConfig(method="qdiffusion", tiar=False, fsc=False)
    assert (steps.resolve_step("temporal", qd, off), steps.resolve_step("activations", qd, off)) == ("joint", "learned")
    for switch, (kind, _, substitute) in steps.ABLATION_SWITCHES.items():
        assert substitute in tfmq.step_names(kind), switch


def test_user_recipe_with_a_user_handler_changes_what_the_engine_does(registries):
    """A user registers an activation step (min-max ranges, then every step size halved: a clipped range) and a
    recipe that names it; the engine runs it, and only the activation quantizers differ from the min-max recipe."""
    calls = []

    def half_range(ctx: tfmq.StepContext):
        calls.append((ctx.recipe.name, ctx.config.method, ctx.device.type))
        stats = steps.get_step("activations", "minmax")(ctx)  # a user step may build on a registered one
        for _, q in act_quantizers(ctx.unet):
            q.scale.data = q.scale.data * 0.5
        return {**stats, "halved": True}

    tfmq.register_step("activations", "half_range", half_range)
    tfmq.register_recipe(_rtn_recipe("user_minmax"))
    tfmq.register_recipe(_rtn_recipe("user_half", activations="half_range"))
    c = calib("uncond")
    base = tfmq.quantize(tiny_unet("uncond"), c, small_config("user_minmax"), progress=False)
    mine = tfmq.quantize(tiny_unet("uncond"), c, small_config("user_half"), progress=False)
    assert calls == [("user_half", "user_half", "cpu")]
    stats = get_state(mine).stats["activations"]
    assert stats["mode"] == "half_range" and stats["halved"] is True
    assert get_state(base).stats["activations"]["mode"] == "minmax"
    assert tfmq.quant_summary(mine)["method"] == "user_half"
    # weights: the same integer grids (the recipes share every other step)
    grids = lambda m: {n: [wq.w_int for wq in l.wq] for n, l in quant_layers(m)}  # noqa: E731
    g_base, g_mine = grids(base), grids(mine)
    assert g_base.keys() == g_mine.keys() and all(
        torch.equal(a, b) for n in g_base for a, b in zip(g_base[n], g_mine[n]))
    # activations: every step size exactly halved (a power of two), zero points untouched
    a_base, a_mine = dict(act_quantizers(base)), dict(act_quantizers(mine))
    assert a_base.keys() == a_mine.keys() and len(a_base) > 0
    for n in a_base:
        assert a_base[n].mode == a_mine[n].mode == "shared", n
        assert torch.equal(a_mine[n].scale * 2, a_base[n].scale), n
        assert torch.equal(a_mine[n].zero_point, a_base[n].zero_point), n
    x = unet_inputs("uncond")
    assert float((run(mine, x) - run(base, x)).abs().max()) > 1e-3  # and the model computes something else
