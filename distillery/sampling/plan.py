"""The sampling plan: every rule of a request's sampling, decided in ONE place.

Given what the loaded model and the operator allow (`ModelLimits`), the request's adapters and what the
client asked (`Ask`, any API's fields mapped to the native names), `plan_sampling` decides guidance,
mode (rows per step), scheduler, steps and size, or refuses with `PlanRefused` naming the field and the
allowed values. Every API, the engine, the CLI, the OpenAPI document and the playground ask it; nobody
else writes a step cap, a default scheduler or a mode test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache

from diffusers import LCMScheduler

from distillery.adapters import STEP_DISTILLED, W_CONDITIONED, AdapterSet, LoadedAdapter
from distillery.sampling.sampler import SCHEDULERS, make_scheduler

SCHEDULER_NAMES = tuple(SCHEDULERS)  # what a request may name
DEFAULT_SCHEDULER = "ddim"  # without a distilled adapter's own
DEFAULT_STEPS = 25  # a model folder that states none (distillery.json)
MAX_STEPS = 1000  # the request schemas' static bound; the loaded model's is `ModelLimits.max_steps`
MAX_GUIDANCE = 30.0
DEFAULT_MAX_STEPS = 150  # the operator's default cap on steps per image (DISTILLERY_MAX_STEPS raises it)
DEFAULT_MAX_COST = 2000.0  # UNet row-steps at the native size per request (DISTILLERY_MAX_REQUEST_COST)
WEIGHT_RANGE = (0.0, 2.0)  # an adapter's LoRA scale in a request, a prompt tag or a preset
RESCALE_RANGE = (0.0, 1.0)  # CFG's std rescale (Lin et al. 2023; diffusers' guidance_rescale): 0 off, 0.7 for zero-SNR
CFG, SINGLE_EVAL = "cfg", "single-eval"


class PlanRefused(ValueError):
    """A request the plan cannot sample as asked: 422 naming `field` (the message says what is allowed)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def config_max_steps(config: dict) -> int:
    """Most steps a scheduler config allows ("leading" spacing with an offset loses some)."""
    offset = config.get("steps_offset", 0) if config.get("timestep_spacing", "leading") == "leading" else 0
    return int(config.get("num_train_timesteps", 1000)) - offset


def scheduler_max_steps(name: str, config: dict) -> int:
    """The most steps scheduler `name` takes with `config` (LCM samples from its original_inference_steps grid)."""
    if name == "lcm":
        return int(config.get("original_inference_steps")
                   or LCMScheduler.from_config(config).config.original_inference_steps)
    return int(config["num_train_timesteps"])


@lru_cache(maxsize=4096)
def _timesteps_in_range(name: str, config_json: str, steps: int) -> bool:
    scheduler = make_scheduler(name, json.loads(config_json))
    scheduler.set_timesteps(steps)
    t = scheduler.timesteps
    return bool(0 <= int(t.min()) and int(t.max()) < scheduler.config.num_train_timesteps)


def schedule_is_sound(name: str, config: dict, steps: int) -> bool:
    """Whether scheduler `name` at `steps` samples only trained timesteps: DPM-Solver at 999 steps on SD's "leading"
    spacing with steps_offset 1 asks for t = 1000, whose alpha does not exist (NaN latents, a black image)."""
    return _timesteps_in_range(name, json.dumps(config, sort_keys=True, default=str), steps)


@dataclass(frozen=True)
class ModelLimits:
    """What a request may ask of the loaded model here; the OpenAPI document states it, GET /model shows it."""

    default_guidance: float
    default_steps: int  # the model's own, within the caps
    max_steps: int  # the schema's, the scheduler config's and the operator's caps
    native_size: int
    size_step: int
    scheduler_config: dict = field(default_factory=dict, compare=False, repr=False)
    max_cost: float = float("inf")  # a request's UNet row-steps at the native size, all its images
    default_guidance_rescale: float = 0.0  # the model's own (distillery.json), for its CFG requests
    family: str = "sd"  # DiffusionModel.family

    @classmethod
    def of(cls, model, max_steps: int | None = None, max_cost: float | None = None) -> ModelLimits:
        """From a loaded model (a DiffusionModel) and the operator's caps on steps and cost (None: none)."""
        most = max(1, min([MAX_STEPS, config_max_steps(model.scheduler_config)] + ([max_steps] if max_steps else [])))
        steps = int(model.defaults.get("steps", DEFAULT_STEPS))
        return cls(float(model.defaults.get("guidance", 0.0)), min(steps, most), most, model.default_size,
                   model.size_step, dict(model.scheduler_config), float("inf") if max_cost is None else max_cost,
                   float(model.defaults.get("guidance_rescale", 0.0)), model.family)

    @property
    def max_size(self) -> int:
        """Largest width or height: twice the native size."""
        return 2 * self.native_size

    @property
    def sides(self) -> range:
        """Every width (and height) allowed: the multiples of the size step up to the largest."""
        return range(self.size_step, self.max_size + 1, self.size_step)

    @property
    def schedulers(self) -> tuple[str, ...]:
        return SCHEDULER_NAMES


