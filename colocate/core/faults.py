"""Fault injection points (test hooks), named once.

The coordinator arms a fault in one actor (:meth:`colocate.Coordinator.inject_fault`); the actor
then fails at that point as a real fault would: its process exits (as a kill would), or the
next bucket it receives is corrupted (as a bad link would).
"""

from __future__ import annotations

import enum

from placement import TenantKind

__all__ = ["Fault", "coerce_fault"]


class Fault(enum.Enum):
    """Where an armed actor fails.

    Attributes:
        CRASH_IN_GENERATE: An engine's process exits when its next generate starts.
        CRASH_IN_RECEIVE: An engine worker's process exits after applying the first bucket of
            the next sync (in the middle of the transfer).
        CORRUPT_NEXT_BUCKET: An engine worker flips bytes of the next bucket it receives
            (caught by verification).
        CRASH_IN_TRAIN_STEP: A trainer rank's process exits after the forward of its next step.
        CRASH_IN_SEND: A trainer rank's process exits after handing its first bucket over.
        CRASH_IN_ROLE_CALL: A role's process exits when its next verb (not a memory
            mechanism) starts.
    """

    CRASH_IN_GENERATE = "crash_in_generate"
    CRASH_IN_RECEIVE = "crash_in_receive"
    CORRUPT_NEXT_BUCKET = "corrupt_next_bucket"
    CRASH_IN_TRAIN_STEP = "crash_in_train_step"
    CRASH_IN_SEND = "crash_in_send"
    CRASH_IN_ROLE_CALL = "crash_in_role_call"

    @property
    def kind(self) -> TenantKind:
        """The kind of actor this fault is armed in."""
        engine = (Fault.CRASH_IN_GENERATE, Fault.CRASH_IN_RECEIVE, Fault.CORRUPT_NEXT_BUCKET)
        if self is Fault.CRASH_IN_ROLE_CALL:
            return TenantKind.ROLE
        return TenantKind.ENGINE if self in engine else TenantKind.TRAINER


def coerce_fault(fault: Fault | str) -> Fault:
    """``fault`` as a :class:`Fault`; a name that is not one raises ``ValueError`` listing them."""
    if isinstance(fault, Fault):
        return fault
    try:
        return Fault(fault)
    except ValueError:
        known = ", ".join(f.value for f in Fault)
        raise ValueError(f"unknown fault {fault!r}; fix: use one of {known}") from None
