"""A run's metrics: ``metrics.jsonl`` (one line per step) and TensorBoard event files.

Names in TensorBoard are grouped the way users of verl know them: ``actor/`` (loss, clip
fraction, KL, training-inference log-prob gap), ``rollout/`` (reward, staleness, tokens),
``timing/`` (seconds of each part of a step, the sync's included), ``sync/`` (weight
versions, bytes);
anything else under ``misc/``. On resume the JSONL file is rewritten from the checkpoint's
history first, so every step appears exactly once (TensorBoard hides the events a killed run
logged past it). Weights & Biases runs in offline mode when asked for and installed.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["RunLog", "tensorboard_name", "tensorboard_available"]

_ACTOR = (
    "loss",
    "clip_fraction",
    "kl",
    "logprob_diff",
    "logprob_diff_max",
    "ratio_std",
    "value_loss",
)
_ROLLOUT = ("reward", "staleness", "tokens", "response_length")
_SYNC = ("weight_version", "weight_version_used", "sync_bytes")


def tensorboard_name(key: str) -> str:
    """The grouped TensorBoard tag of metric ``key`` (a key with a ``/`` is grouped already)."""
    if "/" in key:
        return key
    if key.endswith("_s"):
        return f"timing/{key}"
    for group, names in (("actor", _ACTOR), ("rollout", _ROLLOUT), ("sync", _SYNC)):
        if key in names or key.startswith(tuple(f"{n}_" for n in names)):
            return f"{group}/{key}"
    return f"misc/{key}"


def tensorboard_available() -> bool:
    """Whether TensorBoard's writer can be imported here."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


class RunLog:
    """Writes every step's metrics to JSONL and, if enabled, TensorBoard and W&B.

    Args:
        out: The run's output directory.
        history: Steps already done (a resumed run): written first, once each.
        tensorboard: Write TensorBoard event files under ``out/tensorboard``.
        wandb_project: Log to Weights & Biases in offline mode under this project (None: no).
    """

    def __init__(
        self,
        out: Path,
        history: list[dict] | None = None,
        tensorboard: bool = True,
        wandb_project: str | None = None,
    ):
        self.out = Path(out)
        self.rows: list[dict] = []
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run hides the events a killed run logged past its checkpoint.
            first = len(history) if history else None
            self._tb = SummaryWriter(log_dir=str(self.out / "tensorboard"), purge_step=first)
        self._wandb = None
        if wandb_project:
            import wandb

            self._wandb = wandb.init(project=wandb_project, dir=str(self.out), mode="offline")
        # Opened last: a sink that fails to start leaves no open file behind.
        self._jsonl = open(self.out / "metrics.jsonl", "w")  # noqa: SIM115 - closed in close()
        for row in history or []:
            self.write(row, to_tensorboard=False)

    def write(self, row: dict, to_tensorboard: bool = True) -> None:
        """Records one step (``row["step"]``); scalars go to TensorBoard and W&B."""
        self.rows.append(row)
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        step = int(row["step"])
        scalars = {
            k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))
        }
        if self._tb is not None and to_tensorboard:
            for key, value in scalars.items():
                self._tb.add_scalar(tensorboard_name(key), value, step)
            self._tb.flush()
        if self._wandb is not None and to_tensorboard:
            self._wandb.log({tensorboard_name(k): v for k, v in scalars.items()}, step=step)

    def plot(self, key: str, path: Path, ylabel: str) -> Path:
        """Draws ``key`` over the steps logged so far (e.g. the reward curve) to a PNG."""
        from colocate.operations._plot import plot_curve

        return plot_curve(self.rows, key, path, ylabel)

    def close(self) -> None:
        """Flushes and closes every sink. Idempotent."""
        if not self._jsonl.closed:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
