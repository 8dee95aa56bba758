"""Reference models and MarkovTokens: shapes, tying, export, and the loss floor."""

import math

import pytest
import torch

from shardfx.models import (
    GPT,
    MLP,
    GPTConfig,
    MarkovTokens,
    build_model,
    gpt_loss,
    num_params,
)

TINY = GPTConfig(vocab_size=64, n_layer=2, d_model=32, n_head=2, seq_len=16)


def _tokens(batch: int, seq: int, vocab: int) -> torch.Tensor:
    return torch.randint(vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def test_gpt_forward_shape_and_initial_loss():
    torch.manual_seed(0)
    model = GPT(TINY)
    tokens = _tokens(3, 11, TINY.vocab_size)
    logits = model(tokens)
    assert logits.shape == (3, 11, TINY.vocab_size)
    # Small init -> near-uniform predictions. Targets differ from the inputs:
    # with tied weights a token's own logit is biased up at init.
    loss = gpt_loss(logits, (tokens + 1) % TINY.vocab_size)
    assert abs(loss.item() - math.log(TINY.vocab_size)) < 0.1


def test_gpt_init_is_deterministic():
    torch.manual_seed(1)
    a = GPT(TINY).state_dict()
    torch.manual_seed(1)
    b = GPT(TINY).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tied_weights_share_storage_and_count_once():
    tied = GPT(TINY)
    assert tied.head.weight is tied.wte.weight
    assert tied.head.weight.data_ptr() == tied.wte.weight.data_ptr()
    untied = GPT(GPTConfig(**{**vars(TINY), "tie_weights": False}))
    assert num_params(untied) - num_params(tied) == TINY.vocab_size * TINY.d_model


def test_gpt_config_rejects_indivisible_heads():
    with pytest.raises(ValueError, match=r"d_model=30.*n_head=4"):
        GPTConfig(d_model=30, n_head=4)


def test_gpt_exports_and_matches_eager():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    tokens = _tokens(2, TINY.seq_len, TINY.vocab_size)
    exported = torch.export.export(model, (tokens,))
    torch.testing.assert_close(exported.module()(tokens), model(tokens))


def test_mlp_uneven_hidden_with_batchnorm():
    model = MLP(d_in=5, hidden=(37,), d_out=3, batchnorm=True)
    assert [type(m).__name__ for m in model.norms] == ["BatchNorm1d"]
    x = torch.randn(4, 5)
    y = model(x)
    assert y.shape == (4, 3)
    y.sum().backward()
    assert model.layers[0].weight.grad.shape == (37, 5)


def test_mlp_without_bias_or_norm():
    model = MLP(hidden=(32, 32), bias=False)
    assert model.norms is None
    assert all(layer.bias is None for layer in model.layers)
    assert model(torch.randn(2, 16)).shape == (2, 8)


def test_markov_rows_sum_to_one_and_pi_is_stationary():
    data = MarkovTokens(vocab_size=100, seed=3)
    p = data.transition
    assert p.dtype == torch.float64 and p.shape == (100, 100)
    torch.testing.assert_close(p.sum(dim=1), torch.ones(100, dtype=torch.float64))
    pi = data.stationary()
    assert pi.min() >= 0
    torch.testing.assert_close(pi.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(pi @ p, pi)


def test_markov_default_entropy_rate_is_well_below_uniform():
    data = MarkovTokens()
    h = data.entropy_rate()
    assert 0 < h < 0.25 * math.log(1024)


def test_markov_sampling_is_deterministic():
    data = MarkovTokens(vocab_size=50, seed=1)
    a = data.batch(4, 9, torch.Generator().manual_seed(7))
    b = data.batch(4, 9, torch.Generator().manual_seed(7))
    c = data.batch(4, 9, torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    tokens, targets = a
    assert tokens.dtype == torch.long and tokens.shape == targets.shape == (4, 9)
    assert torch.equal(tokens[:, 1:], targets[:, :-1])
    s1, s2 = data.stream(4, 9, seed=5), data.stream(4, 9, seed=5)
    for _ in range(3):
        assert all(torch.equal(x, y) for x, y in zip(next(s1), next(s2)))


def test_markov_empirical_nll_matches_entropy_rate():
    data = MarkovTokens(vocab_size=32, seed=0)
    tokens, targets = data.batch(256, 256, torch.Generator().manual_seed(0))
    nll = -torch.log(data.transition[tokens, targets]).mean().item()
    h = data.entropy_rate()
    assert abs(nll - h) < 0.03 * h, (nll, h)


def test_build_model_gpt_tiny_and_mlp():
    torch.manual_seed(0)
    model, loss_fn, make_batch = build_model("gpt", preset="tiny")
    assert model.config == TINY
    tokens, targets = make_batch(3, torch.Generator().manual_seed(0))
    assert tokens.shape == (3, TINY.seq_len)
    assert loss_fn(model(tokens), targets).ndim == 0

    model, loss_fn, make_batch = build_model("mlp", hidden=(37,))
    x, y = make_batch(4, torch.Generator().manual_seed(0))
    assert loss_fn(model(x), y).ndim == 0


def test_build_model_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"allowed: \['gpt', 'mlp'\]"):
        build_model("resnet")
    with pytest.raises(ValueError, match="preset"):
        build_model("gpt", preset="huge")
    with pytest.raises(ValueError, match="n_layers"):
        build_model("gpt", n_layers=3)
