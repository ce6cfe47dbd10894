"""ZeRO-3 start-up that never holds the whole model on a rank.

``from_pretrained`` followed by ``deepspeed.initialize`` materialises every parameter on every
rank before partitioning it (a 7B model in fp32 is 28 GB per rank). Here the model is built
under ``deepspeed.zero.Init`` (each module's parameters are partitioned as soon as the module is
constructed, without running the weight initialisers) and each rank then copies into its own
partition of every parameter the matching slice of that tensor, read alone from the local
safetensors checkpoint. While loading, a rank holds its partitions plus one checkpoint tensor
(the peak of a whole start is then set by ``deepspeed.initialize``'s optimizer states; the
plain load's full-model transient, 4 bytes a parameter per rank, matters above ~4 ranks).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

__all__ = ["PartitionedLoadUnavailableError", "checkpoint_files", "load_partitioned"]


class PartitionedLoadUnavailableError(Exception):
    """The checkpoint does not name the module's parameters one to one.

    E.g. transformers 5 keeps a MoE layer's experts as one 3-D tensor that checkpoints store
    per expert; the caller then loads the model the plain way.
    """


def checkpoint_files(model_dir: str) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it (index, else every file)."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: root / file for name, file in weight_map.items()}
    from safetensors import safe_open

    out = {}
    for file in sorted(root.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update((name, file) for name in f.keys())
    return out


def _check_names(config, files: dict[str, Path]) -> list[str]:
    """Every parameter (of the model built on the meta device) is a same-shaped tensor in files.

    Returns:
        The parameter names, in order.
    """
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    for name, param in meta.named_parameters():
        if name not in files:
            raise PartitionedLoadUnavailableError(
                f"parameter {name!r} is not a checkpoint tensor of the same name"
            )
        with safe_open(str(files[name]), "pt") as f:
            shape = tuple(f.get_slice(name).get_shape())
        if shape != tuple(param.shape):
            raise PartitionedLoadUnavailableError(
                f"checkpoint tensor {name!r} has shape {shape}, the parameter {tuple(param.shape)}"
            )
    return [name for name, _ in meta.named_parameters()]


def load_partitioned(model_dir: str, ds_config: dict, rank: int) -> torch.nn.Module:
    """Builds the model partitioned over the ZeRO-3 group and loads this rank's partitions.

    Steps: (1) check, on a model built on the meta device, that every parameter has a
    checkpoint tensor of its name and shape; (2) build from the config under ``zero.Init``
    without weight initialisation, and tie the embeddings; (3) per parameter, read that one
    tensor, cast it to the partition's dtype and copy this rank's contiguous slice of its
    flattened elements into the partition (DeepSpeed's layout: rank ``r`` holds elements
    ``[r * p, (r + 1) * p)``, zero padding at the end).

    Raises:
        PartitionedLoadUnavailableError: A parameter without a same-named, same-shaped
            checkpoint tensor (step 1, before anything is built), or a model built in step 2
            whose parameters differ from the meta-device one's.
    """
    import deepspeed
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    files = checkpoint_files(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    names = _check_names(config, files)  # before zero.Init: a refused model leaves nothing
    # The partitions' dtype comes from ds_config (fp32, or bf16/fp16 in those modes, as
    # deepspeed.initialize would cast). Not from zero.Init's dtype argument: DeepSpeed 0.19.8
    # ignores it where the accelerator has no fp16 (the CPU), giving bf16 partitions.
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # no_init_weights also skips the tying of input and output embeddings: tie them now, or a
    # tied LM head would be a parameter of its own (found by the tied-embeddings family test).
    model.tie_weights()
    built = [name for name, _ in model.named_parameters()]
    if built != names:
        differ = sorted(set(built) ^ set(names)) or ["(the same names, in another order)"]
        raise PartitionedLoadUnavailableError(
            f"the model built under zero.Init has other parameters than on the meta device "
            f"(e.g. {differ[0]!r})"
        )
    with contextlib.ExitStack() as stack:
        handles: dict[Path, object] = {}
        for name, param in model.named_parameters():
            file = files[name]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(str(file), "pt"))
            full = handles[file].get_tensor(name)  # this one tensor only
            part = param.ds_tensor
            piece = full.reshape(-1)[part.numel() * rank : part.numel() * (rank + 1)]
            with torch.no_grad():
                part.zero_()
                part[: piece.numel()].copy_(piece.to(part.dtype))
            del full, piece
    return model
