"""Cost model: the simulated step time of a per-rank program on named hardware.

One compute stream and one communication stream. Each compute node costs its
roofline time, max(FLOPs / peak FLOP/s, bytes moved / memory bandwidth,
elements / the transcendental rate for GELU, exp, softmax and their kind),
plus a fixed per-op overhead (dispatch and launch: large on a CPU running
Python, a few microseconds on a GPU); a view moves nothing and costs its
dispatch (Hardware.view_overhead). A collective costs the alpha-beta model of a
ring: alpha + bytes sent per rank / link bandwidth, where a rank sends
(N-1)/N of the gathered or scattered tensor and 2(N-1)/N of an all-reduced
one (on gloo, shardfx runs a reduce-scatter as one exchange with each peer,
which sends the same (N-1)/N: runtime/dist_comm.py; an exchange takes one
round where a ring takes N - 1, so its latency is Hardware.exchange_alpha,
measured apart). The runtime's own work around a collective runs on the
rank's thread (host_seconds): the copy an all-reduce not in place reduces, the
sum of the parts a gloo reduce-scatter received.
Synchronous collectives stop compute until they finish; `*_start` launches on
the communication stream (after the collectives before it) and `wait` stops
compute only until its collective is done: the time compute sits
in waits and synchronous collectives is the exposed communication. Where ranks
share cores with their communication (gloo on a CPU), an async collective
also takes (1 - overlap) of its time from compute (Hardware.overlap). Where
there are more ranks than cores, the OS serves some less than others, and
the others wait for them in every collective: the simulated rank is the one
served least, its compute and host work (1 + Hardware.skew) x the mean rank's. After
the program, the optimizer updates the parameter elements this rank holds
(priced as Adam(W): seconds per element and per tensor).

Ranks that share a machine's cores (a CPU profile: Hardware.cores > 0) share
its compute: a profile measured with `ranks` ranks on `cores` cores is scaled
to the program's world size on this machine's cores (Hardware.at): each rank's
FLOP/s and bytes/s are its share of the cores, and once there are more ranks
than cores every fixed cost stretches by ranks / cores (each rank has the CPU
part of the time).
`shardfx calibrate --world-size 2,4` measures each rank count itself.

FLOPs come from torch's own formulas (torch.utils.flop_counter) where it has
them; every attention kernel (graphs/ops.py) is counted as 4*B*H*Lq*Lk*D
forward and 2.5x that backward, at a rate of its own (Hardware.attention_flops);
every other op is memory-bound (its FLOPs ignored).
"""

from __future__ import annotations

import functools
import json
import operator
import os
import platform
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch.utils.flop_counter import flop_registry

from shardfx.graphs import collectives, ops
from shardfx.graphs.analysis import ALIAS_OPS, memory_timeline, tensor_bytes
from shardfx.graphs.format import op_name
from shardfx.graphs.program import DistProgram
from shardfx.graphs.signature import PARAM


