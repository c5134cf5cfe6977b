"""Figures and text of a run: the KL-vs-bpw Pareto scatter of its episodes and the best recipe
as a Markdown table (TensorBoard renders both; ``pareto.png`` is the scatter)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qenv.io import atomic_path
from qenv.quant.rules import Rule
from qenv.training.episodes import finite_float


def recipe_markdown(best: Mapping[str, Any], layer_sizes: Mapping[str, tuple[int, int]] | None = None) -> str:
    """The best recipe as a Markdown table (TensorBoard's text plugin renders it)."""
    from qenv.quant.rules import layer_bits

    m = best.get("metrics", {})
    head = (f"**best reward {best['reward']:.4f}** on `{best.get('model', '')}` at step {best.get('t', 0)} "
            f"(episode {best.get('n', 0)}): KL {m.get('kl', float('nan')):.4g}, ppl {m.get('ppl', float('nan')):.4g}, "
            f"top-1 {m.get('top1', float('nan')):.3f}, {m.get('bpw', float('nan')):.3f} bpw, "
            f"{m.get('model_mb', float('nan')):.3f} MB (uniform reference KL {m.get('reference_kl', float('nan')):.4g})")
    lines = [head, "", "| layer | rule | bpw |", "|---|---|---|"]
    for name, data in best["rules"].items():
        rule = Rule.from_dict(data)
        bpw = ""
        if layer_sizes and name in layer_sizes:
            out_f, in_f = layer_sizes[name]
            bpw = f"{layer_bits(rule, out_f, in_f) / (out_f * in_f):.3f}"
        lines.append(f"| {name} | {rule.label()} | {bpw} |")
    return "\n".join(lines)


def pareto_figure(episodes: Sequence[Mapping[str, Any]], best: Mapping[str, Any] | None = None,
                  references: Mapping[str, Mapping[str, float]] | None = None, budget_bpw: float | None = None,
                  title: str = "episodes: KL vs bits per weight") -> Any:
    """A matplotlib figure: KL (log) vs bpw of every episode, coloured by reward."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.add_subplot()
    models = sorted({e.get("model", "") for e in episodes})
    markers = "os^DvP*X<>"
    rewards = [e["reward"] for e in episodes if finite_float(e.get("kl")) and finite_float(e.get("bpw")) is not None]
    vmin, vmax = (min(rewards), max(rewards)) if rewards else (0.0, 1.0)
    sc = None
    for k, model in enumerate(models):
        pts = [e for e in episodes if e.get("model", "") == model and (finite_float(e.get("kl")) or 0) > 0]
        if not pts:
            continue
        sc = ax.scatter([e["bpw"] for e in pts], [e["kl"] for e in pts], c=[e["reward"] for e in pts], cmap="viridis",
                        vmin=vmin, vmax=vmax, s=14, alpha=0.75, marker=markers[k % len(markers)],
                        label=model if len(models) > 1 else None)
    labels: list[tuple[float, float, str, str]] = []
    if references:
        for model, ref in references.items():
            if (finite_float(ref.get("kl")) or 0) > 0 and finite_float(ref.get("bpw")) is not None:
                ax.scatter([ref["bpw"]], [ref["kl"]], marker="x", color="tab:red", s=60, zorder=5)
                labels.append((ref["bpw"], ref["kl"],
                               f"uniform ref ({model})" if len(references) > 1 else "uniform RTN reference", "tab:red"))
    if best is not None and (finite_float(best.get("metrics", {}).get("kl")) or 0) > 0:
        m = best["metrics"]
        ax.scatter([m["bpw"]], [m["kl"]], marker="*", color="tab:orange", edgecolor="black", s=160, zorder=6,
                   label=f"best (reward {best['reward']:.3f})")
    if budget_bpw is not None:
        ax.axvline(budget_bpw, color="gray", linestyle="--", linewidth=1, label=f"budget {budget_bpw:g} bpw")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("KL(full precision || quantized)")
    ax.set_title(title, fontsize=10)
    if sc is not None:
        fig.colorbar(sc, ax=ax, label="episode reward")
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    star = best.get("metrics", {}) if best is not None else {}
    place_labels(ax, labels, fontsize=7,
                 avoid=[(star["bpw"], star["kl"])] if (finite_float(star.get("kl")) or 0) > 0 else [])
    return fig


def place_labels(ax: Any, labels: Sequence[tuple[float, float, str, str]], fontsize: float = 7,
                 avoid: Sequence[tuple[float, float]] = ()) -> list[Any]:
    """Annotate points ``(x, y, text, color)`` so that labels stay inside the axes and overlap
    neither each other, the legend nor the marked points (and the points in ``avoid``), where any
    free spot allows. Labels sit on a light box, readable over a dense scatter.

    Call it after the figure's layout is final (after ``tight_layout``): positions are measured
    in display space. Points at the same place get one label joined by " = ". Each label tries
    spots around its point, nearest first, and takes the first free one, else the least covered.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = ax.figure
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()
    merged: dict[tuple[float, float], list[Any]] = {}
    for x, y, text, color in labels:
        key = (round(float(x), 9), round(float(y), 12))
        if key in merged:
            merged[key][2] += f" = {text}"
        else:
            merged[key] = [float(x), float(y), text, color]
    frame = ax.get_window_extent(renderer)
    to_px = ax.transData.transform
    taken = []  # boxes (x0, y0, x1, y1) in pixels: the points themselves, the legend, placed labels
    marks = {}  # each labelled point's own box, which its label may touch
    for x, y in [(m[0], m[1]) for m in merged.values()] + [(float(a), float(b)) for a, b in avoid]:
        px, py = to_px((x, y))
        taken.append((px - 7, py - 7, px + 7, py + 7))
        marks.setdefault((x, y), taken[-1])
    legend = ax.get_legend()
    if legend is not None:
        box = legend.get_window_extent(renderer)
        taken.append((box.x0, box.y0, box.x1, box.y1))
    # (dx, dy) in points and the alignment that keeps the text on that side of the point
    spots = [(4, 3, "left", "bottom"), (-4, 3, "right", "bottom"), (4, -3, "left", "top"), (-4, -3, "right", "top"),
             (0, 6, "center", "bottom"), (0, -6, "center", "top"), (6, 12, "left", "bottom"),
             (-6, 12, "right", "bottom"), (6, -12, "left", "top"), (-6, -12, "right", "top"),
             (0, 18, "center", "bottom"), (0, -18, "center", "top")]

    def overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        return w * h if w > 0 and h > 0 else 0.0

    placed = []
    for x, y, text, color in sorted(merged.values(), key=lambda m: (m[0], m[1])):
        ann = ax.annotate(text, (x, y), fontsize=fontsize, color=color, textcoords="offset points",
                          xytext=spots[0][:2], ha=spots[0][2], va=spots[0][3], annotation_clip=False, zorder=7,
                          bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})
        ann.set_in_layout(False)
        best, best_cost = None, None
        for dx, dy, ha, va in spots:
            ann.set_position((dx, dy))
            ann.set_ha(ha)
            ann.set_va(va)
            b = ann.get_window_extent(renderer)
            box = (b.x0, b.y0, b.x1, b.y1)
            outside = (max(0.0, frame.x0 - b.x0) + max(0.0, b.x1 - frame.x1)) * b.height + \
                (max(0.0, frame.y0 - b.y0) + max(0.0, b.y1 - frame.y1)) * b.width
            own = marks.get((x, y))
            cost = outside * 10 + sum(overlap(box, t) for t in taken if t is not own)
            if best_cost is None or cost < best_cost:
                best, best_cost = (dx, dy, ha, va, box), cost
            if cost == 0:
                break
        dx, dy, ha, va, box = best
        ann.set_position((dx, dy))
        ann.set_ha(ha)
        ann.set_va(va)
        taken.append(box)
        placed.append(ann)
    return placed


def save_figure(fig: Any, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
