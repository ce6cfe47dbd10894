"""The interleaved agent loop: many episodes on one vLLM engine, each at its own pace.

The engine (a vLLM ``LLMEngine``) is stepped directly. After every engine step, each episode
whose turn finished has its environment step submitted to a thread pool, and each episode
whose environment step returned is given its next turn at once: no episode waits for
another's turn or tool. While only environment steps are pending, the loop waits on them
(bounded by their deadlines). One request per episode turn, prompt = the episode's tokens so
far (vLLM's prefix cache serves the shared part), so the model's tokens are never decoded and
re-encoded.

The loop stops when every episode is done, or (``groups``) once that many prompt groups are
done: then the episode's turn in the engine is aborted with its tokens kept, the environment
steps still running are awaited (bounded), and the episode is paused: a later run resumes it
(its turn continues from the kept tokens). Either way nothing runs in the engine when the
loop returns, so the coordinator may put it to sleep.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import inspect
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from colocate.agents.config import AgentConfig
from colocate.agents.encoding import ObservationEncoder
from colocate.agents.environment import StepResult, Turn
from colocate.agents.episode import Episode, EpisodeStart, Stage

__all__ = ["AgentLoop"]


class AgentLoop:
    """Runs episodes on one engine (made once per engine actor).

    Args:
        agent: The environment and the episode limits.
        tokenizer: The engine's tokenizer.
        max_model_len: The engine's context length (the default ``max_context``).
        clock: Seconds, monotonic (a test may pass its own).
    """

    def __init__(
        self, agent: AgentConfig, tokenizer: Any, max_model_len: int, clock: Callable = None
    ):
        self.agent = agent
        self.tokenizer = tokenizer
        self.encoder = ObservationEncoder(tokenizer, agent.observation, agent.observation_role)
        self.max_context = min(agent.max_context or max_model_len, max_model_len)
        self.factory = agent.factory()
        self.pool = cf.ThreadPoolExecutor(agent.step_workers, thread_name_prefix="agent-env")
        self._events: asyncio.AbstractEventLoop | None = None  # for environments' async steps
        self.clock = clock or time.monotonic
        self.steps = 0  # engine steps taken (turn_steps count in them)
        self.abandoned = 0  # environment calls that outlived their timeout (threads left)
        self._requests = 0

    def start(self, starts: Sequence[EpisodeStart]) -> list[Episode]:
        """Makes each episode's environment and encodes its first observation."""
        out = []
        for s in starts:
            env = self.factory(**self.agent.env_kwargs)
            prompt = self.encoder.prompt(env.reset(s.row))
            if not prompt:
                raise ValueError(f"episode {s.group}/{s.sample}: reset returned an empty prompt")
            if len(prompt) >= self.max_context:
                raise ValueError(
                    f"episode {s.group}/{s.sample}: the prompt has {len(prompt)} tokens, "
                    f"max_context={self.max_context} leaves no room for a turn; fix: shorten "
                    "it or raise AgentConfig.max_context / EngineConfig.max_model_len"
                )
            out.append(Episode(s, env, prompt))
        return out

    def run(
        self,
        engine: Any,
        episodes: list[Episode],
        sampling: Any,
        version: int,
        groups: int | None = None,
    ) -> None:
        """Runs ``episodes`` (updated in place) until all are done or ``groups`` groups are.

        Steps per iteration: (1) submit the next turn of every READY episode; (2) step the
        engine (or, with no turn in it, wait for the first environment step due); (3) hand
        each finished turn to its environment; (4) take each environment step's result.
        Then, when stopping early, pause what is left (see the module docstring).
        """
        live = {}  # request id -> episode
        members: dict[int, list[Episode]] = {}
        for e in episodes:
            members.setdefault(e.start.group, []).append(e)

        def enough() -> bool:
            if groups is None or all(e.stage is Stage.DONE for e in episodes):
                return all(e.stage is Stage.DONE for e in episodes)
            done = sum(all(e.stage is Stage.DONE for e in m) for m in members.values())
            return done >= groups

        try:
            self._loop(engine, episodes, sampling, version, live, enough)
        except BaseException:
            if live:  # nothing of this call may keep running in the engine
                engine.abort_request(list(live))
                for e in live.values():
                    e.stage = Stage.READY  # a later run resumes the turn from its tokens
            raise
        self._pause(engine, episodes, live, version)

    def _loop(self, engine, episodes, sampling, version: int, live: dict, enough) -> None:
        while not enough():
            for e in episodes:
                if e.stage is Stage.READY:
                    self._submit(engine, e, sampling, live)
            if live:
                for out in engine.step():
                    e = live.get(out.request_id)
                    if e is None:
                        continue
                    self._delta(e, out, version)
                    if out.finished:
                        del live[out.request_id]
                        self._turn_done(e, out.outputs[0].finish_reason)
                self.steps += 1
            else:
                self._wait([e for e in episodes if e.stage is Stage.STEPPING])
            for e in episodes:
                if e.stage is Stage.STEPPING and (e.future.done() or self.clock() >= e.deadline):
                    self._stepped(e, version)

    # ----- one turn ---------------------------------------------------------------------------

    def _submit(self, engine: Any, e: Episode, sampling: Any, live: dict) -> None:
        from vllm.sampling_params import RequestOutputKind

        room = self.max_context - len(e.prompt_ids) - len(e.ids)
        budget = (self.agent.turn_tokens or sampling.max_tokens) - len(e.turn)
        if room < 1:  # the context is full: the episode ends here
            e.stats["truncated_context"] += 1
            self._finish(e, "length")
            return
        params = sampling.to_vllm()
        params.n = 1
        params.max_tokens = max(1, min(budget, room))
        params.output_kind = RequestOutputKind.DELTA
        params.detokenize = bool(params.stop)  # the turn's text is decoded once, at its end
        if params.seed is not None:  # one seed per episode turn, or a group's samples coincide
            params.seed += 7919 * e.start.group + 131 * e.start.sample + len(e.turn_steps)
        self._requests += 1
        rid = f"ep{e.start.group}.{e.start.sample}r{self._requests}"
        engine.add_request(rid, {"prompt_token_ids": e.context}, params)
        live[rid] = e
        # A resumed turn keeps its first step, whether or not it had sampled a token before
        # the pause (a request still queued in the engine had not).
        if not e.turn_steps or e.turn_steps[-1][1] != -1:
            e.turn_steps.append([self.steps, -1])
        e.stage = Stage.SAMPLING
        e.context_bound = budget > room  # the context, not the turn budget, bounds this turn

    def _delta(self, e: Episode, out: Any, version: int) -> None:
        c = out.outputs[0]
        logprobs = (
            [c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)] if c.logprobs else None
        )
        e.sampled(c.token_ids, logprobs, version)

    def _turn_done(self, e: Episode, finish_reason: str | None) -> None:
        e.turn_steps[-1][1] = self.steps
        e.finish_reason = finish_reason
        e.stats["turns"] += 1
        turn = Turn(
            index=int(e.stats["turns"]) - 1,
            token_ids=tuple(e.turn),
            text=self.tokenizer.decode(e.turn),
            finish_reason=finish_reason,
        )
        e.turn = []
        if finish_reason == "length":
            if e.context_bound:
                e.stats["truncated_context"] += 1
                self._finish(e, "length")
                return
            e.stats["truncated_turn_tokens"] += 1
        e.stats["env_steps"] += 1
        e.future = self._submit_step(e.env, turn)
        e.deadline = self.clock() + self.agent.step_timeout_s
        e.stage = Stage.STEPPING

    def _wait(self, stepping: list[Episode]) -> None:
        if not stepping:
            return
        due = min(e.deadline for e in stepping) - self.clock()
        cf.wait([e.future for e in stepping], timeout=max(0.0, due), return_when="FIRST_COMPLETED")

    def _stepped(self, e: Episode, version: int) -> None:
        """Takes the environment step's result (or its error, or its timeout)."""
        future, e.future = e.future, None
        if not future.done():
            future.cancel()
            self.abandoned += 1
            e.stats["tool_timeouts"] += 1
            result = StepResult(
                self.agent.timeout_message.format(seconds=self.agent.step_timeout_s)
            )
        elif future.exception() is not None:
            exc = future.exception()
            e.stats["tool_errors"] += 1
            result = StepResult(
                self.agent.error_message.format(error=f"{type(exc).__name__}: {exc}")
            )
        else:
            result = future.result()
            if not isinstance(result, StepResult):
                raise TypeError(
                    f"{type(e.env).__name__}.step returned {type(result).__name__}; an "
                    "environment's step returns colocate.agents.StepResult"
                )
        e.reward += float(result.reward)
        for k, v in result.info.items():
            e.stats[k] += float(v)
        if result.done:
            self._finish(e, e.finish_reason)
            return
        if e.stats["turns"] >= self.agent.max_turns:
            e.stats["truncated_turns"] += 1
            self._finish(e, e.finish_reason)
            return
        tokens = self.encoder.observation(result.observation)
        room = self.max_context - len(e.prompt_ids) - len(e.ids)
        if len(tokens) >= room:  # no room for the observation and a turn after it
            e.observed(tokens[: max(0, room)], version)
            e.stats["truncated_context"] += 1
            self._finish(e, e.finish_reason)
            return
        e.observed(tokens, version)
        e.stage = Stage.READY

    def _finish(self, e: Episode, finish_reason: str | None) -> None:
        e.finish_reason = finish_reason
        e.stage = Stage.DONE
        try:
            e.env.close()
        except Exception:  # noqa: BLE001 - a failing close must not lose the episode
            e.stats["close_errors"] += 1

    # ----- the hand-over ----------------------------------------------------------------------

    def _pause(self, engine: Any, episodes: list[Episode], live: dict, version: int) -> None:
        """Aborts the turns in the engine (tokens kept) and settles the environment steps."""
        if live:
            engine.abort_request(list(live))
            for e in live.values():
                e.stage = Stage.READY  # its turn resumes from the kept tokens
            live.clear()
        stepping = [e for e in episodes if e.stage is Stage.STEPPING]
        while stepping:
            self._wait(stepping)
            for e in stepping:
                if e.future.done() or self.clock() >= e.deadline:
                    self._stepped(e, version)
            stepping = [e for e in stepping if e.stage is Stage.STEPPING]

    def _submit_step(self, env: Any, turn: Turn) -> cf.Future:
        """``env.step(turn)``: a coroutine on the loop's event loop, else in a worker thread.

        A coroutine that outlives ``step_timeout_s`` is cancelled (``CancelledError`` at its
        ``await``); a synchronous step cannot be, and its thread is abandoned.
        """
        if inspect.iscoroutinefunction(env.step):
            if self._events is None:
                self._events = asyncio.new_event_loop()
                threading.Thread(
                    target=self._events.run_forever, name="agent-env-async", daemon=True
                ).start()
            return asyncio.run_coroutine_threadsafe(env.step(turn), self._events)
        return self.pool.submit(env.step, turn)

    def close(self) -> None:
        """Stops the worker threads and the event loop (a hung synchronous step stays)."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self._events is not None:
            self._events.call_soon_threadsafe(self._events.stop)
            self._events = None