@dataclass(frozen=True)
class Hardware:
    name: str
    fp32_flops: float  # FLOP/s of dense matmul in fp32
    bf16_flops: float  # ... in bf16
    mem_bw: float  # bytes/s the device reads + writes (calibrated on a CPU: into new outputs, as ops write)
    link_bw: float  # bytes/s one rank sends in a collective (per direction)
    alpha: float  # seconds of fixed latency per collective
    op_overhead: float  # seconds of fixed cost per compute op
    source: str = ""
    overlap: float = 1.0  # share of an async collective's time that runs beside compute, not in its way
    machine: str = ""  # the machine a calibration measured (machine_id()); "" for built-in profiles
    special_rate: float = 0.0  # elements/s of a transcendental elementwise op (GELU, exp); 0: bandwidth-bound
    view_overhead: float = 0.0  # seconds of a view's dispatch (it moves no data)
    optimizer_element: float = 0.0  # seconds of Adam(W)'s update per parameter element; 0: ADAM_BYTES / mem_bw
    optimizer_tensor: float = 0.0  # seconds of Adam(W)'s update per parameter tensor, beside its elements
    ranks: int = 1  # ranks that ran at once on the machine when it was measured
    cores: int = 0  # the CPU cores those ranks shared; 0: every rank has a device of its own
    # seconds of fixed latency per all-gather / reduce-scatter where shardfx runs them as one exchange
    # with each peer (gloo: runtime/dist_comm.py), which takes one round where a ring takes N - 1; 0: alpha
    exchange_alpha: float = 0.0
    # elements/s of GELU's tanh approximation, forward and backward (aten.gelu(approximate="tanh"): the
    # GPT's, HF's gelu_pytorch_tanh; HF's gelu_new is a chain of pointwise ops, costed as such): on a CPU a
    # third to a sixth of the erf GELU's special_rate (0.50-0.53 against 1.31-1.71 G elements/s on one
    # thread, 0.61 against 3.47 in calibrate); 0: special_rate
    tanh_gelu_rate: float = 0.0
    # FLOP/s of a scaled-dot-product attention kernel (forward and backward, measured in fp32; other
    # dtypes scale as their matmuls do): on this CPU 0.7x the matmuls' rate at a GPT's head sizes
    # (142-159 against 204-217 GFLOP/s at 2 ranks); 0: the matmul rate
    attention_flops: float = 0.0
    # how much longer than the mean rank's the slowest rank's compute takes, where ranks time-share cores
    # (the OS serves some less than others; a collective waits for the last): measured as the growth of
    # the mean rank's wait in a collective per second of compute before it, 0.18-0.23 at 4 ranks on 2
    # cores, about 0 with a core per rank
    skew: float = 0.0

    def flops(self, dtype: torch.dtype) -> float:
        return self.bf16_flops if dtype in (torch.bfloat16, torch.float16) else self.fp32_flops

    def attention_rate(self, dtype: torch.dtype) -> float:
        if self.attention_flops <= 0 or self.fp32_flops <= 0:
            return self.flops(dtype)
        if self.flops(dtype) == self.fp32_flops:
            return self.attention_flops
        return self.attention_flops * self.flops(dtype) / self.fp32_flops

    def at(self, ranks: int, cores: int | None = None) -> Hardware:
        """This profile for `ranks` ranks on this machine's `cores` (default os.cpu_count()). A device
        per rank (a GPU profile, cores == 0): itself. A calibration of this machine: the one measured
        at `ranks`, else the one measured nearest it, scaled. Scaling: each rank computes and moves
        bytes at its share of the cores (cores / ranks of them, against the share when measured),
        and the fixed costs (dispatch, collective latency) stretch by ranks / cores where ranks
        outnumber cores, as the OS time-shares them."""
        if self.cores == 0:
            return self
        cores = cores or os.cpu_count() or 1
        saved = _calibrations()
        base = _nearest(saved, ranks) if self in saved else self  # a copy changed by hand is scaled as it is
        if ranks == base.ranks and cores == base.cores:
            return base
        share = (cores / ranks) / (base.cores / base.ranks)  # cores per rank now, over when measured
        stretch = max(1.0, ranks / cores) / max(1.0, base.ranks / base.cores)
        # a ring collective's latency grows with its steps, (N - 1) of them; an exchange's with the
        # peers it sends to, as many (on shared cores each message waits for its peer to be scheduled:
        # measured 0.8 ms at 2 ranks, 3.2-3.9 ms at 4 on 2 cores)
        steps = max(ranks - 1, 1) / max(base.ranks - 1, 1)
        # the skew grows with the share of the time a rank waits for a core, 1 - cores / ranks (0 with a
        # core each); measured with a core per rank, the figure stands as it is
        idle = lambda r, c: max(0.0, 1.0 - c / r)  # noqa: E731
        uneven = idle(ranks, cores) / idle(base.ranks, base.cores) if idle(base.ranks, base.cores) else 1.0
        return replace(
            base,
            fp32_flops=base.fp32_flops * share,
            bf16_flops=base.bf16_flops * share,
            mem_bw=base.mem_bw * share,
            special_rate=base.special_rate * share,
            tanh_gelu_rate=base.tanh_gelu_rate * share,
            attention_flops=base.attention_flops * share,
            skew=base.skew * uneven,
            optimizer_element=base.optimizer_element / share,
            link_bw=base.link_bw / stretch,
            alpha=base.alpha * stretch * steps,
            exchange_alpha=base.exchange_alpha * stretch * steps,
            op_overhead=base.op_overhead * stretch,
            view_overhead=base.view_overhead * stretch,
            optimizer_tensor=base.optimizer_tensor * stretch,
            ranks=ranks,
            cores=cores,
            source=f"{base.source}; scaled from {base.ranks} ranks on {base.cores} cores to {ranks} on {cores}",
        )


