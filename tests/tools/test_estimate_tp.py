"""The estimator learns tensor parallelism: parameters per rank, then ZeRO over the data-parallel ranks."""

from __future__ import annotations

import pytest

from shardfx.tools.cli import main
from shardfx.tools.estimate import zero_model_state_bytes


def test_megatron_arithmetic(capsys) -> None:
    # 1B parameters on 4 tensor-parallel ranks: 250M per rank; ZeRO-3 over 2 data-parallel ranks on top: 125M
    assert main(["estimate", "--params", "1e9", "--tp", "4", "--world-size", "2"]) == 0
    assert "250M with tp=4; 125M with ZeRO-3 over the 2 data-parallel ranks on top" in capsys.readouterr().out
    assert zero_model_state_bytes(1e9, 2, 3, tp=4) == pytest.approx(16 * 125e6)
    assert zero_model_state_bytes(1e9, 1, 0, tp=4) == pytest.approx(16 * 250e6)


def test_bad_tp() -> None:
    with pytest.raises(ValueError, match="tp must be an integer >= 1"):
        zero_model_state_bytes(1e9, 2, 3, tp=0)
