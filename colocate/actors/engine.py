"""The engine actor: one ``vllm.LLM`` with sleep/wake, generation and the weight-sync receiver.

It implements :class:`colocate.core.contract.EngineTenant`: every method is an idempotent mechanism;
the coordinator decides when each runs. Methods that touch memory record a timeline span under
the tag of the call they run in. The receiving side of a sync runs in every vLLM worker, as the
worker extension ``weight_sync.receiver.WeightSyncWorkerExtension``; this actor reaches it with
``collective_rpc``, naming each extension method by the method object itself.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

from colocate.actors.partial_generation import continue_requests
from colocate.actors.sleep import SleepTag, make_sleep_strategy
from colocate.core.config import EngineConfig, LoadFormat, Sampling
from colocate.core.contract import (
    Completion,
    EngineCapabilities,
    EngineTenant,
    PartialRequest,
    Receipt,
    Seat,
)
from colocate.core.errors import ActorStateError, EngineRpcTimeoutError, InputError
from colocate.core.faults import Fault, coerce_fault
from colocate.core.phases import EngineMemory, PhaseError
from colocate.operations.memory import process_stats, refresh_children
from placement import TenantKind

__all__ = ["EngineActor", "Completion", "EngineCapabilities", "PromptTooLongError", "llm_kwargs"]

# The workers' own wait for the warm-up ends before the call's bound, so that what comes back
# is their message (the compile still running), not a bare expiry.
_WARM_UP_SHARE = 0.9


class PromptTooLongError(InputError):
    """A prompt that does not fit in ``max_model_len`` with the requested completion."""


def llm_kwargs(config: EngineConfig, *, cuda: bool) -> dict:
    """The ``vllm.LLM`` arguments an engine config stands for (without the sync extension).

    Also what benchmarks use to set up a bare ``vllm.LLM`` the same way.
    """
    kwargs = dict(
        model=config.model,
        tokenizer=config.model,
        load_format=config.load_format.value,
        dtype=config.dtype.value,
        tensor_parallel_size=config.tensor_parallel_size,
        max_model_len=config.max_model_len,
        seed=config.seed,
        max_num_seqs=config.max_num_seqs,
        enforce_eager=(not cuda) if config.enforce_eager is None else config.enforce_eager,
    )
    if cuda or config.kv_cache_bytes is None:
        # On CPU vLLM sizes its KV cache from this share of host memory when no size is given
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
    if config.tensor_parallel_size > 1:
        # Inside a Ray placement group vLLM would pick its Ray executor, which the CPU
        # platform refuses; on CPU the TP workers are local processes.
        kwargs["distributed_executor_backend"] = "ray" if cuda else "mp"
    if config.kv_cache_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = config.kv_cache_bytes
    kwargs.update(config.vllm_kwargs)
    return kwargs


class EngineActor(EngineTenant):
    """Owns one vLLM engine (created in its own Ray actor by the coordinator).

    Args:
        seat: Its seat: ``config`` an :class:`EngineConfig`, ``lanes`` the GPUs of its TP
            ranks, ``env`` the environment for vLLM, set before it is imported (in-process
            engine core, the Ray executor's bundle settings), passed by the coordinator.
    """

    def __init__(self, seat: Seat):
        super().__init__(seat)  # sets the environment first
        # vLLM's CPU build calls deprecated torch.distributed names at import.
        warnings.filterwarnings("ignore", category=FutureWarning)
        config: EngineConfig = seat.config
        self.weight_version = 0 if config.load_format is LoadFormat.AUTO else -1
        self.memory = EngineMemory.AWAKE
        self._llm = None
        # How sleep frees memory here (colocate.actors.sleep), set by start.
        self._sleep_strategy = None
        self._weights_released = False  # a sleep dropped them (zeroed): sync before serving
        self.released: dict[str, int] = {}  # what the last sleep released (summed over workers)
        self._warming = False  # the workers' warm-up compile may still run
        self._plan = None  # the bucket plan of the sync set-up
        self._agent = None  # (AgentConfig, AgentLoop) of the last run_episodes
        self._episodes: list = []  # agent episodes paused by a run_episodes that stopped early

    def start(self) -> EngineCapabilities:
        """Builds the vLLM engine (allocates weights and KV cache). Idempotent."""
        if self._llm is None:
            with self.span("engine.start"):
                self._llm = self._build()
                refresh_children()  # the TP worker processes count in this engine's RSS
            self.memory = EngineMemory.AWAKE
            self._sleep_strategy = make_sleep_strategy(self.capabilities(), self._on_workers)
            from colocate.actors.engine_extension import EngineWorkerExtension as Ext

            # The first generate's one-off compile, in the background (engine_extension).
            self._warming = bool(self._on_workers(Ext.ce_warm_up))
        return self.capabilities()

    def _build(self):
        import vllm
        from vllm.platforms import current_platform

        from colocate.actors.engine_extension import EXTENSION_QUALNAME

        kwargs = llm_kwargs(self.config, cuda=current_platform.device_type == "cuda")
        kwargs.update(
            worker_extension_cls=EXTENSION_QUALNAME,
            enable_sleep_mode=current_platform.is_sleep_mode_available(),
        )
        return vllm.LLM(**kwargs)

    def capabilities(self) -> EngineCapabilities:
        """Platform, device type, and whether sleep really frees memory here."""
        from vllm.platforms import current_platform

        return EngineCapabilities(
            platform=type(current_platform).__name__,
            device_type=current_platform.device_type,
            sleep_supported=current_platform.is_sleep_mode_available(),
            tensor_parallel_size=self.config.tensor_parallel_size,
        )

    def generate(
        self, prompts: list[str] | list[list[int]], sampling: Sampling, first_index: int = 0
    ) -> list[Completion]:
        """Generates ``sampling.n`` completions per prompt.

        Args:
            prompts: Strings (tokenized here) or token-id lists.
            sampling: Sampling settings.
            first_index: ``prompt_index`` of the first prompt (its place in the whole batch).

        Returns:
            One :class:`Completion` per (prompt, sample), prompt-major, each carrying the
            weight version that produced it.

        Raises:
            PromptTooLongError: A prompt plus ``max_tokens`` exceeds ``max_model_len``.
        """
        llm = self._require_awake("generate")
        token_prompts = self._tokenize(prompts, sampling.max_tokens)
        self._finish_warm_up()
        self._maybe_crash(Fault.CRASH_IN_GENERATE)
        with self.span("engine.generate", prompts=len(token_prompts)):
            outputs = llm.generate(
                [{"prompt_token_ids": ids} for ids in token_prompts],
                sampling.to_vllm(),
                use_tqdm=False,
            )
            return self._completions(outputs, token_prompts, first_index)

    def rollout(
        self, requests: list[PartialRequest], sampling: Sampling, groups: int, finish: frozenset
    ) -> list[PartialRequest]:
        """Continues a partial rollout's requests (see ``EngineTenant.rollout``).

        A request given as text is tokenized here first (its ids come back with it).

        Raises:
            PromptTooLongError: A prompt plus ``max_tokens`` exceeds ``max_model_len``.
        """
        llm = self._require_awake("rollout")
        # One pass: tokenizes the texts and checks every prompt + max_tokens against the length.
        ids = self._tokenize(
            [r.prompt_token_ids or r.prompt for r in requests], sampling.max_tokens
        )
        requests = [
            r if r.prompt_token_ids else dataclasses.replace(r, prompt_token_ids=tuple(p))
            for r, p in zip(requests, ids, strict=True)
        ]
        self._finish_warm_up()
        self._maybe_crash(Fault.CRASH_IN_GENERATE)
        running = sum(not r.done for r in requests)
        with self.span("engine.rollout", requests=running, groups=groups) as detail:
            out = continue_requests(
                llm.llm_engine, requests, sampling, groups, finish, self.weight_version
            )
            detail["kept"] = sum(not r.done for r in out)
        return out

    def run_episodes(
        self, starts: list, sampling: Sampling, agent, groups: int | None, alone: bool = False
    ) -> list:
        """Runs agent episodes here (see ``EngineTenant.run_episodes``; ``colocate.agents``).

        Raises:
            ValueError: A prompt that leaves no room for a turn in ``max_context``.
        """
        from colocate.agents.episode import Stage

        llm = self._require_awake("run_episodes")
        loop = self._agent_loop(agent, llm)
        self._finish_warm_up()
        self._maybe_crash(Fault.CRASH_IN_GENERATE)
        try:
            new = loop.start(starts)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        kept = [] if alone else self._episodes
        episodes = kept + new
        with self.span("engine.run_episodes", new=len(new), resumed=len(kept)) as d:
            loop.run(llm.llm_engine, episodes, sampling, self.weight_version, groups)
            by_group: dict[int, list] = {}
            for e in episodes:
                by_group.setdefault(e.start.group, []).append(e)
            finished = [g for g, m in by_group.items() if all(e.stage is Stage.DONE for e in m)]
            if groups is not None:  # the oldest; other finished groups wait for the next call
                finished = sorted(finished)[:groups]
            done = set(finished)
            if not alone:
                self._episodes = [e for e in episodes if e.start.group not in done]
            tokenizer = llm.get_tokenizer()
            out = [
                e.result(tokenizer.decode(e.ids))
                for g in finished
                for e in sorted(by_group[g], key=lambda e: e.start.sample)
            ]
            d.update(returned=len(out), paused=len(self._episodes), steps=loop.steps)
        return out

    def _agent_loop(self, agent, llm):
        """The agent loop for ``agent`` (made again when the config changes)."""
        from colocate.agents.loop import AgentLoop

        if self._agent is None or self._agent[0] != agent:
            if self._episodes:
                raise InputError(
                    f"{self.name}: {len(self._episodes)} episodes of another AgentConfig are "
                    "paused here; fix: finish them with the same config first"
                )
            if self._agent is not None:
                self._agent[1].close()
            loop = AgentLoop(agent, llm.get_tokenizer(), self.config.max_model_len)
            self._agent = (agent, loop)
        return self._agent[1]

    def _completions(self, outputs, token_prompts, first_index: int) -> list[Completion]:
        out = []
        for p, request in enumerate(outputs):
            for s, c in enumerate(request.outputs):
                logprobs = (
                    tuple(c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids))
                    if c.logprobs
                    else ()
                )
                out.append(
                    Completion(
                        prompt_index=first_index + p,
                        sample_index=s,
                        prompt_token_ids=tuple(token_prompts[p]),
                        token_ids=tuple(c.token_ids),
                        logprobs=logprobs,
                        text=c.text,
                        finish_reason=c.finish_reason,
                        weight_version=self.weight_version,
                    )
                )
        return out

    def _finish_warm_up(self) -> None:
        if self._warming:
            from colocate.actors.engine_extension import EngineWorkerExtension as Ext

            with self.span("engine.warm_up_wait") as detail:
                wait_s = _WARM_UP_SHARE * self.config.rpc_timeout_s
                done = self._on_workers(Ext.ce_warm_up_wait, wait_s)
                detail["compile_s"] = max((w["seconds"] or 0.0) for w in done)
                detail["errors"] = [w["error"] for w in done if w["error"]]
            self._warming = False

    def _tokenize(self, prompts, max_tokens: int) -> list[list[int]]:
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise InputError(f"prompts={prompts!r:.80}: pass a non-empty list of str or of ids")
        tokenizer = None
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                tokenizer = tokenizer or self._llm.get_tokenizer()
                ids = tokenizer.encode(p)
            else:
                ids = [int(t) for t in p]
            if not ids:
                raise InputError(f"prompt {i} is empty; pass at least one token")
            if len(ids) + max_tokens > self.config.max_model_len:
                raise PromptTooLongError(
                    f"prompt {i} has {len(ids)} tokens + max_tokens={max_tokens} > "
                    f"max_model_len={self.config.max_model_len}; fix: shorten the prompt, "
                    "lower Sampling.max_tokens, or raise EngineConfig.max_model_len"
                )
            out.append(ids)
        return out

    def sleep(self, level: int) -> EngineMemory:
        """Releases the KV cache and the weights (level 1 keeps a host copy, level 2 drops it).

        The engine's sleep strategy (``colocate.actors.sleep``, chosen at start) frees the memory:
        vLLM's sleep mode on CUDA; on CPU, where vLLM has no sleep mode,
        ``colocate.actors.cpu.cpu_sleep``
        returns the pages to the OS in every worker (the KV cache; at level 2 the weights too)
        and the span's ``released`` detail says how many bytes.
        """
        if level not in (1, 2):
            raise ValueError(f"sleep level={level!r}: must be 1 or 2")
        if self.memory is not EngineMemory.ASLEEP:
            llm = self._require_llm()
            with self.span("engine.sleep", level=level) as detail:
                result = self._sleep_strategy.release(llm, level)
                if result.figures is not None:
                    detail["released"] = self.released = result.figures
                self._weights_released = self._weights_released or result.weights_dropped
            self.memory = EngineMemory.ASLEEP
        return self.memory

    def wake_weights(self) -> EngineMemory:
        """Re-allocates the weights only (no KV cache), ready to receive a sync."""
        if self.memory is EngineMemory.ASLEEP:
            with self.span("engine.wake_weights"):
                self._sleep_strategy.acquire(self._llm, SleepTag.WEIGHTS)
            self.memory = EngineMemory.WEIGHTS
        return self.memory

    def wake_kv(self) -> EngineMemory:
        """Re-allocates the KV cache and resets the prefix cache; the engine can serve again.

        Generations then carry the version the last verified sync committed.
        """
        if self.memory is not EngineMemory.AWAKE:
            with self.span("engine.wake_kv"):
                if self.memory is EngineMemory.ASLEEP:
                    self._sleep_strategy.acquire(self._llm, SleepTag.WEIGHTS)
                self._sleep_strategy.acquire(self._llm, SleepTag.KV_CACHE)
                # Stale KV computed with older weights must never be served (vLLM issue 9744).
                self._llm.reset_prefix_cache()
            self.memory = EngineMemory.AWAKE
        return self.memory

    def _on_workers(self, method: Callable, *args) -> list:
        """Runs worker-extension ``method`` on every worker of the engine; one result each.

        The method is named by its own ``__name__`` (collective_rpc dispatches by name on the
        worker, which works for in-process and multi-process executors alike).

        Raises:
            EngineRpcTimeoutError: The call outlived ``EngineConfig.rpc_timeout_s``.
        """
        return self._rpc(method.__name__, method.__name__, args)

    def run_on_workers(self, fn: Callable, *args) -> list:
        """Runs ``fn(worker, *args)`` in every vLLM worker of this engine; one result each.

        An extension point (vLLM's ``collective_rpc`` with a callable) for code that needs
        vLLM's worker objects: custom loading, diagnostics, benchmarks. The coordinator never
        calls it; in multi-process executors ``fn`` and its arguments must pickle.

        Raises:
            EngineRpcTimeoutError: The call outlived ``EngineConfig.rpc_timeout_s``.
        """
        return self._rpc(fn, getattr(fn, "__qualname__", repr(fn)), args)

    def _rpc(self, method, what: str, args: tuple) -> list:
        """``collective_rpc`` under ``EngineConfig.rpc_timeout_s``; an expiry is typed."""
        llm = self._require_llm()
        timeout_s = self.config.rpc_timeout_s
        try:
            return llm.collective_rpc(method, timeout=timeout_s, args=args)
        except TimeoutError as exc:  # vLLM's multi-process and Ray executors raise this
            raise EngineRpcTimeoutError(
                f"{self.name}: {what} on its vLLM workers did not finish within "
                f"{timeout_s:g} s ({type(exc).__name__}: {exc}); fix: look for a hung worker "
                "or a dead transfer peer, or raise EngineConfig.rpc_timeout_s",
                engine=self.name,
                method=what,
                timeout_s=timeout_s,
            ) from exc

    def reset_prefix_cache(self) -> None:
        """Drops every cached prefix (after weights changed outside a coordinator sync)."""
        self._require_llm().reset_prefix_cache()

    def setup_sync(self, setup) -> list[dict]:
        """Every worker joins the transfer group (concurrently with the sender)."""
        from weight_sync.receiver import WeightSyncWorkerExtension as Ext

        self._plan = setup.plan
        return self._on_workers(Ext.ws_setup, setup)

    def receive_weights(self, request) -> Receipt:
        """Every worker receives, applies and verifies the sync; then the version is taken.

        Each worker compares what it received with the sender's manifest; here the applied
        parameters the workers can read are compared with what their members sum to (summed
        over TP shards). A sync that fails its verification leaves ``weight_version`` as it
        was (with ``verify=False`` nothing is checked and the version is taken as sent).
        """
        from colocate.actors.engine_extension import EngineWorkerExtension as Ext

        llm = self._require_llm()
        if self.memory is EngineMemory.ASLEEP:
            raise PhaseError(f"{self.name}: weights are asleep; wake_weights before a sync")
        with self.span("engine.receive_weights", version=request.version):
            reports = self._on_workers(Ext.ws_receive, request)
            llm.reset_prefix_cache()
            applied = 0
            if request.verify:
                from weight_sync.verify import check_applied

                applied = check_applied(
                    reports[0].sent,
                    [w.applied for w in reports],
                    self._plan.packing,
                    where=f"{self.name} (version {request.version})",
                )
            # Only now may it serve again: a failed check leaves released weights refused.
            self._weights_released = False
        self.weight_version = request.version
        verified = sum(w.verified for w in reports)
        return Receipt(request.version, reports, verified, applied)

    def applied_fingerprints(self) -> list[dict]:
        """Per worker, fingerprints of the applied parameters readable on this platform."""
        from weight_sync.receiver import WeightSyncWorkerExtension as Ext

        return self._on_workers(Ext.ws_applied_fingerprints)

    def expected_weights(self):
        """The checkpoint tensors this engine's model declares, and how the engine packs them.

        The tensors (HF names, shapes) come from the model's config on the meta device (no
        memory), so a trainer whose weights do not fit is refused before anything is sent; the
        packing and the parameter names from the loaded vLLM model in a worker.

        Returns:
            A ``weight_sync.EngineWeights``.
        """
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from weight_sync.buckets import TensorMeta
        from weight_sync.packing import EngineWeights
        from weight_sync.receiver import WeightSyncWorkerExtension as Ext

        config = AutoConfig.from_pretrained(self.config.model)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        dtype = self.config.dtype.torch
        metas = tuple(TensorMeta(n, tuple(p.shape), dtype) for n, p in model.named_parameters())
        packing, params = self._on_workers(Ext.ws_packing)[0]
        return EngineWeights(metas, packing, params)

    def inject_fault(self, fault: Fault) -> None:
        """Arms an engine fault (test hook; see :class:`colocate.core.faults.Fault`).

        ``CRASH_IN_GENERATE`` is armed here; ``CRASH_IN_RECEIVE`` and ``CORRUPT_NEXT_BUCKET``
        in every worker's receiver.
        """
        from weight_sync.receiver import ReceiveFaults
        from weight_sync.receiver import WeightSyncWorkerExtension as Ext

        fault = coerce_fault(fault)
        if fault.kind is not TenantKind.ENGINE:
            raise ValueError(f"{self.name}: {fault.value} is a {fault.kind.value} fault")
        if fault is Fault.CRASH_IN_GENERATE:
            self._faults.add(fault)
        elif fault is Fault.CRASH_IN_RECEIVE:
            self._on_workers(Ext.ws_arm, ReceiveFaults(exit_after_first_bucket=True))
        else:
            self._on_workers(Ext.ws_arm, ReceiveFaults(corrupt_next_bucket=True))

    def status(self) -> dict:
        """Memory state, weight version, what the last sleep released, pid, RSS, fds, threads.

        ``rss_tree_bytes`` includes the engine's TP worker processes. ``unfinished_requests``
        (requests in the engine) and ``episodes_paused`` (agent episodes held for the next
        ``run_episodes``) show what a rollout left behind: no request may outlive one.
        """
        llm = self._llm
        return {
            "name": self.name,
            "memory": self.memory.value,
            "weight_version": self.weight_version,
            "released": dict(self.released),
            "unfinished_requests": llm.llm_engine.get_num_unfinished_requests() if llm else 0,
            "episodes_paused": len(self._episodes),
            **process_stats(),
        }

    def shutdown(self) -> None:
        """Leaves the transfer group and drops the engine."""
        if self._agent is not None:
            self._agent[1].close()
            self._agent, self._episodes = None, []
        if self._llm is not None:
            from weight_sync.receiver import WeightSyncWorkerExtension as Ext

            try:
                self._on_workers(Ext.ws_teardown)
            finally:
                self._llm = None
                import gc

                gc.collect()

    def _require_llm(self):
        if self._llm is None:
            raise ActorStateError(f"{self.name}: the engine is not started")
        return self._llm

    def _require_awake(self, action: str):
        llm = self._require_llm()
        if self.memory is not EngineMemory.AWAKE:
            raise PhaseError(
                f"{self.name}: {action} needs the engine awake, it is {self.memory.value}"
            )
        if self.weight_version < 0:
            raise PhaseError(
                f"{self.name}: started with dummy weights and not synced yet; sync before {action}"
            )
        if self._weights_released:
            raise PhaseError(
                f"{self.name}: a level-2 sleep released the weights and no sync has restored "
                f"them; sync before {action}"
            )
        return llm
