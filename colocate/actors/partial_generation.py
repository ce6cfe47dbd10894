"""The engine side of a partial rollout: step vLLM until enough groups finish, keep the rest.

The synchronous ``vllm.LLM`` runs its own loop to the last request; here its ``LLMEngine`` is
stepped directly, so that the rollout can stop once the train batch's groups are done: every
request still running is aborted, and its tokens and log-probs so far (streamed as deltas) go
back to the driver, which resumes them after the sync (``colocate.core.rollout_driver``).
Each request is one completion (``n = 1``): the samples of a group finish and resume apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from colocate.core.contract import PartialRequest

__all__ = ["continue_requests", "extend_spans"]


def extend_spans(
    spans: tuple[tuple[int, int], ...], version: int, tokens: int
) -> tuple[tuple[int, int], ...]:
    """``spans`` with ``tokens`` more tokens of weight ``version`` (merged into the last run)."""
    if tokens <= 0:
        return spans
    if spans and spans[-1][0] == version:
        return (*spans[:-1], (version, spans[-1][1] + tokens))
    return (*spans, (version, tokens))


def _params(sampling: Any, request: PartialRequest) -> Any:
    from vllm.sampling_params import RequestOutputKind

    params = sampling.to_vllm()
    params.n = 1
    params.max_tokens = sampling.max_tokens - len(request.token_ids)
    params.output_kind = RequestOutputKind.DELTA
    # A partial completion is token ids only (its text is never read): skip the per-step
    # incremental detokenization, unless stop strings need it.
    params.detokenize = bool(params.stop)
    if params.seed is not None:  # one seed per completion, or a group's samples coincide
        params.seed = params.seed + 7919 * request.group + request.sample
    return params


def continue_requests(
    engine: Any,
    requests: Sequence[PartialRequest],
    sampling: Any,
    groups: int,
    finish: frozenset,
    version: int,
) -> list[PartialRequest]:
    """Steps ``engine`` (a vLLM ``LLMEngine``) over ``requests``; see ``EngineTenant.rollout``.

    Steps: (1) add each unfinished request (prompt + kept tokens, the rest of its
    ``max_tokens``); (2) step, appending each delta's tokens and log-probs; (3) after each
    step, stop once ``groups`` groups have every request done and every group in ``finish``
    is done; (4) abort what still runs. Requests already done pass through.
    """
    # Grown in place (a request's tokens arrive one step at a time), made immutable at the end.
    tokens = {(r.group, r.sample): [] for r in requests}
    logprobs = {key: [] for key in tokens}
    finished = {(r.group, r.sample): r.finish_reason for r in requests}
    ids = {}
    for r in requests:
        if r.done:
            continue
        rid = f"g{r.group}s{r.sample}v{version}t{len(r.token_ids)}"
        prompt = {"prompt_token_ids": [*r.prompt_token_ids, *r.token_ids]}
        engine.add_request(rid, prompt, _params(sampling, r))
        ids[rid] = (r.group, r.sample)
    members: dict[int, list[tuple[int, int]]] = {}
    for key in tokens:
        members.setdefault(key[0], []).append(key)

    def enough() -> bool:
        complete = {g for g, keys in members.items() if all(finished[k] for k in keys)}
        return len(complete) >= groups and finish <= complete | (finish - members.keys())

    while ids and not enough():
        for out in engine.step():
            key = ids.get(out.request_id)
            if key is None:
                continue
            c = out.outputs[0]
            tokens[key].extend(c.token_ids)
            if c.logprobs:
                logprobs[key].extend(c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids))
            else:
                logprobs[key].extend([0.0] * len(c.token_ids))
            if out.finished:
                finished[key] = c.finish_reason
                del ids[out.request_id]
    if ids:
        engine.abort_request(list(ids))
    out = []
    for r in requests:
        key = (r.group, r.sample)
        out.append(
            dataclasses.replace(
                r,
                token_ids=(*r.token_ids, *tokens[key]),
                logprobs=(*r.logprobs, *logprobs[key]),
                spans=extend_spans(r.spans, version, len(tokens[key])),
                finish_reason=finished[key],
            )
        )
    return out