def _nearest(profiles: list[Hardware], ranks: int) -> Hardware:
    """The profile measured at the rank count nearest `ranks` (the lower one of a tie)."""
    return min(profiles, key=lambda hw: (abs(hw.ranks - ranks), hw.ranks))


# Data-sheet figures (dense, no sparsity); the fp32 rate is TF32 tensor-core math as
# frameworks use it for fp32 matmuls. Links: NVLink within a node, per GPU and direction.
PROFILES: dict[str, Hardware] = {
    "a100": Hardware("a100", 156e12, 312e12, 2.0e12, 300e9, 10e-6, 5e-6, "A100 SXM 80GB data sheet, NVLink3"),
    "h100": Hardware("h100", 494e12, 989e12, 3.35e12, 450e9, 10e-6, 5e-6, "H100 SXM data sheet, NVLink4"),
    "h200": Hardware("h200", 494e12, 989e12, 4.8e12, 450e9, 10e-6, 5e-6, "H200 SXM data sheet, NVLink4"),
    "h100-ib": Hardware("h100-ib", 494e12, 989e12, 3.35e12, 50e9, 20e-6, 5e-6, "H100 across nodes, 400 Gb/s IB"),
    # Measured on a 2-core CI machine by `shardfx calibrate --world-size 2` (typical of several runs
    # on a quiet machine, both ranks measuring at once; a busy one measured up to 2x slower): a
    # small collective between compute costs 2 ms (mostly the ranks' skew), and (1 - overlap) of an
    # async one's time is taken from compute (the ranks' cores also run gloo: a bucketed backward's
    # rhythm of 2 MiB buckets hid 46-55% of its all-reduces in 3 runs at 2 ranks, 42-57% at 4; of
    # 8 MiB buckets 49% at 2 ranks, 36% at 4). GELU's tanh approximation: the erf GELU's rate times
    # the ratio measured beside it (0.18-0.29). Rates are per rank with a core each (ranks=2,
    # cores=2); Hardware.at scales them to this machine's cores and the program's rank count.
    "cpu": Hardware(
        "cpu",
        70e9,
        2.9e9,
        15e9,
        1.5e9,
        2.0e-3,
        6e-6,
        "built-in: a 2-core x86 VM, 2 gloo ranks",
        overlap=0.5,
        special_rate=1.0e9,
        tanh_gelu_rate=0.25e9,
        view_overhead=3.7e-6,
        optimizer_element=8e-9,
        optimizer_tensor=37e-6,
        ranks=2,
        cores=2,
        exchange_alpha=0.8e-3,
    ),  # fmt: skip
}

# where `shardfx calibrate` keeps this machine's figures; SHARDFX_HARDWARE_FILE names another file
# (the test suite points it at an empty folder, so a developer's calibration changes no test)
CALIBRATION_FILE = Path(os.environ.get("SHARDFX_HARDWARE_FILE") or Path.home() / ".cache" / "shardfx" / "hardware.json")


AUTO = "auto"
_CUDA_NAMES = (("H200", "h200"), ("H100", "h100"), ("A100", "a100"))


