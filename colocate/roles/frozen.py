"""A frozen, forward-only fp32 model role: the reference policy's, the reward model's, a user's."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from colocate.algorithms.micro_batches import balanced_bins, fewest_bins
from colocate.algorithms.packing import check_packing, forward_packed, sequence_lengths
from colocate.core.config import ConfigError
from colocate.operations.memory_plan import ModelHead, RoleFootprint, model_shape
from colocate.roles.base import RoleActor, micro_batches
from colocate.roles.role_checks import check_model_dir, check_same_vocabulary

__all__ = ["FrozenModelConfig", "FrozenModelActor"]


@dataclass(frozen=True)
class FrozenModelConfig:
    """What a frozen model role loads (a subclass's name is the one its errors give).

    Attributes:
        model: Local HF directory of the model.
        micro_batch_size: Rows per forward (padded rows; not used with a token budget).
        max_tokens_per_micro_batch: Forward packed sequences, at most this many tokens per
            forward (``colocate.algorithms.packing``), in place of padded rows; None: rows.
    """

    model: str
    micro_batch_size: int = 16
    max_tokens_per_micro_batch: int | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        m = self.micro_batch_size
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError(f"{name}.micro_batch_size={m!r}: must be an int >= 1; fix: e.g. 16")
        t = self.max_tokens_per_micro_batch
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ConfigError(
                f"{name}.max_tokens_per_micro_batch={t!r}: must be an int >= 1 or None; "
                "fix: e.g. 4096 (at least the longest prompt + completion)"
            )


class FrozenModelActor(RoleActor):
    """One rank of a frozen, forward-only fp32 model, parameterised by class attributes.

    A subclass sets them (functions as staticmethods, else they become verbs) and adds its verb,
    returning :meth:`forward_batch`; config: a :class:`FrozenModelConfig`. A frozen value model::

        class FrozenValues(FrozenModelActor):
            auto_class = "AutoModelForTokenClassification"
            head = ModelHead.TOKEN_SCORE  # colocate.operations.memory_plan
            outputs = 1
            forward_fn = staticmethod(batch_values)  # colocate.roles.critic
            span_name = "values.values"

            def values(self, batch: dict) -> torch.Tensor:
                return self.forward_batch(batch)

        roles = [Role("values", FrozenValues, FrozenModelConfig(path))]  # saved: num_labels=1
        values = coord.call_role("values", FrozenValues.values, batch)
    """

    auto_class: str  # the transformers auto class that loads the model (imported in the worker)
    head: ModelHead  # the head the memory plan counts the model with
    outputs: int | None = None  # outputs per row for the plan (None: one per vocabulary entry)
    # fn(model, batch) -> Tensor per micro-batch: a padded batch's rows [B, ...], or a packed
    # one's (colocate.algorithms.packing) per-token [1, N, ...] or per-sequence [k, ...] outputs
    forward_fn: staticmethod
    span_name: str  # the timeline span of a forward; its last part names the verb in errors
    check_model = staticmethod(check_model_dir)  # check(field, path) of the model, in the driver
    needs: dict[str, str] = {}  # heads the forward reads of the model -> the fix if one is missing

    @classmethod
    def check_config(cls, config: FrozenModelConfig, policy_model: str) -> None:
        """The model directory passes :attr:`check_model` and has the policy's vocabulary."""
        cls.check_model(f"{type(config).__name__}.model", config.model)
        check_same_vocabulary(f"{type(config).__name__}.model", config.model, policy_model)

    @classmethod
    def token_budget(cls, config: FrozenModelConfig) -> int | None:
        """``config.max_tokens_per_micro_batch``."""
        return config.max_tokens_per_micro_batch

    @classmethod
    def footprint(cls, config: FrozenModelConfig) -> RoleFootprint:
        """Frozen and forward-only: fp32 weights and one forward's activations.

        A forward of ``micro_batch_size`` rows, or of one packed row of
        ``max_tokens_per_micro_batch`` tokens.
        """
        shape = model_shape(config.model, cls.head)
        return RoleFootprint.frozen(
            shape,
            4,
            config.micro_batch_size,
            outputs=cls.outputs,
            max_tokens_per_micro_batch=config.max_tokens_per_micro_batch,
        )

    def build(self) -> torch.nn.Module:
        """The model in host memory, fp32 like the trainer's master weights, without grads."""
        import transformers

        auto = getattr(transformers, self.auto_class)
        model = auto.from_pretrained(self.config.model, dtype=torch.float32)
        where = f"{type(self.config).__name__}.model={self.config.model!r}: {type(model).__name__}"
        for attr, fix in self.needs.items():
            if not hasattr(model, attr):
                raise ConfigError(f"{where} has no {attr!r} head; fix: {fix}")
        model.requires_grad_(False)
        if self.config.max_tokens_per_micro_batch is not None:
            field = f"{type(self.config).__name__}.max_tokens_per_micro_batch"
            check_packing(model, f"{field} with {where}", model.config.vocab_size, atol=1e-4)
        return model

    @torch.no_grad()
    def forward_batch(self, batch: dict) -> torch.Tensor:
        """``forward_fn`` over ``batch``, results on host in row order.

        ``micro_batch_size`` padded rows at a time; with ``max_tokens_per_micro_batch``, the
        rows packed into the fewest balanced forwards of at most that many tokens, per-token
        outputs back as padded rows (0 past each row's length).
        """
        self.require_resident(self.span_name.rpartition(".")[2])
        budget = self.config.max_tokens_per_micro_batch
        with self.span(self.span_name, rows=len(batch["input_ids"])) as detail:
            if budget is not None:
                lengths = sequence_lengths(batch)
                bins = balanced_bins(lengths, fewest_bins(lengths, budget))
                detail["forwards"] = len(bins)
                fn = functools.partial(self.forward_fn, self.module)
                return forward_packed(fn, batch, bins, lengths, self.device)
            out = []
            for part in micro_batches(batch, self.config.micro_batch_size):
                part = {k: part[k].to(self.device) for k in ("input_ids", "attention_mask")}
                out.append(self.forward_fn(self.module, part).cpu())
            return torch.cat(out)
