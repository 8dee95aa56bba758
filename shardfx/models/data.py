"""Synthetic next-token data with a known loss floor.

Tokens come from a fixed random first-order Markov chain. No model can predict
the next token better than the chain itself, so the chain's entropy rate is the
lowest achievable mean cross-entropy: a training run that approaches it has
learned, and one that goes below it has a bug.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class MarkovTokens:
    """A random Markov chain over `vocab_size` tokens, fixed by `seed`.

    Each row of the transition matrix puts its mass on `branching` successors
    (default 8, capped at vocab_size) with Dirichlet(concentration)-like
    weights, so a row's entropy is far below log(vocab_size). A small uniform
    part (`mix`) is blended into every row; it makes the chain irreducible and
    aperiodic, so the stationary distribution is unique, and it is part of the
    chain (sampled from and counted in the entropy rate).

    `transition` is the (V, V) float64 matrix P, P[i, j] = Pr(next=j | cur=i).
    """

    mix: float = 1e-3

    def __init__(
        self,
        vocab_size: int = 1024,
        seed: int = 0,
        concentration: float = 0.1,
        branching: int | None = None,
    ) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if concentration <= 0:
            raise ValueError(f"concentration must be > 0, got {concentration}")
        if branching is not None and branching < 1:
            raise ValueError(f"branching must be >= 1 or None, got {branching}")
        self.vocab_size = vocab_size
        self.seed = seed
        self.concentration = concentration
        self.branching = min(8 if branching is None else branching, vocab_size)
        self.transition = self._build_transition()
        self._stationary: torch.Tensor | None = None

    def _build_transition(self) -> torch.Tensor:
        V, k, alpha = self.vocab_size, self.branching, self.concentration
        g = torch.Generator().manual_seed(self.seed)
        # k distinct successors per row: the top-k of iid uniforms is a uniform k-subset.
        successors = torch.rand(V, V, generator=g, dtype=torch.float64).topk(k, dim=1).indices
        # Weights ~ Exp(1) * U^(1/alpha). Exact Gamma(alpha) would use Gamma(1+alpha)
        # for the first factor; the U^(1/alpha) factor carries Gamma's heavy mass
        # near zero, which is what makes rows peaky for small alpha. Built in
        # log space so tiny alpha cannot underflow before normalising.
        u1 = torch.rand(V, k, generator=g, dtype=torch.float64)
        u2 = torch.rand(V, k, generator=g, dtype=torch.float64)
        log_w = torch.log(-torch.log1p(-u1)) + torch.log(u2) / alpha  # (V, k)
        sparse = torch.zeros(V, V, dtype=torch.float64)
        sparse.scatter_(1, successors, torch.softmax(log_w, dim=1))
        return (1.0 - self.mix) * sparse + self.mix / V  # rows sum to 1

    def stationary(self) -> torch.Tensor:
        """The stationary distribution pi (float64, (V,)), with pi @ P = pi."""
        if self._stationary is None:
            V = self.vocab_size
            # Solve (P^T - I) pi = 0 with one equation replaced by sum(pi) = 1;
            # the mixing term makes the chain irreducible, so this system is
            # nonsingular. A direct solve avoids power iteration, whose
            # worst-case convergence rate here is only (1 - mix) per step.
            a = self.transition.T - torch.eye(V, dtype=torch.float64)
            a[-1] = 1.0
            b = torch.zeros(V, dtype=torch.float64)
            b[-1] = 1.0
            pi = torch.linalg.solve(a, b).clamp_min(0.0)  # clamp round-off below zero
            self._stationary = pi / pi.sum()
        return self._stationary

    def entropy_rate(self) -> float:
        """-sum_i pi_i sum_j P_ij log P_ij, in nats: the floor on next-token cross-entropy."""
        # xlogy gives 0 log 0 = 0, so zero entries add nothing.
        row_entropy = -torch.xlogy(self.transition, self.transition).sum(dim=1)  # (V,)
        return float(self.stationary() @ row_entropy)

    def batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample (tokens, targets), both LongTensor (B, T); targets are tokens shifted by one.

        Each sequence starts from the stationary distribution, so every position
        has the same marginal and the expected loss floor is the entropy rate.
        """
        seq = torch.empty(batch_size, seq_len + 1, dtype=torch.long)  # (B, T+1)
        seq[:, 0] = torch.multinomial(self.stationary(), batch_size, replacement=True, generator=generator)
        for t in range(seq_len):
            # Row i of P is the next-token distribution after token i.
            rows = self.transition[seq[:, t]]  # (B, V)
            seq[:, t + 1] = torch.multinomial(rows, 1, generator=generator).squeeze(1)
        return seq[:, :-1], seq[:, 1:]

    def stream(self, batch_size: int, seq_len: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless batches, the same sequence of batches for the same seed."""
        g = torch.Generator().manual_seed(seed)
        while True:
            yield self.batch(batch_size, seq_len, g)
