"""Pictures of a recipe: the env's ``render()`` (a text table for ``ansi``, a bar chart for
``rgb_array``), usable on any recipe without an env."""

from __future__ import annotations

import numpy as np

from qenv.eval.evaluator import Metrics
from qenv.models.layers import LayerInfo
from qenv.quant.accounting import rule_bpw, rule_text
from qenv.quant.rules import Rule


def recipe_table(layers: list[LayerInfo], recipe: dict[str, Rule], metrics: Metrics | None = None) -> str:
    """A plain-text table of a (possibly partial) recipe."""
    rows = [("layer", "kind", "block", "rule", "bpw")]
    for info in layers:
        rule = recipe.get(info.name)
        bpw = "" if rule is None else f"{rule_bpw(rule, info):.3f}"
        rows.append((info.name, info.kind, str(info.block), "-" if rule is None else rule_text(rule, info), bpw))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if metrics is not None:
        lines.append(f"bpw {metrics.bpw:.3f}  size {metrics.model_mb:.3f} MB  KL {metrics.kl:.4g}  "
                     f"ppl {metrics.ppl:.3f}  top1 {metrics.top1:.3f}")
    return "\n".join(lines) + "\n"


def recipe_image(layers: list[LayerInfo], recipe: dict[str, Rule], budget_bpw: float) -> np.ndarray:
    """Bits per weight of each decided layer as a bar chart, ``[H, W, 3]`` uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 2.5), dpi=80)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values = [rule_bpw(recipe[i.name], i) if i.name in recipe else 0.0
              for i in layers]
    ax.bar(range(len(layers)), values, color="tab:blue")
    ax.axhline(budget_bpw, color="tab:red", linestyle="--", linewidth=1)
    ax.set_xlabel("layer")
    ax.set_ylabel("bits / weight")
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