@functools.cache
def machine_id() -> str:
    """What a calibration depends on: CPU model, cores, torch version (a new machine recalibrates)."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        model = names[0] if names else model
    return f"{model} x{os.cpu_count()}, torch {torch.__version__}"


def resolve(name: str) -> str:
    """The profile name `name` stands for: "auto" is this machine's (the CUDA device's, else "cpu")."""
    if name != AUTO:
        return name
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
        return next((profile for key, profile in _CUDA_NAMES if key in device), "h100")
    return "cpu"


def hardware(name: str = AUTO, ranks: int | None = None) -> Hardware:
    """A named profile ("auto": this machine's). 'cpu' is the calibrated one when this machine has
    been measured (by `shardfx calibrate`, or by the first launched gloo job at a rank count; a
    calibration of another machine, or torch, is not used), else the built-in one. `ranks`: the
    profile for a program of that many ranks on this machine (Hardware.at: a calibration measured
    at that count, else one scaled to it); without it, the profile as measured (simulate scales it
    to the program's world size itself)."""
    name = resolve(name)
    if name not in PROFILES:
        raise ValueError(f"unknown hardware profile {name!r}; known: {sorted(PROFILES)} or {AUTO!r}")
    saved = _calibrations() if name == "cpu" else []
    profile = _nearest(saved, ranks or saved[0].ranks) if saved else PROFILES[name]
    return profile if ranks is None else profile.at(ranks)


_FIELDS = {f.name for f in fields(Hardware)}
_read: dict[tuple[str, int, int], list[Hardware]] = {}
# rank count -> the calibration this process's job measured (tools/calibrate.calibrate_once): every rank
# plans on it whether or not the file could be written or is the same file on every rank
_measured_here: dict[int, Hardware] = {}


def _calibrations() -> list[Hardware]:
    """This machine's calibrations, one per rank count measured: the file's (none: no file, another
    machine's, or an older or damaged file; read once per version of it), with those this process's
    job measured in their place."""
    saved: list[Hardware] = []
    try:
        stat = CALIBRATION_FILE.stat()
    except OSError:
        pass
    else:
        key = (str(CALIBRATION_FILE), stat.st_mtime_ns, stat.st_size)
        if key not in _read:
            _read[key] = _load_calibrations()
        saved = _read[key]
    if not _measured_here:
        return saved
    kept = {hw.ranks: hw for hw in saved} | _measured_here
    return [kept[r] for r in sorted(kept)]


def calibrated_ranks() -> set[int]:
    """The rank counts this machine has a calibration for."""
    return {hw.ranks for hw in _calibrations()}


def use_calibration(hw: Hardware) -> None:
    """Plan on `hw` (measured by this process's job at hw.ranks ranks) from now on in this process."""
    _measured_here[hw.ranks] = hw


def _load_calibrations() -> list[Hardware]:
    try:
        data = json.loads(CALIBRATION_FILE.read_text())
        if data.get("machine") != machine_id():
            return []
        entries = data["profiles"]
        unknown = sorted({key for entry in entries for key in entry} - _FIELDS)
        missing = sorted({key for entry in entries for key in _FIELDS - entry.keys()})
        if unknown or missing:  # save_calibration writes every field: another version wrote it
            what = f"fields {unknown}" if unknown else f"no {missing}"
            warnings.warn(
                f"{CALIBRATION_FILE} was written by another version of shardfx ({what}); its figures are "
                "not used: the next launched job on this CPU measures the machine again (or run `shardfx calibrate`)",
                stacklevel=3,
            )
            return []
        profiles = [Hardware(**entry) for entry in entries]
    except (TypeError, ValueError, KeyError, AttributeError):
        return []
    return [hw for hw in profiles if hw.machine == machine_id()]


def save_calibration(*profiles: Hardware) -> Path:
    """Keep `profiles` (one machine's, each measured at its own rank count) as the calibration. Of
    that machine's profiles saved before, one at a rank count measured again is replaced, the others stay."""
    machine = profiles[0].machine
    if any(hw.machine != machine for hw in profiles):
        raise ValueError("save_calibration: the profiles were measured on different machines")
    kept = {hw.ranks: hw for hw in _calibrations() if hw.machine == machine}
    kept.update({hw.ranks: hw for hw in profiles})
    data = {"machine": machine, "profiles": [asdict(kept[r]) for r in sorted(kept)]}
    CALIBRATION_FILE.parent.mkdir(parents=True, exist_ok=True)
    partial = CALIBRATION_FILE.with_name(f"{CALIBRATION_FILE.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(data, indent=2))
    partial.replace(CALIBRATION_FILE)  # a job reading it meanwhile sees the old file or the new, never half of one
    _read.clear()
    return CALIBRATION_FILE


def node_flops(node: fx.Node) -> int:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return 0
    layout = ops.attention(node.target)
    if layout is not None:  # every CPU and CUDA scaled-dot-product kernel, forward and backward
        return layout.flops(node)
    formula = flop_registry.get(node.target.overloadpacket)
    if formula is None:
        return 0
    val = lambda a: a.meta["val"] if isinstance(a, fx.Node) else a  # noqa: E731
    args = fx.map_arg(node.args, val)
    kwargs = fx.map_arg(node.kwargs, val)
    try:
        return int(formula(*args, **kwargs, out_val=node.meta.get("val")))
    except Exception:  # noqa: BLE001 - a formula that does not fit this call: count it as memory-bound
        return 0


def node_bytes(node: fx.Node) -> int:
    """Bytes a compute node reads and writes (views move nothing)."""
    if node.op != "call_function" or node.target in ALIAS_OPS or node.target is operator.getitem:
        return 0
    read = sum(tensor_bytes(a.meta.get("val")) for a in node.all_input_nodes)
    return read + tensor_bytes(node.meta.get("val"))


# Elementwise ops whose arithmetic (erf, exp, log, tanh), not their bytes, bounds them on a CPU:
# each output element costs 1 / Hardware.special_rate (measured on GELU).
TRANSCENDENTAL = {
    getattr(torch.ops.aten, name).default
    for name in (
        "gelu", "gelu_backward", "erf", "exp", "log", "tanh", "tanh_backward", "sigmoid", "sigmoid_backward",
        "silu", "silu_backward", "_softmax", "_log_softmax", "_log_softmax_backward_data", "sin", "cos",
    )
}  # fmt: skip


def is_view(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in ALIAS_OPS or node.target is operator.getitem)


def compute_seconds(node: fx.Node, hw: Hardware) -> float:
    if node.op != "call_function" or node.target is operator.getitem:
        return 0.0  # getitem is a Python tuple index: no dispatch
    if node.target in ALIAS_OPS:
        return hw.view_overhead
    val = node.meta.get("val")
    dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
    layout = ops.attention(node.target)
    if layout is not None:  # its outputs are a tuple: the query's dtype is the kernel's
        dtype = node.args[layout.query].meta["val"].dtype
    rate = hw.attention_rate(dtype) if layout is not None else hw.flops(dtype)
    seconds = max(node_flops(node) / rate, node_bytes(node) / hw.mem_bw)
    if hw.special_rate > 0 and node.target in TRANSCENDENTAL and isinstance(val, torch.Tensor):
        rate = hw.tanh_gelu_rate if hw.tanh_gelu_rate > 0 and _tanh_gelu(node) else hw.special_rate
        seconds = max(seconds, val.numel() / rate)
    return seconds + hw.op_overhead


def _tanh_gelu(node: fx.Node) -> bool:
    """Whether the node is GELU's tanh approximation or its backward (approximate="tanh")."""
    if node.target is torch.ops.aten.gelu.default:
        positional = node.args[1:2]
    elif node.target is torch.ops.aten.gelu_backward.default:
        positional = node.args[2:3]
    else:
        return False
    return node.kwargs.get("approximate", positional[0] if positional else "none") == "tanh"


ADAM_BYTES = 28  # per element: Adam(W) reads the parameter, its gradient and two moments, writes three


def optimizer_seconds(program: DistProgram, hw: Hardware) -> float:
    """Adam(W)'s step over the trainable parameter elements this rank holds (its shards under ZeRO),
    after the program: per element (measured, or ADAM_BYTES over the memory bandwidth) and per tensor."""
    trainable = {s.name for s in program.signature.params(trainable_only=True)}
    sizes = [
        n.meta["val"].numel()
        for spec, n in zip(program.signature.inputs, program.placeholders())
        if spec.role == PARAM and spec.name in trainable
    ]
    per_element = hw.optimizer_element or ADAM_BYTES / hw.mem_bw
    return sum(sizes) * per_element + len(sizes) * hw.optimizer_tensor


def collective_seconds(node: fx.Node, program: DistProgram, hw: Hardware) -> float:
    kind = collectives.kind(node)
    n = program.mesh.size(collectives.axis_of(node))
    if n == 1:
        return 0.0
    in_bytes = tensor_bytes(node.args[0].meta["val"])
    volume = collectives.volume_bytes(kind, in_bytes, tensor_bytes(node.meta["val"]))
    latency = hw.exchange_alpha if hw.exchange_alpha and runs_as_exchange(node, program, hw) else hw.alpha
    return latency + volume * (n - 1) / n / hw.link_bw


def runs_as_exchange(node: fx.Node, program: DistProgram, hw: Hardware) -> bool:
    """Whether the runtime runs this collective as one exchange with each peer (DistComm._exchanged):
    an all-gather, or a sum / average reduce-scatter of an even split, on a CPU (gloo)."""
    kind = collectives.kind(node)
    if hw.cores == 0 or kind not in ("all_gather", "reduce_scatter"):
        return False
    even = node.args[0].meta["val"].shape[0] % program.mesh.size(collectives.axis_of(node)) == 0
    return kind == "all_gather" or (node.args[2] in ("sum", "avg") and even)


def host_seconds(node: fx.Node, program: DistProgram, hw: Hardware) -> tuple[float, float]:
    """What the runtime (runtime/dist_comm.py) does on the rank's own thread around a collective,
    as (before it starts, once it is done), in passes over memory: an all-reduce not in place
    reduces a copy of its input (2 passes); on a CPU (gloo) a reduce-scatter of an even split run as
    an exchange sums the N parts it received into its output (a copy, then N - 1 adds of 3 passes
    each: 3N - 1); an average divides the result in place (2 passes). A collective over one rank
    costs nothing here, as in collective_seconds."""
    axis = collectives.axis_of(node)
    n = program.mesh.size(axis)
    if n == 1:
        return 0.0, 0.0
    kind, op = collectives.kind(node), node.args[2]
    x, out = node.args[0].meta["val"], node.meta["val"]
    passes_after = 2 if op == "avg" and kind != "all_gather" else 0
    if kind == "all_reduce":
        copy = 0 if node.target is collectives.ALL_REDUCE_START_ else 2 * tensor_bytes(x)
        return copy / hw.mem_bw, passes_after * tensor_bytes(out) / hw.mem_bw
    if kind == "reduce_scatter" and runs_as_exchange(node, program, hw):
        passes_after += 3 * n - 1
    return 0.0, passes_after * tensor_bytes(out) / hw.mem_bw


@dataclass
class Simulation:
    step_seconds: float
    compute_seconds: float
    comm_seconds: float
    exposed_comm_seconds: float
    peak_bytes: int
    flops: int
    optimizer_seconds: float = 0.0  # Adam(W)'s update after the program (not in step_seconds)

    @property
    def train_step_seconds(self) -> float:
        """The program and the optimizer's update after it: one training step."""
        return self.step_seconds + self.optimizer_seconds

    def describe(self) -> str:
        return (
            f"step {self.step_seconds * 1e3:.2f} ms + optimizer {self.optimizer_seconds * 1e3:.2f} ms "
            f"(compute {self.compute_seconds * 1e3:.2f} ms, "
            f"communication {self.comm_seconds * 1e3:.2f} ms of which exposed {self.exposed_comm_seconds * 1e3:.2f} ms), "
            f"peak {self.peak_bytes / 2**20:.1f} MiB, {self.flops / 1e9:.2f} GFLOP"
        )


def simulate(program: DistProgram, hw: Hardware, events: list[dict[str, Any]] | None = None) -> Simulation:
    """One rank's step on `hw`. `events`: also append what ran when, as Chrome trace events (see
    trace): on the compute track every op and every time compute sits exposed to communication,
    on the communication track every collective. `hw` is scaled to the program's world size (Hardware.at)."""
    hw = hw.at(program.mesh.world_size)
    compute_t = comm_t = 0.0
    busy_compute = busy_comm = exposed = 0.0
    flops = 0
    done: dict[fx.Node, float] = {}
    pace = 1.0 + hw.skew  # the slowest rank's compute over the mean rank's

    def record(track: int, name: str, begin: float, seconds: float, category: str, node: fx.Node) -> None:
        if events is not None and seconds > 0:
            args = {"node": node.name, "module": node.meta.get("shardfx.module", "")}
            events.append(
                {
                    "name": name,
                    "cat": category,
                    "ph": "X",
                    "tid": track,
                    "ts": begin * 1e6,
                    "dur": seconds * 1e6,
                    "args": args,
                }
            )

    def on_host(seconds: float, name: str, node: fx.Node) -> None:
        nonlocal compute_t, busy_compute
        seconds *= pace
        record(COMPUTE_TRACK, name, compute_t, seconds, "compute", node)
        compute_t += seconds
        busy_compute += seconds

    for node in program.graph.nodes:
        if collectives.is_collective(node):
            on_host(host_seconds(node, program, hw)[0], f"{collectives.kind(node)} (copy)", node)
        if collectives.is_start(node):
            cost = collective_seconds(node, program, hw)
            begin = max(comm_t, compute_t)
            comm_t = begin + cost
            done[node] = comm_t
            busy_comm += cost
            record(COMM_TRACK, collectives.kind(node), begin, cost, "collective", node)
            shared = (1.0 - hw.overlap) * cost  # shared cores: compute slows while it runs
            record(COMPUTE_TRACK, f"{collectives.kind(node)} (shared cores)", compute_t, shared, "exposed", node)
            compute_t += shared
            exposed += shared
        elif collectives.is_wait(node):
            ready = done[node.args[0]]
            if ready > compute_t:
                record(COMPUTE_TRACK, "wait", compute_t, ready - compute_t, "exposed", node)
                exposed += ready - compute_t
                compute_t = ready
            start = node.args[0]
            on_host(host_seconds(start, program, hw)[1], f"{collectives.kind(start)} (sum)", node)
        elif collectives.is_collective(node):
            cost = collective_seconds(node, program, hw)
            begin = max(comm_t, compute_t)
            comm_t = begin + cost
            record(COMM_TRACK, collectives.kind(node), begin, cost, "collective", node)
            record(
                COMPUTE_TRACK, f"{collectives.kind(node)} (synchronous)", compute_t, comm_t - compute_t, "exposed", node
            )
            exposed += comm_t - compute_t
            compute_t = comm_t
            busy_comm += cost
            on_host(host_seconds(node, program, hw)[1], f"{collectives.kind(node)} (sum)", node)
        else:
            cost = compute_seconds(node, hw) * pace
            record(COMPUTE_TRACK, op_name(node.target), compute_t, cost, "compute", node)
            compute_t += cost
            busy_compute += cost
            flops += node_flops(node)
    return Simulation(
        step_seconds=max(compute_t, comm_t),
        compute_seconds=busy_compute,
        comm_seconds=busy_comm,
        exposed_comm_seconds=exposed,
        peak_bytes=memory_timeline(program).peak,
        flops=flops,
        optimizer_seconds=optimizer_seconds(program, hw) * pace,
    )


COMPUTE_TRACK, COMM_TRACK = 0, 1


def trace(program: DistProgram, hw: Hardware, ranks: int | None = None) -> dict[str, Any]:
    """The simulated step as a Chrome / Perfetto trace (load it in ui.perfetto.dev or chrome://tracing):
    per rank a compute track (ops; "exposed" slices where compute waits on communication) and a
    communication track (collectives). Every rank of one program runs the same simulated timeline
    (one SPMD program); `ranks`: how many to show (default the mesh's world size, at most 8)."""
    events: list[dict[str, Any]] = []
    sim = simulate(program, hw, events)
    shown = min(program.mesh.world_size, 8) if ranks is None else ranks
    out: list[dict[str, Any]] = []
    for rank in range(shown):
        out.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        for track, label in ((COMPUTE_TRACK, "compute"), (COMM_TRACK, "communication")):
            out.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": track, "args": {"name": label}})
        out.extend({**event, "pid": rank} for event in events)
    return {
        "traceEvents": out,
        "displayTimeUnit": "ms",
        "otherData": {
            "hardware": hw.name,
            "step_ms": sim.step_seconds * 1e3,
            "exposed_comm_ms": sim.exposed_comm_seconds * 1e3,
            "simulated": True,
        },
    }


def roofline_table(program: DistProgram, hw: Hardware) -> list[dict[str, Any]]:
    """Per compute node: FLOPs, bytes, seconds (for tools and the recompute pass)."""
    rows = []
    for node in program.graph.nodes:
        if node.op == "call_function" and not collectives.is_collective(node) and not collectives.is_wait(node):
            rows.append(
                {
                    "node": node.name,
                    "flops": node_flops(node),
                    "bytes": node_bytes(node),
                    "seconds": compute_seconds(node, hw),
                }
            )
    return rows
