"""How an engine builds its parameters from checkpoint tensors: read from the engine's model.

vLLM fuses checkpoint tensors into one parameter: ``q_proj``/``k_proj``/``v_proj`` into
``qkv_proj`` and ``gate_proj``/``up_proj`` into ``gate_up_proj`` (the model class's
``packed_modules_mapping``), and every expert of a mixture-of-experts layer into one
``w13_weight`` and one ``w2_weight`` (each expert module's ``get_expert_mapping``). A
:class:`Packing` is that description as data; the bucket planner keeps each fused group in one
bucket and verification adds up the members' fingerprints. :func:`packing_of_vllm_model` reads
it from the live model inside an engine worker (where the model is), and
:meth:`Packing.uncovered` says which engine parameters it does not explain, so a family whose
packing is unknown is refused (:class:`weight_sync.errors.PackingError`) before any weight moves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

__all__ = ["Packing", "EngineWeights", "LLAMA_PACKING", "packing_of_vllm_model"]


@dataclass(frozen=True)
class Packing:
    """Rules mapping a checkpoint tensor's name to the engine parameter it is loaded into.

    Attributes:
        modules: ``(members, fused)`` pairs: a module named like one of ``members`` (at dot
            boundaries, anywhere in the name) is part of the module ``fused``.
        prefixes: ``(checkpoint_prefix, engine_prefix)`` pairs, matched first: a name starting
            with ``checkpoint_prefix`` (which ends with a dot) is part of the parameter named
            ``engine_prefix`` plus the rest of the name (one pair per expert and projection of
            a MoE layer); a ``checkpoint_prefix`` without the final dot names one whole tensor
            (a layer's experts stored as one 3-D tensor, as transformers 5 holds them).
        architecture: The engine model's class (for messages).
    """

    modules: tuple[tuple[tuple[str, ...], str], ...] = ()
    prefixes: tuple[tuple[str, str], ...] = ()
    architecture: str = ""

    @cached_property
    def _prefix_map(self) -> dict[str, str]:
        return dict(self.prefixes)

    @cached_property
    def _module_rules(self) -> tuple[tuple[re.Pattern, str], ...]:
        return tuple(
            (re.compile(rf"(^|\.){re.escape(m)}(\.|$)"), fused)
            for members, fused in self.modules
            for m in members
        )

    def engine_name(self, name: str) -> str:
        """The engine parameter checkpoint tensor ``name`` is loaded into (itself if unfused)."""
        if self.prefixes:
            whole = self._prefix_map.get(name)
            if whole is not None:
                return whole
            cut = name.find(".")
            while cut != -1:  # every prefix ending at a dot, shortest first
                dst = self._prefix_map.get(name[: cut + 1])
                if dst is not None:
                    return dst + name[cut + 1 :]
                cut = name.find(".", cut + 1)
        for pattern, fused in self._module_rules:
            if pattern.search(name):
                return pattern.sub(rf"\g<1>{fused}\g<2>", name, count=1)
        return name

    def uncovered(self, checkpoint: Iterable[str], engine: Iterable[str]) -> list[str]:
        """Engine parameters that no checkpoint tensor maps to under these rules, sorted."""
        produced = {self.engine_name(n) for n in checkpoint}
        return sorted(set(engine) - produced)


#: vLLM's Llama-family description (Llama, Qwen2, Qwen3, Mistral declare the same): what the
#: pure planner, its tests and the transfer benchmark use when no engine is there to ask.
LLAMA_PACKING = Packing(
    modules=(
        (("q_proj", "k_proj", "v_proj"), "qkv_proj"),
        (("gate_proj", "up_proj"), "gate_up_proj"),
    ),
    architecture="LlamaForCausalLM",
)


@dataclass(frozen=True)
class EngineWeights:
    """What an engine's model expects and how it packs it (``EngineTenant.expected_weights``).

    Attributes:
        metas: ``TensorMeta`` of every checkpoint tensor the model declares.
        packing: The engine model's packing, read from the live model.
        params: Names of the engine model's own parameters.
    """

    metas: tuple = ()
    packing: Packing = field(default_factory=Packing)
    params: tuple[str, ...] = ()


def packing_of_vllm_model(model) -> Packing:
    """Reads the packing of a loaded vLLM model (call it where the model is: a worker).

    Steps: (1) the class's ``packed_modules_mapping`` gives the module rules; (2) every module
    with ``get_expert_mapping`` (vLLM's routed experts) gives one prefix rule per expert and
    projection: the checkpoint's ``<layer>.<expert>.<proj>.`` goes to the module's own
    parameter (``w13_``/``w2_`` plus the rest of the name).
    """
    mapping = getattr(model, "packed_modules_mapping", None) or {}
    modules = tuple((tuple(members), fused) for fused, members in mapping.items())
    prefixes: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        get = getattr(module, "get_expert_mapping", None)
        layer = getattr(module, "layer_name", None)
        if get is None or not layer:
            continue
        try:  # per-expert checkpoint names and whole 3-D expert tensors
            entries = get(include_fused=True)
        except TypeError:  # older signature
            entries = get()
        parent, _, last = layer.rpartition(".")
        for param_name, weight_name, _expert, _shard in entries:
            # The checkpoint name is the layer's name joined with weight_name, whose first
            # component repeats the layer's last ("experts" + "experts.3.up_proj.", or
            # "experts.gate_up_proj" for the whole tensor).
            head = weight_name.partition(".")[0]
            p_head, _, p_rest = param_name.partition(".")
            if head != last or p_head != last:
                continue  # an unknown layout: Packing.uncovered reports the parameters
            src = f"{parent}.{weight_name}" if parent else weight_name
            prefixes.append((src, f"{name}.{p_rest}"))
    return Packing(modules, tuple(prefixes), type(model).__name__)
