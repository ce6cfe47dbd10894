"""Deterministic tiny models of real HF architectures and a locally trained tokenizer, cached.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a synthetic corpus made from
a seeded generator, and the model is a randomly initialised HF causal LM of one of the families
people RL-train (:class:`Family`: Llama, Qwen2, Qwen3, Mistral, Qwen3-MoE) saved as
safetensors. The directory is named by a content key (a hash of every input to the build), so two
processes asking for the same model share one build and a changed recipe gets a new directory.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Bump when the build recipe changes in a way the spec's fields do not capture.
_RECIPE_VERSION = 2
_SYLLABLES = (
    "ka to ri mu se na lo pe vi da go ru hi ze ba mo ti ne su ra "
    "ko pa li me do sa ni fu ge ya wo chi shi tsu ho an en in on un"
).split()


class Family(enum.Enum):
    """HF architectures a tiny model can be built as (the ``model_type`` of its config)."""

    LLAMA = "llama"
    QWEN2 = "qwen2"  # biases on q/k/v
    QWEN3 = "qwen3"  # RMS norms on q and k
    MISTRAL = "mistral"
    QWEN3_MOE = "qwen3_moe"  # mixture of experts


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape and seeds of the tiny model.

    Attributes:
        hidden_size: Model width; with ``num_attention_heads`` it sets head_dim, which the vLLM
            CPU backend requires to be one of 32, 64, 80, 96, 112, 128, ...
        intermediate_size: MLP width.
        num_hidden_layers: Decoder layers.
        num_attention_heads: Query heads.
        num_key_value_heads: KV heads (grouped-query attention when smaller than query heads).
        vocab_size: Target vocabulary of the trained tokenizer (the model uses the real size).
        max_position_embeddings: Longest sequence the model accepts.
        seed: Seed of the weight initialisation and of the tokenizer corpus.
        tie_word_embeddings: Share the input embedding with the LM head.
        family: The HF architecture.
        num_experts: Experts per MoE layer (``Family.QWEN3_MOE`` only).
        num_experts_per_tok: Experts each token is routed to (MoE only).
    """

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 1024
    max_position_embeddings: int = 512
    seed: int = 0
    tie_word_embeddings: bool = False
    family: Family = Family.LLAMA
    num_experts: int = 4
    num_experts_per_tok: int = 2

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "family", Family(self.family))
        except ValueError:
            choices = ", ".join(f.value for f in Family)
            raise ValueError(
                f"TinyModelSpec.family={self.family!r}: not a known family; use one of {choices}"
            ) from None
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in ("int", int) and (not isinstance(value, int) or value < 0):
                raise ValueError(f"TinyModelSpec.{field.name}={value!r}: must be an int >= 0")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"TinyModelSpec.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}; pick sizes that divide"
            )
        head_dim = self.hidden_size // self.num_attention_heads
        if head_dim < 32 or head_dim % 16:
            raise ValueError(
                f"TinyModelSpec head_dim={head_dim} (hidden_size/num_attention_heads): the vLLM CPU"
                " backend needs one of 32, 64, 80, 96, 112, 128, ...; raise hidden_size"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"TinyModelSpec.num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"TinyModelSpec.num_experts_per_tok={self.num_experts_per_tok}: must be in "
                f"[1, num_experts={self.num_experts}]"
            )
        if self.vocab_size < 300:
            raise ValueError(
                f"TinyModelSpec.vocab_size={self.vocab_size}: a byte-level BPE needs > 256 "
                "entries; use at least 300"
            )

    def content_key(self) -> str:
        """Hash of every input to the build; names the cache directory."""
        fields = dataclasses.asdict(self)
        fields["family"] = self.family.value
        if self.family is not Family.QWEN3_MOE:  # unused fields do not rename the cache
            del fields["num_experts"], fields["num_experts_per_tok"]
        blob = json.dumps({"recipe": _RECIPE_VERSION, **fields}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


#: A Llama whose weights are a measurable share of a process (hidden 512, 8 heads of 64, 4 KV
#: heads, MLP 1536, 34 layers: 309 tensors, ~216 MB in bf16; the vocabulary stays small for
#: the local tokenizer): the weight-sync benchmark's model and the CPU sleep test's.
WEIGHTS_216MB = TinyModelSpec(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=34,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=1024,
    max_position_embeddings=512,
    seed=0,
)


def default_cache_root() -> Path:
    """Where tiny models are cached: ``$COLOCATE_CACHE`` or ``~/.cache/colocate``."""
    return Path(os.environ.get("COLOCATE_CACHE", Path.home() / ".cache" / "colocate"))


def build_tiny_model(
    spec: TinyModelSpec | None = None, cache_root: str | Path | None = None
) -> Path:
    """Returns the directory of the tiny model, building it on first use.

    Steps: (1) derive the content key from ``spec``; (2) if ``<root>/tiny-<family>-<key>`` holds a
    finished build, return it; (3) otherwise build into a temporary sibling directory and
    rename it into place, so that concurrent builders never see a half-written model.

    Args:
        spec: Model shape and seed; the defaults give a ~1 MB model vLLM's CPU backend accepts.
        cache_root: Parent directory of the cache; defaults to :func:`default_cache_root`.

    Returns:
        The model directory (config.json, model.safetensors, tokenizer files).
    """
    spec = spec or TinyModelSpec()
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    target = root / f"tiny-{spec.family.value}-{spec.content_key()}"
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        _write_tokenizer(spec, tmp)
        _write_model(spec, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the model is read by other users' actors too
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same build first; theirs is identical.
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def synthetic_corpus(seed: int, lines: int = 4000) -> list[str]:
    """Deterministic pseudo-words joined into lines; the tokenizer's training text."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 3))) for _ in range(600)]
    return [" ".join(rng.choices(words, k=rng.randint(4, 12))) for _ in range(lines)]


def _write_tokenizer(spec: TinyModelSpec, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(spec.seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(out)


def _write_model(spec: TinyModelSpec, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    extra = {}
    if spec.family is Family.QWEN3_MOE:
        extra = {
            "num_experts": spec.num_experts,
            "num_experts_per_tok": spec.num_experts_per_tok,
            "moe_intermediate_size": spec.intermediate_size // 2,
            "decoder_sparse_step": 1,
        }
    if spec.family in (Family.QWEN3, Family.QWEN3_MOE):
        extra["head_dim"] = spec.hidden_size // spec.num_attention_heads
    config = AutoConfig.for_model(
        spec.family.value,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        vocab_size=len(tok),
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="bfloat16",
        **extra,
    )
    torch.manual_seed(spec.seed)
    # Saved in bf16, the engines' dtype: vLLM loads it without a cast, and the trainer's fp32
    # copy starts from exactly the values the engines hold.
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    if spec.family is Family.QWEN2:
        # HF initialises biases to zero; random ones make the q/k/v biases matter end to end.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("_proj.bias"):
                    p.normal_(0.0, 0.02)
    model.save_pretrained(out, safe_serialization=True)
