"""`distillery` command line: generate, train the toy model and oracle, serve."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

DEFAULT_MODEL = str(Path(__file__).resolve().parent.parent / "models" / "toy")


def _generate(args) -> int:
    from pydantic import ValidationError

    from server.schemas import GenerateRequest, describe_errors

    raw = {k: getattr(args, k) for k in ("prompt", "guidance", "steps", "seed", "scheduler") if getattr(args, k) is not None}
    try:
        req = GenerateRequest(**raw)
    except ValidationError as exc:
        for e in describe_errors(GenerateRequest, exc.errors()):
            print(f"error: {e['message']}; got {e['input']!r}", file=sys.stderr)
        return 2

    from server.model import DiffusionModel
    from server.pipeline import generate

    model = DiffusionModel.from_pretrained(args.model)
    guidance = req.guidance if req.guidance is not None else model.defaults.get("guidance", 0.0)
    steps = req.steps or model.defaults.get("steps", 25)
    out = generate(model, [req.prompt], [req.seed], guidance, steps, scheduler=req.scheduler)
    out.images[0].save(args.output)
    ms = ", ".join(f"{k} {v:.0f} ms" for k, v in out.timings_ms.items())
    print(f"wrote {args.output} (w={guidance}, steps={steps}, seed={req.seed}; {ms})")
    return 0


def _train_toy(args) -> int:
    from distill.train_toy import ToyTrainConfig, train_toy

    cfg = ToyTrainConfig(**{f.name: getattr(args, f.name) for f in fields(ToyTrainConfig)})
    train_toy(cfg)
    return 0


def _train_oracle(args) -> int:
    from distill.oracle import train_oracle

    train_oracle()
    return 0


def _serve(args) -> int:
    import uvicorn

    uvicorn.run("server.app:create_app", factory=True, host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distillery")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text -> PNG with the CFG sampler")
    g.add_argument("prompt")
    g.add_argument("--guidance", type=float, help="w (nan/inf are rejected by the schema): eps = (1+w) eps(c) - w eps(empty); default: the model's")
    g.add_argument("--steps", type=int)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--scheduler", default="ddim")
    g.add_argument("--model", default=DEFAULT_MODEL)
    g.add_argument("-o", "--output", default="out.png")
    g.set_defaults(run=_generate)

    from distill.train_toy import ToyTrainConfig

    t = sub.add_parser("train-toy", help="train the embedded toy model (VAE, then UNet + text encoder)")
    for f in fields(ToyTrainConfig):
        t.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=f.default)
    t.set_defaults(run=_train_toy)

    o = sub.add_parser("train-oracle", help="train the colour/shape oracle on ground-truth renders")
    o.set_defaults(run=_train_oracle)

    s = sub.add_parser("serve", help="start the HTTP server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
