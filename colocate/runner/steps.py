"""One RL step of the runner: rollout, rewards, advantages, train, sync.

Order of a step (:meth:`StepRunner.step`):

1. **Rollout**: prompts drawn by the sampler go to the engines (SYNC: one batch; ASYNC: the
   batch generated during the previous step, the next one started at once; PARTIAL: the
   groups in flight topped up, the oldest complete groups taken). With DAPO's dynamic
   sampling, groups whose raw rewards are all equal are dropped and more are generated, at
   most ``algorithm.max_sampling_rounds`` rounds.
2. **Rewards**: the reward functions score every completion on the reward workers; the calls
   are submitted as soon as the completions are there and run while the roles score
   (reference log-probs, reward-model scores, critic values: the SCORE row).
3. **Advantages**: ``reward.on_error: drop`` removes the failed completions' groups; the
   reward (functions plus the reward model) goes through the recipe's estimator
   (:func:`colocate.algorithms.advantages.estimate`).
4. **Train** (the policy; then the critic for PPO) and **sync** (or the negative control's
   ``skip_sync``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from colocate.algorithms.advantages import Estimator, estimate, informative_groups
from colocate.algorithms.losses import make_batch
from colocate.core.config import Pipeline
from colocate.roles.critic import CriticActor
from colocate.roles.reference import ReferenceActor
from colocate.roles.reward_model import RewardModelActor
from colocate.runner import metrics
from colocate.runner.rewards import RewardError, RewardItem
from colocate.runner.schema import OnError

__all__ = ["StepRunner", "Drawn"]


@dataclass
class Drawn:
    """Completions of whole groups and the dataset row of each."""

    completions: list = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    #: Agent episodes: the ``EpisodeResult`` of each completion (its reward and counters).
    episodes: list = field(default_factory=list)

    def extend(self, other: Drawn) -> None:
        """Appends ``other``'s completions and rows."""
        self.completions += other.completions
        self.rows += other.rows
        self.episodes += other.episodes


