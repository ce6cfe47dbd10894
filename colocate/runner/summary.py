"""A finished run's summary (``OUT/summary.json``), its pictures and its console line.

Order at the end of a run: :func:`coordinator_facts`, inside the coordinator's ``with``
(writes ``timeline.json`` and ``timeline.png``; reads the ordering check, the tenants that
worked, the device probe, the memory plan checked before launch and the start-up spans);
then, after the loop's sinks are closed, :func:`summarize` (the logged steps' figures),
:func:`write_summary` (``summary.json`` and ``reward_curve.png``) and :func:`headline`.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["coordinator_facts", "summarize", "write_summary", "headline"]

#: The metrics rows' names the summary reads.
_KL = "actor/kl"
_LOGPROB_DIFF = "training/off_policy/logprob_diff"
_STALENESS = "training/off_policy/staleness"
_PARTIAL = "training/off_policy/"


def coordinator_facts(coord, out: Path) -> dict:
    """What the started coordinator knows at the end of the run; writes its timeline files.

    Returns:
        ``weight_version``, ``ordering_violations``, ``roles`` (the kinds of tenant that
        worked, e.g. ``["engine", "reference", "trainer"]``), ``accelerator`` (the placement
        probe of each bundle), ``memory_plan`` (the plan checked before launch, bytes per GPU,
        host memory on CPU, by ``pool/phase``) and ``startup_span_sum_seconds`` (the slowest
        engine's start plus the slowest trainer rank's: what a start-up that ran them one
        after the other would at least take).
    """
    timeline = coord.timeline
    timeline.to_chrome_trace(out / "timeline.json")
    timeline.to_png(out / "timeline.png", title="colocate-rl: one lane per GPU")
    memory = coord.memory_plan
    return {
        "weight_version": coord.weight_version,
        "ordering_violations": timeline.ordering_violations(),
        # actor names are the kind and the rank (engine0, trainer1); the coordinator's own
        # spans are not a tenant's
        "roles": sorted({s.actor.rstrip("0123456789") for s in timeline.spans} - {"coordinator"}),
        "accelerator": coord.hardware(),
        "memory_plan": {f"{p.pool.value}/{p.phase}": p.total for p in memory.phases}
        if memory
        else {},
        "startup_span_sum_seconds": timeline.startup_span_sum(),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarize(prepared, history: list[dict], first: int, facts: dict) -> dict:
    """The run's summary from its metrics rows and what the loop measured.

    Args:
        prepared: The checked run (:class:`colocate.runner.loop.Prepared`).
        history: Every step's metrics row (a resumed run's earlier steps included).
        first: The first step this process ran (0 for a new run).
        facts: :func:`coordinator_facts` and the loop's own figures (``startup_seconds``:
            ``Coordinator.start`` from call to ready; ``setup_seconds``: the run's start to
            its first step; ``total_seconds``; ``eval``; ``exports``; ``epochs_started``).

    Returns:
        The rewards (``initial_reward``, ``final_reward``: the mean of the last 5 steps,
        ``rewards``), ``kl`` (to the reference, the last 5 steps' mean; with a reference),
        ``logprob_diff`` (the largest per-step training-inference gap), ``max_staleness``,
        ``partial`` (partial rollouts: the largest staleness within a completion, the mean
        share of completions that spanned several versions, the groups dropped),
        ``phase_seconds`` (each ``timing_s/*`` part summed over this process's steps), the
        facts, and the data's counts.
    """
    cfg = prepared.config
    last = history[-5:]
    facts = dict(facts)
    epochs = facts.pop("epochs_started")
    mine = history[first:]
    parts = sorted({k for r in mine for k in r if k.startswith("timing_s/")} - {"timing_s/step"})
    summary = {
        "initial_reward": history[0]["reward"],
        "final_reward": _mean([r["reward"] for r in last]),
        "rewards": [r["reward"] for r in history],
        "steps": cfg.steps,
        "resumed_from": first if prepared.state else None,
        "weight_version": facts.pop("weight_version"),
        "ordering_violations": facts.pop("ordering_violations"),
        "roles": facts.pop("roles"),
        "logprob_diff": max((r.get(_LOGPROB_DIFF, 0.0) for r in history), default=0.0),
        "max_staleness": max((r.get(_STALENESS, 0.0) for r in history), default=0.0),
        "phase_seconds": {p.partition("/")[2]: sum(r.get(p, 0.0) for r in mine) for p in parts},
    }
    if all(_KL in r for r in last):
        summary["kl"] = _mean([r[_KL] for r in last])
    if f"{_PARTIAL}partial_fraction" in history[-1]:
        summary["partial"] = {
            "completion_max_staleness": max(r[f"{_PARTIAL}max_staleness"] for r in history),
            "partial_fraction": _mean([r[f"{_PARTIAL}partial_fraction"] for r in history]),
            "dropped": history[-1][f"{_PARTIAL}dropped"],
        }
    summary.update(facts)
    summary["data"] = {
        "train_rows": len(prepared.train),
        "eval_rows": len(prepared.eval) if prepared.eval is not None else 0,
        "filtered": prepared.train.filtered,
        "epochs_started": epochs,
    }
    summary["out"] = str(Path(cfg.out).resolve())
    return summary


def write_summary(summary: dict, history: list[dict], out: Path) -> None:
    """Writes ``summary.json`` and ``reward_curve.png`` (the mean reward of each step)."""
    from colocate.operations._plot import plot_curve

    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    # a reward model's or a penalty's scale is the recipe's: no fixed [0, 1] axis
    plot_curve(history, "reward", out / "reward_curve.png", "mean reward", ylim=None)


def headline(summary: dict, out: str | Path, name: str = "colocate-rl") -> str:
    """The console line of a finished run (``<name> done: reward a -> b ...; outputs in OUT/``).

    Args:
        summary: The run's summary (:func:`summarize`).
        out: The output directory as the user gave it.
        name: What ran.
    """
    last = min(5, len(summary["rewards"]))
    return (
        f"{name} done: reward {summary['initial_reward']:.3f} -> "
        f"{summary['final_reward']:.3f} (mean of the last {last} steps) in "
        f"{summary['steps']} steps, {summary['total_seconds']:.0f} s; weight version "
        f"{summary['weight_version']}; outputs in {out}/"
    )
