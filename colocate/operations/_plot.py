"""Drawing the timeline PNG (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

PHASE_COLOURS = {
    "start": "#9e9e9e",
    "init": "#bdbdbd",
    "rollout": "#4caf50",
    "train": "#2196f3",
    "sync": "#ff9800",
    "recover": "#e91e63",
}


def plot_timeline(timeline, path: Path, title: str = "") -> Path:
    """One lane per GPU, one row per actor inside it, bars coloured by phase; memory below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    spans = timeline.spans
    if not spans:
        raise ValueError("the timeline is empty; run the pipeline before plotting it")
    t0 = min(s.start for s in spans)
    lanes = timeline.lanes()
    rows: list[tuple[int, str]] = []
    for lane in lanes:
        for actor in sorted({s.actor for s in spans if lane in s.lanes}):
            rows.append((lane, actor))
    fig, (ax, mem) = plt.subplots(
        2,
        1,
        figsize=(14, 2 + 0.45 * len(rows) + 3),
        sharex=True,
        gridspec_kw={"height_ratios": [max(len(rows), 2), 4]},
    )
    for y, (lane, actor) in enumerate(rows):
        for s in spans:
            if s.actor == actor and lane in s.lanes:
                ax.barh(
                    y,
                    max(s.seconds, 0.002),
                    left=s.start - t0,
                    height=0.8,
                    color=PHASE_COLOURS.get(s.phase, "#607d8b"),
                    edgecolor="black",
                    linewidth=0.3,
                )
    ax.set_yticks(range(len(rows)), [f"GPU {lane} · {actor}" for lane, actor in rows])
    ax.invert_yaxis()
    for i in range(1, len(rows)):
        if rows[i][0] != rows[i - 1][0]:
            ax.axhline(i - 0.5, color="black", linewidth=0.8)
    ax.legend(
        handles=[Patch(color=c, label=p) for p, c in PHASE_COLOURS.items()],
        loc="upper right",
        fontsize=8,
        ncol=len(PHASE_COLOURS),
    )
    ax.set_title(title or "colocate timeline")
    kinds = set()
    for actor in sorted({s.actor for s in spans}):
        points = sorted(
            (s.end - t0, s.memory_after.used_bytes / 2**20, s.memory_after.kind)
            for s in spans
            if s.actor == actor and s.memory_after is not None
        )
        if points:
            kinds |= {k for _, _, k in points}
            mem.step([p[0] for p in points], [p[1] for p in points], where="post", label=actor)
    label = " / ".join(sorted(kinds)).replace("rss", "process RSS (CPU)")
    mem.set_ylabel(f"MiB: {label}")
    mem.set_xlabel("seconds since start")
    mem.legend(fontsize=8, loc="upper left", ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curve(rows: list[dict], key: str, path: Path, ylabel: str, ylim=(0, 1)) -> Path:
    """``key`` of every row against its ``step`` (a run's reward curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