class StepRunner:
    """Runs the steps of one recipe on a started coordinator (see the module docstring).

    Args:
        prepared: The checked run (:class:`colocate.runner.loop.Prepared`).
        coord: The started coordinator.
        scorer: The started reward scorer.
        sampler: Draws the train rows (:class:`colocate.runner.data.PromptSampler`).
        group_rows: PARTIAL: the dataset row of every group id issued so far (resumed runs
            pass the saved list).
    """

    def __init__(self, prepared, coord, scorer, sampler, group_rows: list[int] | None = None):
        self.p = prepared
        self.cfg = prepared.config
        self.coord = coord
        self.scorer = scorer
        self.sampler = sampler
        self.group_rows = list(group_rows or [])
        self.sampling = prepared.libs.sampling
        self.group = self.cfg.rollout.group_size
        self.mode = prepared.libs.pipeline.mode
        self.roles = {r.name for r in prepared.libs.roles}
        self._pending = None  # ASYNC: (rollout, rows) generating for the next step
        self.agent = prepared.libs.agent  # multi-turn episodes instead of completions
        self._episode_rows: dict[int, int] = {}  # agent episodes: group id -> dataset row

    # ----- 1. rollout -------------------------------------------------------------------------

    def _prompts(self, rows: list[int]) -> list[list[int]]:
        return [self.p.train.prompt_ids[i] for i in rows]

    def _draw(self, count: int, last: bool = False) -> Drawn:
        """One generate of ``count`` prompts' groups (PARTIAL: ``count`` complete groups).

        ASYNC: the batch started during the previous step, and the next one started at once
        (not after the run's ``last`` step: its prompts would be drawn and never trained).
        """
        coord = self.coord
        if self.agent is not None:
            return self._episodes(count)
        if self.mode is Pipeline.PARTIAL:
            rows = self.sampler.take(coord.rollouts.wanted())
            self.group_rows += rows
            done = coord.generate(self._prompts(rows), self.sampling, groups=count)
            return Drawn(done, [self.group_rows[c.prompt_index] for c in done])
        if self.mode is Pipeline.ASYNC:
            if self._pending is None:  # the first step: nothing was started ahead
                self._start_async(count)
            rollout, rows = self._pending
            done = rollout.result()
            self._pending = None
            if not last:
                self._start_async(count)
            return Drawn(done, [rows[c.prompt_index] for c in done])
        rows = self.sampler.take(count)
        done = coord.generate(self._prompts(rows), self.sampling)
        return Drawn(done, [rows[c.prompt_index] for c in done])

    def _episodes(self, count: int) -> Drawn:
        """Agent episodes of ``count`` groups (PARTIAL: new groups up to the in-flight count)."""
        coord, data = self.coord, self.p.train
        groups = None
        if self.mode is Pipeline.PARTIAL:
            in_flight = self.p.libs.pipeline.in_flight_groups
            rows = self.sampler.take(max(0, in_flight - coord.rollouts.episodes_held()))
            groups = count
        else:
            rows = self.sampler.take(count)
        first = coord.rollouts.episodes_issued
        self._episode_rows.update({first + i: r for i, r in enumerate(rows)})
        results = coord.run_episodes(
            [data.rows[r] for r in rows], self.agent, self.sampling, groups
        )
        ids = [self._episode_rows.pop(r.completion.prompt_index) for r in results[:: self.group]]
        return Drawn(
            [r.completion for r in results], [i for i in ids for _ in range(self.group)], results
        )

    def _start_async(self, count: int) -> None:
        rows = self.sampler.take(count)
        self._pending = (self.coord.generate_async(self._prompts(rows), self.sampling), rows)

    def stop(self) -> None:
        """ASYNC: waits for the batch generating ahead (the run is ending)."""
        if self._pending is not None:
            self._pending[0].result()
            self._pending = None

    def items(self, drawn: Drawn) -> list[RewardItem]:
        """The reward functions' inputs: the prompt as the model saw it, the completion."""
        data, decode = self.p.train, self.p.decode
        return [
            RewardItem(data.prompt_text[r], decode(c.token_ids), tuple(c.token_ids), data.rows[r])
            for c, r in zip(drawn.completions, drawn.rows, strict=True)
        ]

    def _filter_metric(self, scores, drawn: Drawn) -> list[float]:
        """The raw score a group is judged informative by (agents: ``env`` is theirs)."""
        name = self.cfg.algorithm.filter_metric
        env = [e.reward for e in drawn.episodes]
        if name == "env":
            return env
        if name is not None:
            return scores.per_function[name]
        if not env:
            return scores.total
        weight = self.cfg.agent.reward_weight
        return [t + weight * r for t, r in zip(scores.total, env, strict=True)]

    def rollout(self, last: bool = False) -> tuple[Drawn, object | None, dict]:
        """Step 1: the batch's groups; with dynamic sampling their rewards too."""
        wanted = self.cfg.rollout.prompts
        alg = self.cfg.algorithm
        if not alg.dynamic_sampling:
            return self._draw(wanted, last), None, {}
        kept, scored, rounds, dropped = Drawn(), [], 0, 0
        latest = None
        while rounds < alg.max_sampling_rounds and len(kept.rows) < wanted * self.group:
            rounds += 1
            drawn = self._draw(wanted - len(kept.rows) // self.group)
            scores = self.scorer.score(self.items(drawn))
            latest = (drawn, scores)
            useful = informative_groups(self._filter_metric(scores, drawn), self.group)
            for g, keep in enumerate(useful):
                lo, hi = g * self.group, (g + 1) * self.group
                if keep:
                    episodes = drawn.episodes[lo:hi]
                    kept.extend(Drawn(drawn.completions[lo:hi], drawn.rows[lo:hi], episodes))
                    scored.append((scores, lo, hi))
                else:
                    dropped += 1
        figures = {
            "dynamic_sampling/rounds": float(rounds),
            "dynamic_sampling/dropped_groups": float(dropped),
            "dynamic_sampling/kept_groups": float(len(kept.rows) // self.group),
        }
        if not kept.rows:  # nothing informative: train on the last round (zero advantages)
            drawn, scores = latest
            return drawn, scores, figures
        return kept, _joined(scored), figures

    # ----- 2-4. rewards, advantages, train, sync ----------------------------------------------

    def step(self, last: bool = False) -> dict:
        """One step (see the module docstring); returns its metrics (``last``: the run's)."""
        cfg, coord = self.cfg, self.coord
        t0 = time.time()
        drawn, scores, row = self.rollout(last)
        t_gen = time.time()
        pending = None if scores is not None else self.scorer.submit(self.items(drawn))
        batch = make_batch(drawn.completions, self.p.pad_id)
        rm_scores = None
        t_roles = time.time()
        if "reward" in self.roles:
            rm_scores = coord.call_role("reward", RewardModelActor.scores, batch)
        if "reference" in self.roles:
            batch["ref_logprobs"] = coord.call_role("reference", ReferenceActor.logprobs, batch)
        if "critic" in self.roles:
            batch["values"] = coord.call_role("critic", CriticActor.values, batch)
        t_score = time.time()
        if pending is not None:
            scores = pending.result()
        t_reward = time.time()
        total = torch.tensor(scores.total, dtype=torch.float32)
        if drawn.episodes:
            env = torch.tensor([e.reward for e in drawn.episodes], dtype=torch.float32)
            total = total + cfg.agent.reward_weight * env
        if rm_scores is not None:
            total = total + cfg.reward.model_weight * rm_scores.float()
        keep = self._kept_rows(scores, len(drawn.completions))
        if len(keep) < len(drawn.completions):
            batch = {k: v[keep] for k, v in batch.items()}
            total = total[keep]
            episodes = [drawn.episodes[i] for i in keep] if drawn.episodes else []
            drawn = Drawn(
                [drawn.completions[i] for i in keep], [drawn.rows[i] for i in keep], episodes
            )
        alg = cfg.algorithm
        batch = estimate(
            alg.estimator,
            batch,
            total,
            self.group,
            kl_coef=alg.kl_coef,
            gamma=alg.gamma,
            lam=alg.lam,
        )
        t_adv = time.time()
        stats = coord.train(batch)
        t_train = time.time()
        if alg.estimator is Estimator.GAE:
            value = coord.call_role("critic", CriticActor.train_values, batch)
            row["critic/vf_loss"] = float(value["value_loss"])
        t_critic = time.time()
        if cfg.skip_sync:
            coord.skip_sync()
        else:
            coord.sync()
        t_sync = time.time()
        row.update(
            {
                "reward": float(total.mean()),
                "sync/weight_version": float(coord.weight_version),
                "sync/weight_version_used": float(min(c.weight_version for c in drawn.completions)),
                "timing_s/gen": t_gen - t0,
                "timing_s/roles": t_score - t_roles,
                # waited for beyond the roles' scoring (the calls ran meanwhile)
                "timing_s/reward": (t_reward - t_score) if pending is not None else scores.seconds,
                "timing_s/reward_calls": scores.seconds,
                "timing_s/adv": t_adv - t_reward,
                "timing_s/train": t_train - t_adv,
                "timing_s/critic": t_critic - t_train,
                "timing_s/sync": t_sync - t_critic,
                "timing_s/step": t_sync - t0,
            }
        )
        row.update(metrics.length_metrics(drawn.completions, cfg.rollout.max_tokens))
        if drawn.episodes:
            row.update(metrics.agent_metrics(drawn.episodes))
        row.update(metrics.actor_metrics(stats))
        row.update(metrics.tensor_metrics(batch, total))
        row.update(metrics.reward_metrics(scores, len(keep), len(scores.total) - len(keep)))
        row.update(metrics.throughput(drawn.completions, t_sync - t0, self.p.gpus))
        if rm_scores is not None:
            row["reward/model/mean"] = float(rm_scores.float().mean())
        if self.mode is Pipeline.PARTIAL:
            figures = coord.rollouts.stats
            for key in ("partial_fraction", "max_staleness", "dropped", "in_flight"):
                row[f"training/off_policy/{key}"] = float(figures[key])
        return row

    def _kept_rows(self, scores, count: int) -> list[int]:
        """Rows kept after ``reward.on_error`` (FAIL raised already; DROP removes groups)."""
        if self.cfg.reward.on_error is not OnError.DROP or not scores.failed:
            return list(range(count))
        groups = {i // self.group for i in scores.failed}
        keep = [i for i in range(count) if i // self.group not in groups]
        if not keep:
            raise RewardError(
                f"every prompt group of the step has a failed reward call ({scores.errors}); "
                "nothing is left to train on; fix: the reward functions (see the errors), or "
                "reward.on_error=zero"
            )
        return keep


def _joined(parts: list) -> object:
    """The kept groups' scores of several dynamic-sampling rounds, as one Scores."""
    from colocate.runner.rewards import Scores

    first = parts[0][0]
    out = Scores(
        total=[],
        per_function={k: [] for k in first.per_function},
        extra={k: [] for k in first.extra},
        errors={},
        failed=set(),
        seconds=0.0,
    )
    offset = 0
    seen = set()
    for scores, lo, hi in parts:
        out.total += scores.total[lo:hi]
        for k in out.per_function:
            out.per_function[k] += scores.per_function[k][lo:hi]
        for k in out.extra:
            out.extra[k] += scores.extra[k][lo:hi]
        out.failed |= {offset + i - lo for i in scores.failed if lo <= i < hi}
        if id(scores) not in seen:  # each round's errors and time once
            seen.add(id(scores))
            for k, v in scores.errors.items():
                out.errors[k] = out.errors.get(k, 0) + v
            out.seconds += scores.seconds
        offset += hi - lo
    return out
