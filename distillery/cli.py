"""`distillery` command line: generate, serve, train the toy model and oracle, distill. Imports lazily:
`distillery serve` loads no training code (tests/test_layout.py checks it)."""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from distillery.paths import EMBEDDED_MODEL


def _generate(args) -> int:
    """One image as the server would make it: the request schema, then the sampling plan, then the pipeline."""
    from pydantic import ValidationError

    from distillery.serving.schemas import GenerateRequest, describe_errors

    raw = {k: getattr(args, k) for k in ("prompt", "guidance", "steps", "seed", "scheduler") if getattr(args, k) is not None}
    try:
        req = GenerateRequest(**raw)
    except ValidationError as exc:
        for e in describe_errors(GenerateRequest, exc.errors()):
            print(f"error: {e['message']}; got {e['input']!r}", file=sys.stderr)
        return 2

    from distillery.adapters import AdapterError, AdapterRegistry
    from distillery.model import DiffusionModel
    from distillery.sampling.pipeline import generate
    from distillery.sampling.plan import Ask, ModelLimits, PlanRefused, plan_sampling
    from distillery.serving.config import get_settings
    from distillery.serving.jobs import random_seed

    model = DiffusionModel.from_pretrained(args.model)
    adapters, registry = (), None
    try:
        if args.adapter:
            registry = AdapterRegistry(model)  # serving an adapter: install the serving layers
            adapter = registry.load(Path(args.adapter).name, args.adapter)
            adapters = ((adapter, 1.0),)
        plan = plan_sampling(ModelLimits.of(model, get_settings().max_steps), adapters,
                             Ask(req.guidance, req.steps, req.scheduler))
    except (AdapterError, PlanRefused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seed = random_seed() if req.seed is None else req.seed
    out = generate(model, [req.prompt], [seed], plan.guidance, plan.steps, scheduler=plan.scheduler, adapters=adapters,
                   registry=registry)
    out.images[0].save(args.output)
    ms = ", ".join(f"{k} {v:.0f} ms" for k, v in out.timings_ms.items())
    print(f"wrote {args.output} ({out.mode}: w={plan.guidance}, {plan.scheduler} steps={plan.steps}, "
          f"{out.unet_evaluations} UNet evaluations, seed={seed}; {ms})")
    return 0


def _train_oracle(args) -> int:
    from distillery.distill.toy.oracle import train_oracle

    train_oracle()
    return 0


def _training(module: str, config: str, function: str):
    """A training command's run function: `function(config(**options))`, imported when the command runs."""

    def run(args) -> int:
        from distillery.distill.methods.prune_spec import PruneSpecError

        mod = importlib.import_module(module)
        config_cls = getattr(mod, config)
        try:  # bad input, found before training: the message, no traceback
            cfg = config_cls(**{f.name: getattr(args, f.name) for f in fields(config_cls)})
        except ValueError as exc:  # a field's value
            return _refuse(exc)
        try:
            getattr(mod, function)(cfg)
        except PruneSpecError as exc:
            return _refuse(exc)
        return 0

    return run


def _refuse(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def _add_config_options(parser: argparse.ArgumentParser, config_cls) -> None:
    """One --option per dataclass field; lists are comma-separated, bools take true/false."""
    for f in fields(config_cls):
        default = f.default if f.default_factory is MISSING else f.default_factory()
        if isinstance(default, list):
            item = type(default[0]) if default else str
            kind = lambda v, item=item: [item(x) for x in v.split(",") if x]  # noqa: E731
        else:
            kind = {bool: lambda v: v.lower() in ("1", "true", "yes")}.get(type(default), type(default))
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=default,
                            help=f"default: {shown}")


def _serve(args) -> int:
    import uvicorn

    from distillery.serving.config import get_settings

    # The factory loads the model behind a live socket (/healthz answers meanwhile); SIGTERM drains in-flight
    # requests for at most graceful_shutdown_s.
    uvicorn.run("distillery.serving.app:serving_app", factory=True, host=args.host, port=args.port,
                timeout_graceful_shutdown=get_settings().graceful_shutdown_s)
    return 0


TRAINING = {  # command -> (module, config class, function, help): imported only when that command runs
    "train-toy": ("distillery.distill.toy.train", "ToyTrainConfig", "train_toy",
                  "train the embedded toy model (VAE, then UNet + text encoder)"),
    "distill-guidance": ("distillery.distill.methods.guidance", "GuidanceDistillConfig", "distill_guidance",
                         "guidance distillation: LoRA + w projection over the shared base"),
    "distill-consistency": ("distillery.distill.methods.consistency", "ConsistencyDistillConfig",
                            "distill_consistency",
                            "consistency distillation (LCM-LoRA, w kept an input) over the shared base"),
    "distill-progressive": ("distillery.distill.methods.progressive", "ProgressiveDistillConfig",
                            "distill_progressive", "progressive distillation: halve the guidance adapter's steps"),
    "train-style": ("distillery.distill.methods.style", "StyleTrainConfig", "train_style",
                    "train the toy's style LoRA (stripes) over the shared base"),
    "prune": ("distillery.distill.methods.prune", "PruneConfig", "prune",
              "block pruning + layer-level KD: a smaller base model folder (--level 1|2, or --level 0 --drop ...)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; a training command's options (one per config field) are added only when it is `command`."""
    parser = argparse.ArgumentParser(prog="distillery")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text -> PNG with the CFG sampler")
    g.add_argument("prompt")
    g.add_argument("--guidance", type=float, help="w (nan/inf are rejected by the schema): eps = (1+w) eps(c) - w eps(empty); default: the model's")
    g.add_argument("--steps", type=int)
    g.add_argument("--seed", type=int, help="default: a random one, printed")
    g.add_argument("--scheduler", help="default: the adapter's own, else ddim")
    g.add_argument("--model", default=str(EMBEDDED_MODEL))
    g.add_argument("--adapter", help="an adapter folder; a guidance-distilled one samples with one UNet call per step")
    g.add_argument("-o", "--output", default="out.png")
    g.set_defaults(run=_generate)

    for name, (module, config, function, help_text) in TRAINING.items():
        t = sub.add_parser(name, help=help_text)
        if name == command:
            _add_config_options(t, getattr(importlib.import_module(module), config))
        t.set_defaults(run=_training(module, config, function))

    o = sub.add_parser("train-oracle", help="train the colour/shape oracle on ground-truth renders")
    o.set_defaults(run=_train_oracle)

    s = sub.add_parser("serve", help="start the HTTP server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(next((a for a in argv if not a.startswith("-")), None)).parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
