"""`shardfx estimate`: model-state memory per rank under ZeRO stages 0-3.

The arithmetic is Table 1 of the ZeRO paper (Rajbhandari et al., 2020) for
mixed-precision Adam: every parameter costs 2 bytes (fp16/bf16 weight),
2 bytes (fp16/bf16 gradient) and K bytes of optimizer state (fp32 master
weight, momentum and variance: K = 12). Stage s shards the last s of these
three over the Nd data-parallel ranks.

    shardfx estimate --params 7.5e9 --world-size 64        # 120 / 31.4 / 16.6 / 1.88 GB
    shardfx estimate --model gpt --preset base --set n_layer=12 --world-size 8

With --simulate HARDWARE and a --model, the model is also compiled on paper (fake
tensors: no memory, any size) and one rank's step is simulated by the cost model,
for ZeRO-3 unplanned, with its defaults (buckets and prefetch planned for that
hardware) and with --bucket-mb by hand:

    shardfx estimate --model gpt --set vocab_size=32000 --set n_layer=32 --set d_model=4096 \
        --set n_head=32 --set seq_len=2048 --world-size 64 --simulate h100 --bf16
"""

from __future__ import annotations

import argparse

import torch

from shardfx.models import build_model, num_params
from shardfx.tools.options import add_model_arguments, model_kwargs, non_negative_int, positive_float, positive_int

NAME = "estimate"
HELP = "per-rank model-state memory for ZeRO stages 0-3 (ZeRO paper, Table 1)"

PARAM_BYTES = 2  # fp16/bf16 weights used in forward and backward
GRAD_BYTES = 2  # fp16/bf16 gradients

# Which of (parameters, gradients, optimizer states) each stage shards over the dp ranks.
SHARDED: dict[int, tuple[bool, bool, bool]] = {
    0: (False, False, False),
    1: (False, False, True),
    2: (False, True, True),
    3: (True, True, True),
}
STAGE_NAMES = {
    0: "nothing (DDP)",
    1: "optimizer states",
    2: "+ gradients",
    3: "+ parameters",
}
# Table 1's per-parameter bytes, as the paper writes them.
FORMULAS = {0: "(2+2+K)", 1: "(2+2+K/Nd)", 2: "(2+(2+K)/Nd)", 3: "(2+2+K)/Nd"}


