"""xl_latency: the SDXL-family toy's whole images, timed as the toy's are (guidance_latency, steps_latency).

- single-eval / CFG: the guidance adapter (guidance-toy-xl) at 25 steps, one evaluation a step, against the
  CFG teacher's two, at w 2: single_eval_ratio, its limit single_eval_limit (W0's own batch-1 call) and
  single_eval_limit_with_lora (the student's measured call), all from the same run's components.
- few steps / CFG: the consistency adapter (lcm-toy-xl) at its recommended steps against the 25-step CFG
  teacher at toy-xl's default w: steps_ratio, steps_limit, steps_limit_with_lora.
Components: text encoding (both encoders, pooled embeddings and the size's time ids), UNet calls at batch 1
and 2, decoding. An adapter not shipped for toy-xl yet has no figures; the run names it.
"""

from __future__ import annotations

from bench.common import toy_with_adapters
from bench.guidance_latency import single_eval_vs_cfg
from bench.steps_latency import few_steps_vs_cfg
from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_XL_MODEL

GUIDANCE, CONSISTENCY = "guidance-toy-xl", "lcm-toy-xl"


def run(quick: bool = False) -> dict:
    names = [name for name in (GUIDANCE, CONSISTENCY) if (EMBEDDED_ADAPTERS / name).is_dir()]
    if len(names) < 2:
        print(f"xl_latency: not shipped for toy-xl yet, so not measured: "
              f"{', '.join(sorted({GUIDANCE, CONSISTENCY} - set(names)))}")
    model, registry, adapters = toy_with_adapters(names, EMBEDDED_XL_MODEL)
    figures = {}
    if GUIDANCE in adapters:
        steps, rounds = (3, 2) if quick else (25, 9)
        single = single_eval_vs_cfg(model, registry, adapters[GUIDANCE], 2.0, steps, rounds)
        figures.update({f"single_eval_{k}": v for k, v in single.items()})
    if CONSISTENCY in adapters:
        teacher_steps, rounds = (8, 2) if quick else (25, 15)
        few = few_steps_vs_cfg(model, registry, adapters[CONSISTENCY], rounds, teacher_steps)
        figures.update({f"steps_{k}": v for k, v in few.items()})
    return figures
