"""Hadamard matrices of the sizes language models use, as Kronecker products of small factors.

A Hadamard matrix H of order n has entries +-1 and H H^T = n I, so H / sqrt(n) is orthogonal. Sylvester's
construction gives every power of two; Paley's first construction gives q + 1 for a prime q = 3 (mod 4) (12, 20, 44,
60, 68, 84), and Kronecker products of these cover hidden sizes such as 576 (12 x 12 x 4), 960, 1536, 2560 or 5120.
`hadamard_product` multiplies by H one factor at a time, so H itself is never formed (QuaRot and SpinQuant rotate
with such matrices; QuIP# builds its incoherence the same way).
"""

from __future__ import annotations

import torch

# Paley orders q + 1 by the odd part they remove from n (each also removes a factor 4).
PALEY_PRIMES = {3: 11, 5: 19, 11: 43, 15: 59, 17: 67, 21: 83}
# Sylvester factors are split into blocks of at most this order (a 64 x 64 matrix multiply per block).
MAX_SYLVESTER_FACTOR = 64


def paley_hadamard(prime: int) -> torch.Tensor:
    """Paley's construction I: the (prime + 1)-order Hadamard matrix I + S, S skew with a Jacobsthal core."""
    if prime % 4 != 3 or any(prime % d == 0 for d in range(2, int(prime**0.5) + 1)):
        raise ValueError(f"Paley's construction I needs a prime = 3 (mod 4), got {prime}")
    squares = {(x * x) % prime for x in range(1, prime)}
    character = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, prime)], dtype=torch.float64)
    index = torch.arange(prime)
    skew = torch.zeros(prime + 1, prime + 1, dtype=torch.float64)
    skew[0, 1:] = 1.0
    skew[1:, 0] = -1.0
    skew[1:, 1:] = character[(index[None, :] - index[:, None]) % prime]
    return torch.eye(prime + 1, dtype=torch.float64) + skew


def sylvester_hadamard(order: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of a power-of-two order."""
    if order < 1 or order & (order - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {order}")
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < order:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


def hadamard_factors(size: int) -> list[torch.Tensor]:
    """+-1 float64 matrices whose Kronecker product is a Hadamard matrix of order `size`; ValueError where these
    constructions have none (`size` = 2^k times a product of PALEY_PRIMES' odd parts, each with a factor 4)."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"a Hadamard matrix needs a positive integer order, got {size!r}")
    twos, odd = 0, size
    while odd % 2 == 0:
        odd, twos = odd // 2, twos + 1
    paley = []
    for part in sorted(PALEY_PRIMES, reverse=True):
        while odd % part == 0 and twos >= 2:
            odd, twos = odd // part, twos - 2
            paley.append(paley_hadamard(PALEY_PRIMES[part]))
    if odd != 1:
        raise ValueError(f"no Hadamard matrix of order {size} is built here: sizes are 2^k times products of "
                         f"{sorted(p + 1 for p in PALEY_PRIMES.values())} (e.g. 576, 960, 1536, 2048, 4096, 5120)")
    sylvester = []
    while twos > 0:
        step = min(twos, MAX_SYLVESTER_FACTOR.bit_length() - 1)
        sylvester.append(sylvester_hadamard(1 << step))
        twos -= step
    return paley + sylvester


def hadamard_product(x: torch.Tensor, factors: list[torch.Tensor], transpose: bool = False) -> torch.Tensor:
    """x @ (F_1 kron F_2 kron ...), or x @ (...)^T with `transpose`, over x's last dimension, in x's dtype."""
    sizes = [factor.shape[0] for factor in factors]
    shape = x.shape
    y = x.reshape(-1, *sizes)
    for axis, factor in enumerate(factors, start=1):
        factor = factor.to(device=x.device, dtype=x.dtype)
        y = torch.movedim(torch.movedim(y, axis, -1) @ (factor.T if transpose else factor), -1, axis)
    return y.reshape(shape)
