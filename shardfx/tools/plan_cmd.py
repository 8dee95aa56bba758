"""`shardfx plan`: the configuration the planner would run, its predicted step time and peak, and the next best.

The planner (shardfx/planner.py, what Config(plan="auto") runs) compiles every
candidate configuration of the model for the world size (ZeRO stage, resharding,
recomputation, tensor and pipeline degrees; bucket sizes, overlap and prefetch
planned by tune_communication inside each compile), simulates each on the
hardware profile and keeps the fastest whose per-rank peak fits the memory.

    shardfx plan gpt --world-size 4 --memory 80MiB
    shardfx plan gpt --preset tiny --world-size 8 --memory 80GB --hardware h100
    shardfx plan my_model.py:make --world-size 4 --memory 2GiB --config mixed_precision='"bf16"'
    shardfx plan gpt --world-size 4 --memory 40MiB --keep tp_size --keep pp_size   # data parallel only

A Config field given with --config is kept; a searched one (zero_stage, tp_size, ...) is then
not searched. Memory: bytes, or a number with a unit (KB MB GB TB: powers of 1000;
KiB MiB GiB TiB: powers of 1024).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from shardfx.config import Config
from shardfx.graphs.cost_model import AUTO, PROFILES
from shardfx.planner import SEARCHED, plan_step
from shardfx.tools.model_spec import add_model_spec_arguments, model_spec_from_args
from shardfx.tools.options import key_value, non_negative_int, positive_int

NAME = "plan"
HELP = "choose the fastest configuration that fits a per-rank memory limit (what Config(plan='auto') runs)"

UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}
UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def memory_bytes(text: str) -> float:
    """argparse type: '80GB', '512MiB', '1.5e9' (bytes) -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in UNITS:
        raise argparse.ArgumentTypeError(
            f"must be bytes or a number with a unit ({', '.join(u.upper() for u in UNITS if u)}); got {text!r}"
        )
    try:
        value = float(match.group(1)) * UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number with a unit, e.g. 80GB; got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 bytes; got {text!r}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME, help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_spec_arguments(parser)
    parser.add_argument("--world-size", type=positive_int, required=True, metavar="N", help="ranks to plan for")
    parser.add_argument(
        "--memory", type=memory_bytes, metavar="BYTES", help="per-rank memory limit, e.g. 80GB (default: no limit)"
    )
    parser.add_argument(
        "--hardware",
        default=AUTO,
        choices=(AUTO, *sorted(PROFILES)),
        help="the cost model's profile (default auto: this machine's)",
    )
    parser.add_argument(
        "--config",
        dest="config_items",
        metavar="KEY=VALUE",
        type=key_value,
        action="append",
        default=[],
        help="set a Config field, kept by the planner, e.g. --config zero_stage=3 (repeatable)",
    )
    parser.add_argument(
        "--keep",
        metavar="FIELD",
        action="append",
        default=[],
        choices=SEARCHED,
        help="hold a searched field at the Config's value even where that is the default, e.g. --keep tp_size "
        "--keep pp_size: data parallelism only (repeatable)",
    )
    parser.add_argument(
        "--alternatives",
        type=non_negative_int,
        default=5,
        metavar="K",
        help="the next best candidates that fit to show (default %(default)s)",
    )
    parser.add_argument("--json", dest="json_path", metavar="PATH", help="write every candidate's figures as JSON")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    items = dict(args.config_items)
    for key in ("plan", "memory_limit", "hardware"):
        if key in items:
            raise ValueError(f"--config {key}=... is set by `shardfx plan` itself (--memory, --hardware)")
    config = Config.from_dict({**items, "plan": "auto", "memory_limit": args.memory, "hardware": args.hardware})
    spec = model_spec_from_args(args)
    plan = plan_step(spec.model, spec.batch, spec.loss_fn, config, args.world_size, keep=args.keep)
    print(
        f"{spec.label}: {spec.num_params():,} parameters, world size {args.world_size}, global batch {spec.batch[0].shape[0]}"
    )
    print(plan.describe())
    print()
    print(plan.table(args.alternatives))
    if plan.skipped:
        more = f"; ... ({len(plan.skipped) - 3} more: --json lists them)" if len(plan.skipped) > 3 else ""
        print(f"pruned without compiling ({len(plan.skipped)}): " + "; ".join(plan.skipped[:3]) + more)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(plan.as_dict(), indent=2, default=str) + "\n")
        print(f"figures written to {args.json_path}")
    return 0