@dataclass(frozen=True)
class Ask:
    """What a client asked for its sampling, in the native API's names; None: the default."""

    guidance: float | None = None
    steps: int | None = None
    scheduler: str | None = None
    width: int | None = None
    height: int | None = None
    negative_prompt: str = ""
    guidance_rescale: float | None = None


@dataclass(frozen=True)
class SamplingPlan:
    """How one image is sampled: everything the sampler and the engine need, decided."""

    guidance: float
    steps: int
    scheduler: str
    single_eval: bool  # a w-conditioned adapter in the set: ONE UNet row per step at w; else CFG's two
    width: int
    height: int
    negative_prompt: str = ""
    scheduler_overrides: dict = field(default_factory=dict, compare=False)  # the distilled adapter's config
    guidance_rescale: float = 0.0  # CFG only: single-eval has no unconditional branch to rescale against

    @property
    def mode(self) -> str:
        return SINGLE_EVAL if self.single_eval else CFG

    @property
    def rows_per_step(self) -> int:
        return 1 if self.single_eval else 2

    def step_cost(self, native_size: int) -> float:
        """A step's share of the engine's budget, in UNet rows at the native size (a 2x-size image counts 4x)."""
        return self.rows_per_step * self.height * self.width / native_size**2

    def cost(self, native_size: int) -> float:
        """The whole image's work: UNet row-steps at the native size."""
        return self.steps * self.step_cost(native_size)

    def prompts(self, prompt: str) -> list[str | None]:
        """What the request encodes: its prompt alone (single-eval) or with the unconditional branch's (CFG):
        the negative prompt, or None without one (the model's family says what that is: model.encode_prompts)."""
        return [prompt] if self.single_eval else [prompt, self.negative_prompt or None]


def distilled_adapter(chosen: AdapterSet) -> LoadedAdapter | None:
    """The set's w-conditioned adapter (it makes sampling single-eval), if any; at most one is allowed."""
    distilled = [a for a, _ in chosen if a.meta.kind in W_CONDITIONED]
    if len(distilled) > 1:
        raise PlanRefused("adapters", f"adapters: at most one distilled adapter (kind {' / '.join(W_CONDITIONED)}) "
                                      f"per request, got {[a.name for a in distilled]} (allowed: one of them, with "
                                      f"any style adapters)")
    return distilled[0] if distilled else None


def check_request(limits: ModelLimits, steps: int | None = None, width: int | None = None,
                  height: int | None = None) -> None:
    """The checks that need no adapters: sizes and the step cap (a route may ask before anything is queued)."""
    for name, value in (("width", width), ("height", height)):
        if value is not None and value not in limits.sides:
            raise PlanRefused(name, f"{name}: {value} is not allowed (allowed: a multiple of {limits.size_step} in "
                                    f"[{limits.size_step}, {limits.max_size}])")
    if steps is not None and not 1 <= steps <= limits.max_steps:
        raise PlanRefused("steps", f"steps: {steps} is more than this server allows (allowed: integer in "
                                   f"[1, {limits.max_steps}])")


def check_cost(limits: ModelLimits, plans: list[SamplingPlan]) -> None:
    """A request's images together within the operator's cost cap (its images are queued all or none)."""
    total = sum(p.cost(limits.native_size) for p in plans)
    if total > limits.max_cost:
        first = plans[0]
        raise PlanRefused("n", f"n: {len(plans)} images x {first.steps} steps x {first.rows_per_step} UNet rows at "
                               f"{first.width}x{first.height} cost {total:g} row-steps at the native size, more than "
                               f"this server takes in one request (allowed: at most {limits.max_cost:g}: fewer images, "
                               f"steps or pixels)")


