"""Capture: signature roles, phases, provenance, and clear errors for untraceable models."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from shardfx import TraceError
from shardfx.graphs import meta
from shardfx.graphs.capture import capture
from shardfx.graphs.signature import BUFFER, BUFFER_UPDATE, GRAD, INPUT, LOSS, PARAM


class Everything(nn.Module):
    """Tied weights, a frozen layer and a BatchNorm in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.frozen(F.gelu(self.bn(self.fc(self.emb(x))))))


def _capture_everything():
    x = torch.randint(0, 10, (4,))
    return capture(Everything(), (x, torch.randint(0, 10, (4,))), F.cross_entropy)


def test_signature_roles() -> None:
    sig = _capture_everything().signature
    params = {s.name: s for s in sig.inputs if s.role == PARAM}
    assert list(params) == [
        "emb.weight",
        "fc.weight",
        "fc.bias",
        "bn.weight",
        "bn.bias",
        "frozen.weight",
        "frozen.bias",
    ]
    assert params["emb.weight"].aliases == ("head.weight",)  # tied: one input, both names
    assert not params["frozen.weight"].trainable and params["fc.weight"].trainable
    assert [s.name for s in sig.inputs if s.role == BUFFER] == [
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    ]
    assert [s.name for s in sig.inputs if s.role == INPUT] == ["batch[0]", "batch[1]"]
    assert sig.outputs[0].role == LOSS
    grads = [s.target for s in sig.outputs if s.role == GRAD]
    assert grads == ["emb.weight", "fc.weight", "fc.bias", "bn.weight", "bn.bias"]  # frozen: no grad
    assert [s.target for s in sig.outputs if s.role == BUFFER_UPDATE] == [
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    ]


def test_every_node_has_val_phase_and_module() -> None:
    cap = _capture_everything()
    for node in cap.gm.graph.nodes:
        if node.op == "output":
            continue
        assert "val" in node.meta, node.format_node()
        assert node.meta[meta.PHASE] in (meta.FORWARD, meta.BACKWARD)
    by_name = {n.name: n for n in cap.gm.graph.nodes}
    assert by_name["p_fc_weight"].meta[meta.PHASE] == meta.FORWARD
    bn_bwd = next(n for n in cap.gm.graph.nodes if n.target is torch.ops.aten.native_batch_norm_backward.default)
    assert bn_bwd.meta[meta.PHASE] == meta.BACKWARD
    assert bn_bwd.meta[meta.MODULE] == "bn"  # backward nodes know their module too
    addmm = next(n for n in cap.gm.graph.nodes if n.target is torch.ops.aten.addmm.default)
    assert addmm.meta[meta.MODULE] == "fc"
    assert "test_capture.py" in addmm.meta["stack_trace"]


def test_tied_gradient_sums_both_uses() -> None:
    """The graph's gradient of a tied weight equals eager autograd's."""
    torch.manual_seed(0)
    model = Everything()
    x, y = torch.randint(0, 10, (4,)), torch.randint(0, 10, (4,))
    cap = capture(model, (x, y), F.cross_entropy)
    named = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    args = []
    for spec in cap.signature.inputs:
        if spec.role == PARAM:
            args.append(named[spec.name].detach())
        elif spec.role == BUFFER:
            args.append(buffers[spec.name].clone())
        else:
            args.append((x, y)[spec.batch_index])
    with torch.no_grad():
        out = cap.gm(*args)
    F.cross_entropy(model(x), y).backward()
    grad = out[cap.signature.output_index(GRAD, "emb.weight")]
    torch.testing.assert_close(grad, model.emb.weight.grad)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), Branchy())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).sum()


class Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent Python control flow
            return x * 2
        return x


def test_untraceable_model_names_module_and_line() -> None:
    with pytest.raises(TraceError) as info:
        capture(DataDependent(), (torch.randn(2, 4),))
    text = str(info.value)
    assert "module: inner.1 (Branchy)" in text
    assert "if x.sum() > 0" in text and "test_capture.py" in text
    assert "Traceback" not in text
    assert len(text.splitlines()) < 10


def test_non_scalar_loss_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="floating-point scalar"):
        capture(nn.Linear(4, 2), (torch.randn(3, 4),))


def test_model_output_without_loss() -> None:
    class NoLoss(nn.Module):
        def forward(self, x: torch.Tensor) -> dict:
            return {"logits": x}

    with pytest.raises(TraceError, match="loss_fn"):
        capture(NoLoss(), (torch.randn(3, 4),))


class NonZero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.pick = Picker()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.fc(x))


class Picker(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        rows = torch.nonzero(h > 0)  # output shape depends on the data
        return h[rows[:, 0]].sum()


def test_unsupported_op_names_op_module_and_line() -> None:
    with pytest.raises(TraceError) as info:
        capture(NonZero(), (torch.randn(2, 4),))
    text = str(info.value)
    assert "op: aten.nonzero" in text
    assert "module: pick (Picker)" in text
    assert "torch.nonzero(h > 0)" in text
