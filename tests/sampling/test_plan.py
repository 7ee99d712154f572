"""The sampling plan: every rule of a request's sampling, decided in one place, refusals naming field and values."""

from pathlib import Path

import pytest

from distillery.adapters import AdapterMeta, LoadedAdapter
from distillery.sampling.plan import (SCHEDULER_NAMES, Ask, ModelLimits, PlanRefused, check_request, config_max_steps,
                                      plan_sampling)

LIMITS = ModelLimits(default_guidance=1.5, default_steps=25, max_steps=1000, native_size=32, size_step=8,
                     scheduler_config={"num_train_timesteps": 1000})


def _adapter(kind: str, **meta) -> LoadedAdapter:
    return LoadedAdapter(kind, Path(kind), AdapterMeta(kind=kind, base_fingerprint="x", rank=4, alpha=4.0,
                                                       target_modules=[], **meta), {}, None)


GUIDANCE = _adapter("guidance", w_min=0.0, w_max=4.0)
LCM = _adapter("consistency", w_min=0.0, w_max=3.0, recommended_scheduler="lcm", recommended_steps=4,
               schedulers=["lcm"], steps=list(range(1, 9)), scheduler_config={"original_inference_steps": 50})
PROGRESSIVE = _adapter("progressive", w_min=0.0, w_max=3.0, recommended_steps=8, schedulers=["ddim"], steps=[8])
STYLE = _adapter("style")


def _refused(chosen, ask, field: str, *words: str) -> None:
    with pytest.raises(PlanRefused) as exc:
        plan_sampling(LIMITS, chosen, ask)
    assert exc.value.field == field and all(w in str(exc.value) for w in words), str(exc.value)


def test_without_a_distilled_adapter_a_request_is_cfg_with_the_models_defaults():
    plan = plan_sampling(LIMITS, ((STYLE, 0.5),), Ask())
    assert (plan.mode, plan.rows_per_step, plan.guidance, plan.steps, plan.scheduler) == ("cfg", 2, 1.5, 25, "ddim")
    assert (plan.width, plan.height) == (32, 32) and plan.prompts("a") == ["a", None]  # None: no negative prompt


def test_a_distilled_adapter_makes_it_single_eval_with_its_own_recipe():
    plan = plan_sampling(LIMITS, ((LCM, 1.0), (STYLE, 1.0)), Ask(guidance=1.0))
    assert (plan.mode, plan.rows_per_step, plan.steps, plan.scheduler) == ("single-eval", 1, 4, "lcm")
    assert plan.scheduler_overrides == {"original_inference_steps": 50} and plan.prompts("a") == ["a"]
    assert plan_sampling(LIMITS, ((GUIDANCE, 1.0),), Ask()).steps == 25  # guidance-only: the model's steps
    assert plan_sampling(LIMITS, ((PROGRESSIVE, 1.0),), Ask(guidance=1.0)).steps == 8


def test_guidance_rescale_is_the_models_default_in_cfg_mode_and_off_in_single_eval():
    limits = ModelLimits(**{**LIMITS.__dict__, "default_guidance_rescale": 0.7})  # a zero-SNR model's distillery.json
    assert plan_sampling(limits, (), Ask()).guidance_rescale == 0.7
    assert plan_sampling(limits, (), Ask(guidance_rescale=0.0)).guidance_rescale == 0.0
    assert plan_sampling(limits, ((GUIDANCE, 1.0),), Ask()).guidance_rescale == 0.0  # nothing to rescale against
    assert plan_sampling(LIMITS, ((STYLE, 1.0),), Ask(guidance_rescale=0.3)).guidance_rescale == 0.3


def test_step_cost_counts_rows_and_pixels_at_the_native_size():
    assert plan_sampling(LIMITS, (), Ask(width=64, height=64)).step_cost(32) == 8
    assert plan_sampling(LIMITS, ((GUIDANCE, 1.0),), Ask()).step_cost(32) == 1


@pytest.mark.parametrize("chosen, ask, field, words", [
    (((GUIDANCE, 1.0), (LCM, 1.0)), Ask(), "adapters", ["at most one distilled adapter"]),
    (((GUIDANCE, 1.0),), Ask(guidance=5.0), "guidance", ["5.0", "[0.0, 4.0]"]),
    (((GUIDANCE, 1.0),), Ask(negative_prompt="blue"), "negative_prompt", ["only in cfg mode"]),
    (((GUIDANCE, 1.0),), Ask(guidance_rescale=0.7), "guidance_rescale", ["only in cfg mode"]),
    ((), Ask(guidance_rescale=1.5), "guidance_rescale", ["1.5", "[0, 1]"]),
    (((LCM, 1.0),), Ask(guidance=1.0, scheduler="ddim"), "scheduler", ["allowed: lcm"]),
    (((LCM, 1.0),), Ask(guidance=1.0, steps=9), "steps", ["integer in [1, 8]"]),
    (((PROGRESSIVE, 1.0),), Ask(guidance=1.0, steps=4), "steps", ["one of [8]"]),
    ((), Ask(scheduler="heun"), "scheduler", ["ddim or euler"]),
    ((), Ask(width=36), "width", ["multiple of 8 in [8, 64]"]),
    ((), Ask(height=72), "height", ["multiple of 8 in [8, 64]"]),
    ((), Ask(steps=1001), "steps", ["[1, 1000]"]),
])
def test_refusals_name_the_field_and_the_allowed_values(chosen, ask, field, words):
    _refused(chosen, ask, field, *words)


def test_the_lcm_grid_caps_its_steps_and_the_operator_caps_the_default():
    _refused((), Ask(scheduler="lcm", steps=60), "steps", "lcm scheduler takes", "[1, 50]")
    capped = ModelLimits(1.5, min(25, 3), 3, 32, 8, {"num_train_timesteps": 1000})
    assert plan_sampling(capped, (), Ask()).steps == 3
    with pytest.raises(PlanRefused, match=r"\[1, 3\]"):
        check_request(capped, steps=4)


def test_leading_spacing_with_an_offset_loses_a_step():
    assert config_max_steps({"num_train_timesteps": 1000, "steps_offset": 1}) == 999
    assert config_max_steps({"num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "trailing"}) == 1000
    assert SCHEDULER_NAMES == ("ddim", "euler", "euler_a", "dpm", "lcm")