def zero_model_state_bytes(params: float, world_size: int, stage: int, k: int = 12, tp: int = 1) -> float:
    """Bytes of model states (weights, gradients, optimizer states) one rank holds.

    `params` is the model's parameter count Psi, `world_size` the number of
    data-parallel ranks Nd, `k` the optimizer-state bytes per parameter (12 for
    mixed-precision Adam). Stage 0: (2+2+K)Psi; 1: (2+2+K/Nd)Psi;
    2: (2+(2+K)/Nd)Psi; 3: (2+2+K)Psi/Nd. With tensor parallelism over `tp` ranks each
    rank first holds Psi/tp parameters (all of them split, as Megatron's estimate assumes),
    and ZeRO shards that over the Nd data-parallel ranks.
    """
    if stage not in SHARDED:
        raise ValueError(f"ZeRO stage must be one of {sorted(SHARDED)}; got {stage!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1; got {world_size!r}")
    if not params >= 0:
        raise ValueError(f"params must be >= 0; got {params!r}")
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be an integer >= 1; got {tp!r}")
    params = params / tp
    if not k >= 0:
        raise ValueError(f"k (optimizer-state bytes per parameter) must be >= 0; got {k!r}")
    # With tensor parallelism, params would become params / tp and the sharding
    # divisor world_size // tp; every term below keeps its form.
    dp = world_size
    per_param = sum(
        nbytes / dp if sharded else nbytes for nbytes, sharded in zip((PARAM_BYTES, GRAD_BYTES, k), SHARDED[stage])
    )
    return per_param * params


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME, help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_argument_group("model size (give --params or --model)")
    size.add_argument("--params", type=positive_float, help="number of parameters, e.g. 7.5e9")
    add_model_arguments(size, model_default=None)
    parser.add_argument(
        "--world-size",
        type=positive_int,
        metavar="N",
        required=True,
        help="number of data-parallel ranks Nd that ZeRO shards over",
    )
    parser.add_argument(
        "--tp", type=positive_int, default=1, help="tensor-parallel ranks that split every layer first (default 1)"
    )
    pipe = parser.add_argument_group("pipeline parallelism (with --model: each stage as split_stages cuts it)")
    pipe.add_argument("--pp", type=positive_int, default=1, help="pipeline stages (default 1)")
    pipe.add_argument(
        "--pp-microbatches", type=positive_int, metavar="M", help="micro-batches a step (default 2 x --pp)"
    )
    pipe.add_argument("--pp-schedule", choices=("gpipe", "1f1b"), default="1f1b", help="schedule (default 1f1b)")
    parser.add_argument(
        "--k", type=non_negative_int, default=12, help="optimizer-state bytes per parameter (12: mixed-precision Adam)"
    )
    sim = parser.add_argument_group("simulation (with --model)")
    sim.add_argument(
        "--simulate",
        metavar="HARDWARE",
        help="simulate one rank's step with the cost model on this profile (cpu, a100, h100, h200, h100-ib)",
    )
    sim.add_argument("--batch", type=positive_int, default=1, help="sequences per rank (default %(default)s)")
    sim.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    sim.add_argument(
        "--bucket-mb",
        type=positive_float,
        default=25.0,
        help="bucket size of the bucketed scenario (default %(default)s)",
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.params is not None and args.model is not None:
        raise ValueError("give either --params or --model, not both")
    if args.params is None and args.model is None:
        raise ValueError("give the model size: --params N or --model NAME [--preset P] [--set key=value]")
    if args.params is None and args.model is not None:
        params, source = count_params(args.model, args.preset, args.overrides)
    else:
        if args.preset is not None or args.overrides:
            raise ValueError("--preset and --set describe a --model; they do not apply to --params")
        params, source = args.params, "--params"
    if args.tp > 1 and args.model is not None:
        from shardfx.tools.simulate import tp_held_params

        held, total = tp_held_params(args.model, model_kwargs(args.model, args.preset, args.overrides), args.tp)
        print(
            f"tensor-parallel plan at tp={args.tp} (shardfx passes --config tp_size={args.tp} shows it): rank 0 holds "
            f"{_count(held)} of {_count(total)} parameters ({held / total:.1%}; every one split would be {1 / args.tp:.1%}); "
            "the table below assumes every parameter split, as Megatron's estimate does"
        )
    print(format_table(params / args.pp, args.world_size, args.k, source, args.tp))
    if args.pp > 1:
        micro = args.pp_microbatches or 2 * args.pp
        if args.model is None:
            print(
                f"pipeline: {args.pp} stages; the table counts 1/{args.pp} of the parameters a stage (give --model for the cut)"
            )
        else:
            from shardfx.tools.simulate import format_stage_rows, pp_stage_rows

            kwargs = model_kwargs(args.model, args.preset, args.overrides)
            rows = pp_stage_rows(args.model, kwargs, args.pp, micro, args.pp_schedule, args.batch)
            print()
            print(format_stage_rows(rows, micro, args.pp_schedule))
    if args.simulate:
        if args.model is None:
            raise ValueError("--simulate needs a --model (a parameter count has no graph to simulate)")
        from shardfx.tools.simulate import Scenario, format_simulations, simulate_scenarios

        mp = "bf16" if args.bf16 else None
        tp = f" x tp{args.tp}" if args.tp > 1 else ""
        common = {"zero_stage": 3, "mixed_precision": mp, "tp_size": args.tp}
        scenarios = [
            Scenario(
                f"ZeRO-3{tp} unplanned (bucket_mb=0, no overlap)", shardfx_config(**common, bucket_mb=0, overlap=False)
            ),
            Scenario(
                f"ZeRO-3{tp} default (planned by the cost model)", shardfx_config(**common, hardware=args.simulate)
            ),
            Scenario(
                f"ZeRO-3{tp} + bucket {args.bucket_mb:g} MiB + overlap, prefetch 1",
                shardfx_config(**common, bucket_mb=args.bucket_mb, overlap=True, prefetch=1),
            ),
        ]
        kwargs = model_kwargs(args.model, args.preset, args.overrides)
        rows = simulate_scenarios(args.model, kwargs, args.world_size, args.batch, args.simulate, scenarios)
        print()
        print(format_simulations(rows, args.simulate))
    return 0


def shardfx_config(**kwargs: object):  # noqa: ANN201 - imported lazily to keep the plain table fast
    import shardfx

    return shardfx.Config(**kwargs)


def count_params(model: str, preset: str | None, overrides: list) -> tuple[int, str]:
    """Unique parameter count of a built-in model, built on the meta device (no memory, any size)."""
    kwargs = model_kwargs(model, preset, overrides)
    with torch.device("meta"):
        built, _, _ = build_model(model, **kwargs)
    described = " ".join([model] + [f"{k}={v}" for k, v in kwargs.items()])
    return num_params(built), described


def format_table(params: float, world_size: int, k: int, source: str = "", tp: int = 1) -> str:
    lines = [
        f"model states per rank, mixed-precision Adam (K={k}): {_count(params)} parameters"
        + (f" ({source})" if source else "")
        + f", Nd={world_size} data-parallel ranks"
        + (f" x tp={tp}" if tp > 1 else ""),
        f"{'stage':<6} {'sharded over Nd':<17} {'bytes per parameter':<21} {'per rank (GB)':>13}",
    ]
    for stage in SHARDED:
        nbytes = zero_model_state_bytes(params, world_size, stage, k, tp)
        per_param = f"{FORMULAS[stage]} = {nbytes * tp / params:.3g}" if params else FORMULAS[stage]
        lines.append(f"{stage:<6} {STAGE_NAMES[stage]:<17} {per_param:<21} {_gb(nbytes):>13}")
    if tp > 1:
        lines.append(
            f"parameters per rank: {_count(params / tp)} with tp={tp}; "
            f"{_count(params / tp / world_size)} with ZeRO-3 over the {world_size} data-parallel ranks on top"
        )
    lines.append("GB = 1e9 bytes; activations, buffers and fragmentation are not included")
    return "\n".join(lines)


def _gb(nbytes: float) -> str:
    """Gigabytes to three significant figures, without exponent notation (120, 31.4, 1.88, 0.0123)."""
    gb = nbytes / 1e9
    if gb >= 100:
        return f"{gb:.0f}"
    if gb >= 10:
        return f"{gb:.1f}"
    if gb >= 1:
        return f"{gb:.2f}"
    return f"{gb:.3g}"


def _count(params: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if params >= scale:
            return f"{params / scale:.3g}{suffix}"
    return f"{params:.0f}"
