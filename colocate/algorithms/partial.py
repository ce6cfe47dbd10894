"""Partial rollouts: prompt groups that outlive a step on shared GPUs. Pure; no Ray, no vLLM.

In ``Pipeline.PARTIAL`` mode the engines keep more prompt groups in flight than a train batch
needs. A rollout stops as soon as the batch's groups are complete; the requests still running
are aborted with their tokens and log-probs kept (``EngineTenant.rollout``), and they live
here, on the driver, until the next rollout resumes them under the newer weights (prompt +
kept tokens re-prefilled). The driver therefore always holds every request it issued: an
engine that dies mid-rollout loses only that rollout's progress, never a request.

:class:`RolloutBuffer` is the book of every group: queued (not started), in flight (some
completion unfinished), complete (waiting to be trained on), dropped (counted, with the
reason), and returned. ``issued == queued + in flight + complete + dropped + returned``
groups at every moment (:meth:`RolloutBuffer.accounting`).

Staleness of a completion is how many trainer steps lie between the weights of its oldest and
of its newest tokens: its newest minus its oldest weight version, except that a version sent
again without a step between (``recover()``, ``resume()``) adds none. A group with
a completion that could not be resumed within ``max_staleness`` is dropped
(``StalenessPolicy.DROP``), or is never let get there (``StalenessPolicy.WAIT``: the rollout
before that does not stop until it is finished). A completion that finished early waits for
its group's others without aging its own span: how far behind the trainer a batch is when
trained on is the coordinator's ``batch_staleness`` metric.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence

from colocate.core.config import StalenessPolicy
from colocate.core.contract import Completion, PartialRequest

__all__ = ["RolloutBuffer", "Dispatch"]


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """One rollout round's work: each engine's requests, its quota, and what must finish.

    Attributes:
        requests: Per engine, the requests of the whole groups it continues.
        quotas: Per engine, the groups it must complete before it may stop.
        finish: Groups that must finish in this round (WAIT policy).
    """

    requests: tuple[tuple[PartialRequest, ...], ...]
    quotas: tuple[int, ...]
    finish: frozenset


class RolloutBuffer:
    """Every prompt group of a partial-rollout run, from queued to returned.

    Args:
        group_size: Completions per prompt (``Sampling.n``).
        in_flight_groups: Most groups started and not yet complete at a round's start.
        max_staleness: Most weight versions between a completion's oldest and newest tokens.
        policy: What to do with a group that would exceed it.
    """

    def __init__(
        self,
        group_size: int,
        in_flight_groups: int,
        max_staleness: int,
        policy: StalenessPolicy = StalenessPolicy.WAIT,
    ):
        self.group_size = group_size
        self.in_flight_groups = in_flight_groups
        self.max_staleness = max_staleness
        self.policy = StalenessPolicy(policy)
        self.queued: list[tuple[int, object]] = []  # (group, prompt) not started
        self.started: dict[int, list[PartialRequest]] = {}  # in flight or complete
        self.next_group = 0
        self.dropped: Counter = Counter()
        self.returned = 0
        self.steps: dict[int, int] = {}  # weight version -> the trainer step it carried

    # ----- groups in --------------------------------------------------------------------------

    def add(self, prompts: Sequence) -> list[int]:
        """Queues one group per prompt (text or token ids); returns their group ids."""
        ids = []
        for prompt in prompts:
            self.queued.append((self.next_group, prompt))
            ids.append(self.next_group)
            self.next_group += 1
        return ids

    def _start(self, group: int, prompt) -> list[PartialRequest]:
        text = prompt if isinstance(prompt, str) else None
        ids = () if text is not None else tuple(int(t) for t in prompt)
        return [PartialRequest(group, s, ids, text) for s in range(self.group_size)]

    # ----- one round ----------------------------------------------------------------------------

    def complete(self) -> list[int]:
        """Groups whose every completion is done, oldest first."""
        return sorted(g for g, rs in self.started.items() if all(r.done for r in rs))

    def in_flight(self) -> list[int]:
        """Started groups with a completion still unfinished, oldest first."""
        return sorted(g for g, rs in self.started.items() if not all(r.done for r in rs))

    def _oldest(self, group: int) -> int | None:
        """The step of the oldest weights among the group's unfinished completions' tokens."""
        steps = [
            self.steps[r.oldest_version] for r in self.started[group] if r.spans and not r.done
        ]
        return min(steps) if steps else None

    def staleness(self, spans: Sequence[tuple[int, int]]) -> int:
        """Trainer steps between the weights of the oldest and the newest of ``spans``."""
        if not spans:
            return 0
        steps = [self.steps[v] for v, _ in spans]
        return max(steps) - min(steps)

    def dispatch(self, version: int, step: int, engines: int, wanted: int) -> Dispatch:
        """The next round at weight ``version`` (carrying trainer ``step``) over ``engines``.

        Steps: (1) a group that would span more than ``max_staleness`` steps if resumed now
        is dropped (DROP; under WAIT this cannot happen, and is counted as a defect if it
        does); (2) new groups start from the queue until ``in_flight_groups`` are in flight;
        (3) whole groups go to engines in turn, each engine's quota its share of the groups
        still ``wanted``; (4) under WAIT, a group that could not survive one more train step
        must finish in this round.
        """
        self.steps[version] = step
        for g in self.in_flight():
            oldest = self._oldest(g)
            if oldest is not None and step - oldest > self.max_staleness:
                del self.started[g]
                reason = "stale" if self.policy is StalenessPolicy.DROP else "stale_under_wait"
                self.dropped[reason] += 1
        while self.queued and len(self.in_flight()) < self.in_flight_groups:
            group, prompt = self.queued.pop(0)
            self.started[group] = self._start(group, prompt)
        groups = self.in_flight()
        per_engine: list[list[PartialRequest]] = [[] for _ in range(engines)]
        counts = [0] * engines
        for i, g in enumerate(groups):
            per_engine[i % engines].extend(self.started[g])
            counts[i % engines] += 1
        need = max(0, wanted - len(self.complete()))
        quotas = [min(c, -(-need * c // max(1, len(groups)))) for c in counts]
        finish = frozenset()
        if self.policy is StalenessPolicy.WAIT:
            finish = frozenset(
                g
                for g in groups
                if (o := self._oldest(g)) is not None and step + 1 - o > self.max_staleness
            )
        return Dispatch(tuple(tuple(r) for r in per_engine), tuple(quotas), finish)

    def absorb(self, results: Sequence[PartialRequest]) -> None:
        """Takes an engine's answer: each request as far as it got (its group must be started)."""
        for r in results:
            group = self.started.get(r.group)
            if group is None:
                continue  # dropped meanwhile: nothing to keep
            group[r.sample] = r

    def fill(
        self,
        version: int,
        step: int,
        engines: int,
        wanted: int,
        run_round: Callable[[Dispatch], list],
    ) -> int:
        """Runs rounds until ``wanted`` groups are complete; returns how many rounds ran.

        Each round is :meth:`dispatch`, then ``run_round(plan)`` (every engine's answer: the
        engines' ``EngineTenant.rollout``), then :meth:`absorb` of every answer. A round also
        runs, with the batch already complete, while a group must finish before the next
        version (WAIT). It stops early when nothing is left to run (all dropped).
        """
        rounds = 0
        while True:
            plan = self.dispatch(version, step, engines, wanted)
            if len(self.complete()) >= wanted and not plan.finish:
                return rounds
            if not any(plan.requests):
                return rounds
            for answer in run_round(plan):
                self.absorb(answer)
            rounds += 1

    # ----- groups out ---------------------------------------------------------------------------

    def take(self, groups: int) -> list[Completion]:
        """The ``groups`` oldest complete groups as completions (prompt-major), removed here.

        ``prompt_index`` is the group id; ``weight_version`` the oldest version of the
        completion's tokens; ``weight_versions`` its spans.
        """
        out = []
        for g in self.complete()[:groups]:
            for r in self.started.pop(g):
                out.append(
                    Completion(
                        prompt_index=r.group,
                        sample_index=r.sample,
                        prompt_token_ids=r.prompt_token_ids,
                        token_ids=r.token_ids,
                        logprobs=r.logprobs,
                        text="",
                        finish_reason=r.finish_reason,
                        weight_version=r.oldest_version if r.spans else -1,
                        weight_versions=r.spans,
                    )
                )
            self.returned += 1
        return out

    def wanted(self) -> int:
        """New groups to queue so that ``in_flight_groups`` are queued, in flight or complete."""
        waiting = len(self.queued) + len(self.started)
        return max(0, self.in_flight_groups - waiting)

    def kept_tokens(self) -> int:
        """Tokens generated for the completions of groups started and not yet returned."""
        return sum(len(r.token_ids) for rs in self.started.values() for r in rs)

    def accounting(self) -> dict[str, int]:
        """Groups issued, queued, in flight, complete, dropped and returned (they add up)."""
        return {
            "issued": self.next_group,
            "queued": len(self.queued),
            "in_flight": len(self.in_flight()),
            "complete": len(self.complete()),
            "dropped": sum(self.dropped.values()),
            "returned": self.returned,
        }

    # ----- checkpoints --------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """Everything the buffer holds, as plain data (JSON): saved with a run's checkpoint."""
        return {
            "next_group": self.next_group,
            "queued": [[g, p if isinstance(p, str) else list(p)] for g, p in self.queued],
            "started": [dataclasses.asdict(r) for rs in self.started.values() for r in rs],
            "dropped": dict(self.dropped),
            "returned": self.returned,
            "steps": [[v, s] for v, s in self.steps.items()],
        }

    def restore(self, snapshot: dict) -> None:
        """Continues from :meth:`snapshot`: in-flight requests resume from their kept tokens."""
        self.next_group = int(snapshot["next_group"])
        self.queued = [(int(g), p) for g, p in snapshot["queued"]]
        self.started = {}
        for fields in snapshot["started"]:
            r = PartialRequest(
                **{
                    **fields,
                    "prompt_token_ids": tuple(fields["prompt_token_ids"]),
                    "token_ids": tuple(fields["token_ids"]),
                    "logprobs": tuple(fields["logprobs"]),
                    "spans": tuple(tuple(s) for s in fields["spans"]),
                }
            )
            self.started.setdefault(r.group, []).append(r)
        for rs in self.started.values():
            rs.sort(key=lambda r: r.sample)
        self.dropped = Counter(snapshot["dropped"])
        self.returned = int(snapshot["returned"])
        self.steps = {int(v): int(s) for v, s in snapshot["steps"]}