def plan_sampling(limits: ModelLimits, chosen: AdapterSet, ask: Ask) -> SamplingPlan:
    """The plan for a request with adapters `chosen`, or PlanRefused naming the field and the allowed values."""
    check_request(limits, ask.steps, ask.width, ask.height)
    names = [a.name for a, _ in chosen]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise PlanRefused("adapters", f"adapters: {twice} named more than once (by the list, a preset or a <lora:> "
                                      f"tag; allowed: each adapter once, its weight in [{WEIGHT_RANGE[0]:g}, "
                                      f"{WEIGHT_RANGE[1]:g}])")
    distilled = distilled_adapter(chosen)
    meta = distilled.meta if distilled else None
    guidance = limits.default_guidance if ask.guidance is None else float(ask.guidance)
    if meta and not meta.w_min <= guidance <= meta.w_max:
        raise PlanRefused("guidance", f"guidance: {guidance} is outside adapter {distilled.name!r}'s trained range "
                                      f"(allowed: [{meta.w_min}, {meta.w_max}])")
    if ask.negative_prompt and distilled:
        raise PlanRefused("negative_prompt", "negative_prompt: only in cfg mode; a guidance-distilled adapter "
                                             "samples without the unconditional branch")
    rescale = limits.default_guidance_rescale if ask.guidance_rescale is None else float(ask.guidance_rescale)
    if not RESCALE_RANGE[0] <= rescale <= RESCALE_RANGE[1]:
        raise PlanRefused("guidance_rescale", f"guidance_rescale: {rescale} is not allowed (allowed: "
                                              f"[{RESCALE_RANGE[0]:g}, {RESCALE_RANGE[1]:g}])")
    if ask.guidance_rescale and distilled:
        raise PlanRefused("guidance_rescale", "guidance_rescale: only in cfg mode (allowed: 0 or none with a "
                                              "guidance-distilled adapter)")
    scheduler = ask.scheduler or (meta.recommended_scheduler if meta else DEFAULT_SCHEDULER)
    if scheduler not in SCHEDULER_NAMES:
        raise PlanRefused("scheduler", f"scheduler: {scheduler!r} is unknown (allowed: {' or '.join(SCHEDULER_NAMES)})")
    if meta and meta.schedulers and scheduler not in meta.schedulers:
        raise PlanRefused("scheduler", f"scheduler: {scheduler!r} cannot sample adapter {distilled.name!r} "
                                       f"(allowed: {' or '.join(meta.schedulers)})")
    steps = ask.steps or (meta.recommended_steps if meta and meta.kind in STEP_DISTILLED else limits.default_steps)
    if steps > limits.max_steps:  # an adapter's recommendation obeys the caps a request does
        raise PlanRefused("steps", f"steps: {steps} (adapter {distilled.name!r}'s recommendation) is more than this "
                                   f"server allows (allowed: integer in [1, {limits.max_steps}])")
    if meta and meta.steps and steps not in meta.steps:
        contiguous = len(meta.steps) > 1 and meta.steps == list(range(min(meta.steps), max(meta.steps) + 1))
        allowed = f"integer in [{min(meta.steps)}, {max(meta.steps)}]" if contiguous else f"one of {meta.steps}"
        raise PlanRefused("steps", f"steps: adapter {distilled.name!r} was distilled for other step counts than "
                                   f"{steps} (allowed: {allowed})")
    overrides = dict(meta.scheduler_config) if meta else {}
    most = scheduler_max_steps(scheduler, {**limits.scheduler_config, **overrides})
    if steps > most:
        raise PlanRefused("steps", f"steps: {steps} is more than the {scheduler} scheduler takes (allowed: integer in "
                                   f"[1, {most}])")
    if not schedule_is_sound(scheduler, {**limits.scheduler_config, **overrides}, steps):
        raise PlanRefused("steps", f"steps: {steps} with the {scheduler} scheduler would sample a timestep this model "
                                   f"was not trained on (allowed: fewer steps, or another scheduler)")
    return SamplingPlan(guidance, steps, scheduler, distilled is not None, ask.width or limits.native_size,
                        ask.height or limits.native_size, ask.negative_prompt, overrides,
                        0.0 if distilled else rescale)
