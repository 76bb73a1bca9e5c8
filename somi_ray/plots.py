"""Plots of a model's history."""

from __future__ import annotations

from pathlib import Path


def lineage_series(lineage) -> dict:
    """Return, per event, bits per byte per domain (where measured), hidden size, Parts and parameters.

    Sizes come from `hidden_size`/`n_parts`/`parameters`, or from the `*_after` metrics of
    growth and compression events. Bits per byte is a {domain: value} dict, one number (domain
    "held-out") or a structural event's `bpb_after`.
    """
    series = {"event": [], "kind": [], "hidden_size": [], "n_parts": [], "parameters": [], "bpb": {}}
    hidden, parts, parameters = None, None, None
    for event in lineage:
        metrics, details = event.metrics, event.details
        hidden = metrics.get("hidden_size", metrics.get("hidden_size_after", details.get("hidden_size", hidden)))
        parts = metrics.get("n_parts", metrics.get("n_parts_after", details.get("n_parts", parts)))
        series["event"].append(event.event_id)
        series["kind"].append(event.kind)
        series["hidden_size"].append(hidden)
        parameters = metrics.get("parameters", metrics.get("parameters_after", parameters))
        series["n_parts"].append(parts)
        series["parameters"].append(parameters)
        bpb = metrics.get("bpb", metrics.get("bpb_after"))
        if isinstance(bpb, (int, float)):
            bpb = {"held-out": float(bpb)}
        for domain, value in (bpb or {}).items():
            series["bpb"].setdefault(domain, []).append((event.event_id, value))
    return series


def plot_lineage(lineage, path: str | Path) -> Path:
    """Draw bits per byte per probe domain, parameters, hidden size and Part count over the events."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = lineage_series(lineage)
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for domain, points in sorted(series["bpb"].items()):
        xs, ys = zip(*points)
        top.plot(xs, ys, marker="o", label=domain)
    top.set_ylabel("bits per byte (held-out)")
    if series["bpb"]:
        top.legend()
    else:
        top.text(0.5, 0.5, "no bits per byte recorded in this lineage", ha="center", va="center",
                 transform=top.transAxes)
    top.grid(alpha=0.3)

    events = series["event"]
    parameters = [n if n is not None else float("nan") for n in series["parameters"]]
    middle.step(events, parameters, where="post", color="tab:green")
    middle.set_ylabel("parameters")
    middle.grid(alpha=0.3)
    hidden = [h if h is not None else float("nan") for h in series["hidden_size"]]
    parts = [p if p is not None else float("nan") for p in series["n_parts"]]
    bottom.step(events, hidden, where="post", label="hidden size", color="tab:blue")
    bottom.set_ylabel("hidden size")
    bottom.set_xlabel("lineage event")
    twin = bottom.twinx()
    twin.step(events, parts, where="post", label="Parts", color="tab:orange")
    twin.set_ylabel("Parts")
    lines = bottom.get_lines()[:1] + twin.get_lines()[:1]
    bottom.legend(lines, [line.get_label() for line in lines], loc="lower right")
    for x, kind in zip(events, series["kind"]):
        if kind in ("absorb", "grow", "compress", "rollback"):
            bottom.axvline(x, color="grey", alpha=0.2)
            bottom.text(x, bottom.get_ylim()[1], kind, rotation=90, fontsize=7, va="top")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
