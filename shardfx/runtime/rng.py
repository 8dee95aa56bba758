"""The random number generators' state as JSON, for checkpoints: torch's, Python's and CUDA's."""

from __future__ import annotations

import base64
import random
from typing import Any

import torch
from torch import Tensor


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": _jsonable(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch_state, python_state, cuda_states = parse_rng_state(state)
    torch.set_rng_state(torch_state)
    random.setstate(python_state)
    if cuda_states is not None and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def parse_rng_state(state: Any) -> tuple[Tensor, tuple[Any, ...], list[Tensor] | None]:
    """(torch's state, Python's state, CUDA's states or None) from rng_state()'s JSON, each tried on a scratch
    generator first: a ValueError, in one line, for anything else, before any generator is changed."""

    def tensor(text: Any, what: str) -> Tensor:
        try:
            data = base64.b64decode(text, validate=True) if isinstance(text, str) else None
        except ValueError:  # binascii.Error
            data = None
        if not data:
            raise ValueError(f"the RNG state's {what!r} is not base64 bytes: {str(text)[:40]!r}")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    if not isinstance(state, dict):
        raise ValueError(f"the RNG state is a {type(state).__name__}, not a dict")
    torch_state = tensor(state.get("torch"), "torch")
    try:
        torch.Generator().set_state(torch_state)
    except RuntimeError as exc:
        raise ValueError(
            f"the RNG state's 'torch' is not torch's CPU generator state: {str(exc).splitlines()[0]}"
        ) from None
    python = state.get("python")
    try:
        version, internal, gauss = python
        python_state = (version, tuple(internal), gauss)
        random.Random().setstate(python_state)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"the RNG state's 'python' is not Python's random state: {exc}") from None
    cuda = state.get("cuda")
    if cuda is not None and not isinstance(cuda, list):
        raise ValueError(f"the RNG state's 'cuda' is a {type(cuda).__name__}, not a list")
    cuda_states = None if cuda is None else [tensor(s, "cuda") for s in cuda]
    return torch_state, python_state, cuda_states


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value
