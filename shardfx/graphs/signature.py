"""The typed signature of a training-step graph.

The signature is data, not a naming convention: the i-th placeholder of the
graph is `inputs[i]` and the i-th value the graph returns is `outputs[i]`.
Passes that add or remove placeholders or outputs keep both lists in step
(verify.py checks that they do).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Input roles.
PARAM = "param"  # a parameter (trainable or frozen)
BUFFER = "buffer"  # a module buffer
INPUT = "input"  # an element of the user's batch
GRAD_ACC = "grad_acc"  # a rank's unreduced gradient of `name`, summed over earlier micro-batches
REPLICA = "replica"  # the full parameter `name` a ZeRO-1/2 step gathered earlier in this optimizer step
GRAD_SUM = "grad_sum"  # the reduced gradient (shard) of `name` kept from this optimizer step's earlier micro-batches
LOSS_SCALE = "loss_scale"  # fp16: the scalar the loss is multiplied by before the backward (scale_loss)

# Output roles.
LOSS = "loss"  # the scalar loss of this rank's batch shard
GRAD = "grad"  # gradient of parameter `target`
BUFFER_UPDATE = "buffer_update"  # new value of buffer `target`
GRAD_NORM = "grad_norm"  # the global L2 norm of the step's reduced gradients (before any clipping)
# GRAD_ACC is also an output role: the accumulator of `target` with this micro-batch's gradient added;
# so is REPLICA: the full parameter `target` this step gathered, kept for the next micro-batches.

# A program that reads GRAD_SUM returns, as the GRAD of that parameter, the kept sum with its own added.
INPUT_ROLES = (PARAM, BUFFER, INPUT, GRAD_ACC, REPLICA, GRAD_SUM, LOSS_SCALE)
OUTPUT_ROLES = (LOSS, GRAD, BUFFER_UPDATE, GRAD_NORM, GRAD_ACC, REPLICA)


@dataclass
class InputSpec:
    role: str
    name: str  # fully qualified name in the user's model, or "batch[i]"
    trainable: bool = False
    aliases: tuple[str, ...] = ()  # other names of a tied parameter
    batch_index: int = -1  # for INPUT: its position in the batch


@dataclass
class OutputSpec:
    role: str
    target: str = ""  # the param (GRAD) or buffer (BUFFER_UPDATE) it belongs to


@dataclass
class Signature:
    inputs: list[InputSpec] = field(default_factory=list)
    outputs: list[OutputSpec] = field(default_factory=list)

    def params(self, trainable_only: bool = False) -> list[InputSpec]:
        return [s for s in self.inputs if s.role == PARAM and (s.trainable or not trainable_only)]

    def buffers(self) -> list[InputSpec]:
        return [s for s in self.inputs if s.role == BUFFER]

    def batch_inputs(self) -> list[InputSpec]:
        return [s for s in self.inputs if s.role == INPUT]

    def input_index(self, role: str, name: str) -> int:
        for i, spec in enumerate(self.inputs):
            if spec.role == role and spec.name == name:
                return i
        raise KeyError(f"no {role} input named {name!r}")

    def output_index(self, role: str, target: str = "") -> int:
        for i, spec in enumerate(self.outputs):
            if spec.role == role and spec.target == target:
                return i
        raise KeyError(f"no {role} output for {target!r}")

    def describe(self) -> str:
        lines = ["inputs:"]
        for spec in self.inputs:
            extra = " (trainable)" if spec.trainable else ""
            if spec.aliases:
                extra += f" tied with {', '.join(spec.aliases)}"
            lines.append(f"  {spec.role:<6} {spec.name}{extra}")
        lines.append("outputs:")
        for spec in self.outputs:
            lines.append(f"  {spec.role:<13} {spec.target}".rstrip())
        return "\n".join(lines)
