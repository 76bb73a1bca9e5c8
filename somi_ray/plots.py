"""Plots of a model's history."""

from __future__ import annotations

from pathlib import Path


def lineage_series(lineage) -> dict:
    """Per event: bits per byte per domain (where measured), hidden size and Part count."""
    series = {"event": [], "kind": [], "hidden_size": [], "n_parts": [], "bpb": {}}
    hidden, parts = None, None
    for event in lineage:
        hidden = event.metrics.get("hidden_size", event.details.get("hidden_size", hidden))
        parts = event.metrics.get("n_parts", event.details.get("n_parts", parts))
        series["event"].append(event.event_id)
        series["kind"].append(event.kind)
        series["hidden_size"].append(hidden)
        series["n_parts"].append(parts)
        bpb = event.metrics.get("bpb") or {}
        for domain, value in bpb.items():
            series["bpb"].setdefault(domain, []).append((event.event_id, value))
    return series


def plot_lineage(lineage, path: str | Path) -> Path:
    """Draw bits per byte per probe domain, hidden size and Part count over the events."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = lineage_series(lineage)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for domain, points in sorted(series["bpb"].items()):
        xs, ys = zip(*points)
        top.plot(xs, ys, marker="o", label=domain)
    top.set_ylabel("bits per byte (held-out)")
    if series["bpb"]:
        top.legend()
    top.grid(alpha=0.3)

    events = series["event"]
    hidden = [h if h is not None else float("nan") for h in series["hidden_size"]]
    parts = [p if p is not None else float("nan") for p in series["n_parts"]]
    bottom.step(events, hidden, where="post", label="hidden size", color="tab:blue")
    bottom.set_ylabel("hidden size")
    bottom.set_xlabel("lineage event")
    twin = bottom.twinx()
    twin.step(events, parts, where="post", label="Parts", color="tab:orange")
    twin.set_ylabel("Parts")
    for x, kind in zip(events, series["kind"]):
        if kind in ("absorb", "grow", "compress", "rollback"):
            bottom.axvline(x, color="grey", alpha=0.2)
            bottom.text(x, bottom.get_ylim()[1], kind, rotation=90, fontsize=7, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
