"""Comparing what the trainer sent with what the engine applied (where parameters are readable).

vLLM fuses checkpoint tensors (q/k/v into qkv_proj, gate/up into gate_up_proj, experts into one
tensor; see ``weight_sync.packing``) and shards them
over TP ranks; fingerprints are additive, so the expected fingerprint of an applied parameter
is the sum of its members', and a sharded parameter's shards sum to it. A parameter replicated
on every TP rank (a norm) reports identical fingerprints on each and is counted once. Padding
rows (zeros) change the element count but not the sums, so only the sums are compared.
"""

from __future__ import annotations

from collections.abc import Sequence

from weight_sync.errors import VerificationError
from weight_sync.fingerprint import Fingerprint
from weight_sync.packing import Packing

__all__ = ["expected_applied", "check_applied"]


def expected_applied(sent: dict[str, Fingerprint], packing: Packing) -> dict[str, Fingerprint]:
    """Expected fingerprint of each engine parameter, from the sent checkpoint tensors."""
    out: dict[str, Fingerprint] = {}
    for name, fp in sent.items():
        key = packing.engine_name(name)
        out[key] = out[key] + fp if key in out else fp
    return out


def check_applied(
    sent: dict[str, Fingerprint],
    workers: Sequence[dict[str, Fingerprint]],
    packing: Packing,
    *,
    where: str,
) -> int:
    """Raises :class:`VerificationError` on the first applied parameter that differs.

    Args:
        sent: Fingerprints the sender computed, by checkpoint name.
        workers: Per TP worker, fingerprints of its readable applied parameters.
        packing: The engine's packing.
        where: Who applied them (for the message).

    Returns:
        How many parameters were compared (those readable and named like the checkpoint).
    """
    expected = expected_applied(sent, packing)
    names = sorted(set().union(*[w.keys() for w in workers])) if workers else []
    checked = 0
    for name in names:
        if name not in expected:
            continue  # engine-only tensors (e.g. rotary caches) were never sent
        shards = [w[name] for w in workers if name in w]
        if len(shards) > 1 and all(s == shards[0] for s in shards):
            total = shards[0]  # replicated on every TP rank
        else:
            total = shards[0]
            for s in shards[1:]:
                total = total + s
        want = expected[name]
        if (total.bit_sum, total.square_sum) != (want.bit_sum, want.square_sum):
            raise VerificationError(
                f"{where}: applied parameter {name!r} differs from what was sent "
                f"(fingerprint {total} != expected {want})"
            )
        checked += 1
    return checked
