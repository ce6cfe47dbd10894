"""Cheap, exact, additive weight fingerprints.

A fingerprint is computed over a tensor's raw bit patterns read as integers: the element count,
and the wrapping sums (mod 2**32, or 2**64 for 8-byte dtypes) of the bits and of their squares.
Integer addition is associative, so the result does not depend on reduction order or thread
count (a float64 sum would), and it is additive: the fingerprint of vLLM's fused ``qkv_proj`` is
the sum of those of ``q_proj``, ``k_proj`` and ``v_proj``, and the shards of a TP-split tensor
add up to the whole. Zero padding (e.g. vLLM's padded vocabulary rows) adds nothing. What it
cannot see: a permutation of elements within one tensor.

Chunked in cache-sized steps; its measured cost is in ``docs/design.md``, section 8a.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weight_sync.errors import VerificationError

__all__ = ["Fingerprint", "fingerprint", "compare"]

_CHUNK = 1 << 22  # elements per step: 16 MiB int32 temporaries stay cache-friendly
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class Fingerprint:
    """Element count and two wrapping sums over the raw bits (``modulus`` is 2**32 or 2**64)."""

    numel: int
    bit_sum: int
    square_sum: int
    modulus: int = 1 << 32

    def __add__(self, other: Fingerprint) -> Fingerprint:
        if self.modulus != other.modulus:
            raise ValueError("cannot add fingerprints of dtypes of different widths")
        m = self.modulus - 1
        return Fingerprint(
            self.numel + other.numel,
            (self.bit_sum + other.bit_sum) & m,
            (self.square_sum + other.square_sum) & m,
            self.modulus,
        )


def fingerprint(tensor: torch.Tensor) -> Fingerprint:
    """Fingerprints ``tensor`` (any dtype, any device) in bounded temporary memory."""
    flat = tensor.detach().reshape(-1)
    width = flat.element_size()
    bits = flat.view(_INT_VIEW[width])
    acc = torch.int64 if width == 8 else torch.int32
    bit_sum = square_sum = 0
    for start in range(0, bits.numel(), _CHUNK):
        chunk = bits[start : start + _CHUNK].to(acc, copy=True)
        bit_sum += int(chunk.sum(dtype=acc))
        chunk.mul_(chunk)
        square_sum += int(chunk.sum(dtype=acc))
    modulus = 1 << (64 if width == 8 else 32)
    return Fingerprint(bits.numel(), bit_sum % modulus, square_sum % modulus, modulus)


def compare(
    expected: dict[str, Fingerprint], actual: dict[str, Fingerprint], *, where: str
) -> None:
    """Raises :class:`VerificationError` naming the first tensor whose fingerprints differ.

    Args:
        expected: Fingerprints computed by the sender, by tensor name.
        actual: Fingerprints computed by the receiver.
        where: Who computed ``actual`` (shown in the message), e.g. ``"engine 1 worker 0"``.
    """
    for name, want in expected.items():
        got = actual.get(name)
        if got is None:
            raise VerificationError(f"{where}: tensor {name!r} was sent but not received")
        if got != want:
            raise VerificationError(
                f"{where}: tensor {name!r} arrived corrupted (fingerprint {got} != sent {want})"
            )
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise VerificationError(f"{where}: received tensors that were not sent: {extra[:5]}")
