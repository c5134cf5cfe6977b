"""Training bookkeeping: episode records, TensorBoard logging and atomic checkpoints.

Everything logged here comes from the environment's terminal ``info`` of each episode, i.e.
from the evaluator: reward, KL, perplexity, top-1, bits per weight, model size, the number of
actions the hard budget lowered, and the recipe itself.

- :class:`EpisodeTracker` keeps one small record per episode and the best-reward recipe (also
  per model); its state round-trips through JSON so a resumed run continues the same history.
- :class:`TBLogger` writes to a TensorBoard ``SummaryWriter`` (normally the one of the SB3
  logger): per-episode scalars, a histogram of bits per layer, the best recipe as text,
  hyperparameters (HParams) and a Pareto scatter image (KL vs bpw of the episodes so far).
- :class:`QuantEpisodeCallback` feeds both from SB3's ``infos``, :class:`AtomicCheckpointCallback`
  saves checkpoints at rollout boundaries, :class:`TqdmProgressCallback` draws the progress bar,
  :class:`DeterministicEvalCallback` evaluates the deterministic policy as it trains and keeps the best.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qenv.io import atomic_path, write_json_atomic
from qenv.signals import stop_signals_deferred
from qenv.quant.rules import Recipe, Rule

#: terminal-info keys copied into each episode record
EPISODE_KEYS: tuple[str, ...] = ("kl", "ppl", "top1", "bpw", "model_mb", "clamped_actions", "fidelity_reward",
                                  "budget_bpw")
#: terminal-info keys kept with the best recipe
BEST_KEYS: tuple[str, ...] = (
    "kl", "ppl", "top1", "bpw", "model_bytes", "model_mb", "clamped_actions", "fidelity_reward", "budget_bpw",
    "reference_kl", "reference_ppl", "reference_top1", "reference",
)
CHECKPOINT_RE = re.compile(r"step_(\d+)\.zip")  # matched with fullmatch ("$" passes a final newline)

try:  # SB3 is a dependency; keep the module importable for the plain tracker without it
    from stable_baselines3.common.callbacks import BaseCallback
except ImportError:  # pragma: no cover
    BaseCallback = object  # type: ignore[misc,assignment]


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def is_terminal_info(info: Mapping[str, Any]) -> bool:
    return "recipe_rules" in info and "kl" in info


class EpisodeTracker:
    """Episode records and the best-reward recipe seen so far (overall and per model).

    With ``budget_bpw``, only episodes at that budget can be the best (an env with ``budgets``
    samples others, whose rewards are measured against other references and whose recipes are
    other sizes); every episode is still recorded.
    """

    def __init__(self, budget_bpw: float | None = None) -> None:
        self.budget_bpw = budget_bpw
        self.episodes: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.best_by_model: dict[str, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.episodes)

    def add(self, info: Mapping[str, Any], reward: float, timestep: int) -> tuple[dict[str, Any], bool]:
        """Record a finished episode; returns the record and whether it is the new overall best."""
        record: dict[str, Any] = {"n": len(self.episodes) + 1, "t": int(timestep), "model": str(info.get("model", "")),
                                  "reward": float(reward)}
        for key in EPISODE_KEYS:
            if key in info:
                record[key] = _float(info[key]) if key != "clamped_actions" else int(info[key])
        self.episodes.append(record)
        full = {**record, "metrics": {k: info[k] for k in BEST_KEYS if k in info},
                "rules": {name: dict(rule) for name, rule in info["recipe_rules"].items()}}
        budget = info.get("budget_bpw")
        if self.budget_bpw is not None and budget is not None and abs(float(budget) - self.budget_bpw) > 1e-9:
            return record, False
        model_best = self.best_by_model.get(record["model"])
        if model_best is None or reward > model_best["reward"]:
            self.best_by_model[record["model"]] = full
        is_best = self.best is None or reward > self.best["reward"]
        if is_best:
            self.best = full
        return record, is_best

    def best_recipe(self) -> Recipe | None:
        return None if self.best is None else Recipe({n: Rule.from_dict(r) for n, r in self.best["rules"].items()})

    def mean_reward(self, first: bool, fraction: float = 0.1, minimum: int = 5) -> float | None:
        """Mean episode reward of the first (or last) ``fraction`` of episodes (at least ``minimum``)."""
        if not self.episodes:
            return None
        n = max(minimum, int(len(self.episodes) * fraction))
        chosen = self.episodes[:n] if first else self.episodes[-n:]
        return float(np.mean([e["reward"] for e in chosen]))

    def write_best(self, path: str | Path, **extra: Any) -> Path | None:
        """``best_recipe.json``: the rules (loadable with ``Recipe.load``), metrics and where it was found."""
        if self.best is None:
            return None
        recipe = self.best_recipe()
        assert recipe is not None
        best = self.best
        by_model = {m: {"reward": b["reward"], "timestep": b["t"], "episode": b["n"], "metrics": b["metrics"],
                        "rules": b["rules"]} for m, b in self.best_by_model.items()}
        return recipe.save(path, model=best["model"], reward=best["reward"], timestep=best["t"], episode=best["n"],
                           metrics=best["metrics"], by_model=by_model, **extra)

    def state_dict(self) -> dict[str, Any]:
        return {"episodes": self.episodes, "best": self.best, "best_by_model": self.best_by_model}

    def truncate(self, timestep: int) -> int:
        """Forget the episodes that ended after ``timestep``; returns how many.

        An interrupted on-policy run is rewound to its last whole rollout and resumed from there, so
        the episodes of the partial rollout are played again: kept, they would be counted twice.
        The best recipe stays even if one of them found it: it was measured, and is still the best.
        """
        kept = [e for e in self.episodes if int(e["t"]) <= int(timestep)]
        dropped = len(self.episodes) - len(kept)
        self.episodes = kept
        return dropped

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.episodes = list(state.get("episodes", []))
        self.best = state.get("best")
        self.best_by_model = dict(state.get("best_by_model", {}))


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
    rewards = [e["reward"] for e in episodes if _float(e.get("kl")) and _float(e.get("bpw")) is not None]
    vmin, vmax = (min(rewards), max(rewards)) if rewards else (0.0, 1.0)
    sc = None
    for k, model in enumerate(models):
        pts = [e for e in episodes if e.get("model", "") == model and (_float(e.get("kl")) or 0) > 0]
        if not pts:
            continue
        sc = ax.scatter([e["bpw"] for e in pts], [e["kl"] for e in pts], c=[e["reward"] for e in pts], cmap="viridis",
                        vmin=vmin, vmax=vmax, s=14, alpha=0.75, marker=markers[k % len(markers)],
                        label=model if len(models) > 1 else None)
    labels: list[tuple[float, float, str, str]] = []
    if references:
        for model, ref in references.items():
            if (_float(ref.get("kl")) or 0) > 0 and _float(ref.get("bpw")) is not None:
                ax.scatter([ref["bpw"]], [ref["kl"]], marker="x", color="tab:red", s=60, zorder=5)
                labels.append((ref["bpw"], ref["kl"],
                               f"uniform ref ({model})" if len(references) > 1 else "uniform RTN reference", "tab:red"))
    if best is not None and (_float(best.get("metrics", {}).get("kl")) or 0) > 0:
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
                 avoid=[(star["bpw"], star["kl"])] if (_float(star.get("kl")) or 0) > 0 else [])
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


def _hparam_value(value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, int, float, str)):
        return value
    if value is None:
        return "None"
    if isinstance(value, type):
        return value.__name__
    return str(value)


class TBLogger:
    """Writes training records to a TensorBoard ``SummaryWriter``: every episode under ``episode/``,
    and with several models (budgets) also under ``episode/<model>/`` (``episode/budget_<b>/``), since
    one curve over episodes of different models or sizes mixes their scales."""

    def __init__(self, writer: Any, multi_model: bool = False, multi_budget: bool = False) -> None:
        self.writer = writer
        self.multi_model = multi_model
        self.multi_budget = multi_budget

    def episode(self, record: Mapping[str, Any], info: Mapping[str, Any]) -> None:
        step = int(record["t"])
        w = self.writer
        prefixes = ["episode"] + ([f"episode/{record['model']}"] if self.multi_model and record.get("model") else [])
        if self.multi_budget and record.get("budget_bpw") is not None:
            prefixes.append(f"episode/budget_{record['budget_bpw']:g}")
        for prefix in prefixes:
            w.add_scalar(f"{prefix}/reward", record["reward"], step)
            for key, tag in (("kl", "kl"), ("ppl", "perplexity"), ("top1", "top1"), ("bpw", "bpw"),
                             ("model_mb", "model_mb"), ("clamped_actions", "clamped_actions"),
                             ("fidelity_reward", "fidelity_reward")):
                if record.get(key) is not None:
                    w.add_scalar(f"{prefix}/{tag}", record[key], step)
        rules = info.get("recipe_rules", {})
        if rules:
            bits = np.array([float(r.get("bits", 16)) for r in rules.values()], dtype=np.float64)
            w.add_histogram("recipe/bits_per_layer", bits, step, bins=np.arange(1.5, 17.5, 1.0))

    def best_text(self, best: Mapping[str, Any], layer_sizes: Mapping[str, tuple[int, int]] | None = None) -> None:
        self.writer.add_text("recipe/best", recipe_markdown(best, layer_sizes), int(best.get("t", 0)))

    def hparams(self, hparam_dict: Mapping[str, Any], metric_dict: Mapping[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams

        clean = {k: _hparam_value(v) for k, v in hparam_dict.items()}
        experiment, start, end = hparams(clean, metric_dict=dict(metric_dict))
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(start)
        self.writer.file_writer.add_summary(end)

    def figure(self, tag: str, fig: Any, step: int) -> None:
        self.writer.add_figure(tag, fig, int(step), close=False)

    def flush(self) -> None:
        self.writer.flush()


def purge_tensorboard(writer: Any, step: int) -> None:
    """Tell TensorBoard to drop what earlier sessions logged at ``step`` and after.

    A resumed run starts again from its checkpoint: whatever the interrupted (or killed) session
    logged after it is replaced by what the resumed one logs, instead of both showing and the curves
    jumping back. This is what ``SummaryWriter(purge_step=...)`` writes: a session-start event at
    ``step``, on which TensorBoard discards earlier events at that step or later.
    """
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    writer.file_writer.add_event(Event(step=int(step), file_version="brain.Event:2"))
    writer.file_writer.add_event(Event(step=int(step), session_log=SessionLog(status=SessionLog.START)))
    writer.flush()


def wait_past_event_files(folder: str | Path) -> None:
    """Wait (at most a second) until a new TensorBoard event file would sort after every one in ``folder``.

    TensorBoard reads a run's event files in name order, and a name starts with its creation time
    in whole seconds (then host and PID): a resumed session that starts in the same second as the
    session it continues could be read first, and its purge of that session's later steps lost.
    """
    stamps = [int(part) for p in Path(folder).rglob("events.out.tfevents.*")
              if len(parts := p.name.split(".")) > 3 and (part := parts[3]).isdigit()]
    newest = max(stamps, default=0)
    while int(time.time()) <= newest:
        time.sleep(0.02)


def sb3_tensorboard_writer(logger: Any) -> Any | None:
    """The ``SummaryWriter`` of an SB3 logger's TensorBoard output, if it has one."""
    from stable_baselines3.common.logger import TensorBoardOutputFormat

    for fmt in getattr(logger, "output_formats", []):
        if isinstance(fmt, TensorBoardOutputFormat):
            return fmt.writer
    return None


class QuantEpisodeCallback(BaseCallback):
    """Records every finished episode (from the vec env's ``infos``) and logs it to TensorBoard.

    Args:
        tracker: where episodes and the best recipe are kept.
        best_path: ``best_recipe.json``, rewritten (atomically) whenever the best improves.
        hparams: logged once as TensorBoard HParams at the start of training.
        layer_sizes: ``{layer: (out, in)}`` for the bpw column of the best-recipe text.
        best_extra: extra fields stored in ``best_recipe.json``.
        multi_model, multi_budget: also log each model's (budget's) episodes under its own tags.
    """

    def __init__(self, tracker: EpisodeTracker, best_path: str | Path | None = None,
                 hparams: Mapping[str, Any] | None = None, layer_sizes: Mapping[str, tuple[int, int]] | None = None,
                 multi_model: bool = False, best_extra: Mapping[str, Any] | None = None, multi_budget: bool = False,
                 purge_step: int | None = None, verbose: int = 0) -> None:
        super().__init__(verbose)
        self.purge_step = purge_step
        self.tracker = tracker
        self.best_path = None if best_path is None else Path(best_path)
        self.hparam_dict = dict(hparams or {})
        self.layer_sizes = dict(layer_sizes or {})
        self.multi_model = multi_model
        self.multi_budget = multi_budget
        self.best_extra = dict(best_extra or {})
        self.tb: TBLogger | None = None
        self._returns: np.ndarray | None = None

    def _on_training_start(self) -> None:
        writer = sb3_tensorboard_writer(self.logger)
        self.tb = None if writer is None else TBLogger(writer, self.multi_model, self.multi_budget)
        if writer is not None and self.purge_step is not None:
            purge_tensorboard(writer, self.purge_step)
        self._returns = np.zeros(self.training_env.num_envs, dtype=np.float64)
        if self.tb is not None and self.hparam_dict:
            from stable_baselines3.common.logger import HParam

            metrics = {"episode/reward": 0.0, "episode/kl": 0.0, "episode/bpw": 0.0}
            self.logger.record("hparams", HParam({k: _hparam_value(v) for k, v in self.hparam_dict.items()}, metrics),
                               exclude=("stdout", "log", "json", "csv"))
            self.logger.dump(self.num_timesteps)

    def _on_step(self) -> bool:
        rewards = np.asarray(self.locals.get("rewards", []), dtype=np.float64).reshape(-1)
        dones = np.asarray(self.locals.get("dones", []), dtype=bool).reshape(-1)
        infos = self.locals.get("infos", [])
        if self._returns is None or self._returns.shape[0] != rewards.shape[0]:
            self._returns = np.zeros(rewards.shape[0], dtype=np.float64)
        self._returns += rewards
        for i in np.flatnonzero(dones):
            info = infos[i] if i < len(infos) else {}
            total = float(self._returns[i])
            self._returns[i] = 0.0
            if not is_terminal_info(info):
                continue
            if isinstance(info.get("episode"), Mapping) and "r" in info["episode"]:
                total = float(info["episode"]["r"])  # Monitor's return: raw rewards, whatever wraps the env
            self.record(info, total, self.num_timesteps)
        return True

    def record(self, info: Mapping[str, Any], reward: float, timestep: int) -> None:
        record, is_best = self.tracker.add(info, reward, timestep)
        if self.tb is not None:
            self.tb.episode(record, info)
        if is_best:
            if self.tb is not None and self.tracker.best is not None:
                self.tb.best_text(self.tracker.best, self.layer_sizes)
            if self.best_path is not None:
                self.tracker.write_best(self.best_path, **self.best_extra)


class AtomicCheckpointCallback(BaseCallback):
    """Calls ``save(num_timesteps)`` every ``save_freq`` timesteps, at the start of a rollout.

    At a rollout's start the policy holds every update so far and, for on-policy algorithms,
    ``num_timesteps`` is a whole number of rollouts, so a resumed run ends on the same total.
    ``last_rollout_start`` is where an interrupted on-policy run can be rewound to (the partial
    rollout is lost anyway: on-policy algorithms only learn from complete rollouts).
    """

    def __init__(self, save_freq: int, save: Callable[[int], Any], verbose: int = 0) -> None:
        super().__init__(verbose)
        self.save_freq = max(1, int(save_freq))
        self.save = save
        self.last_saved: int | None = None
        self.last_rollout_start: int | None = None

    def _on_training_start(self) -> None:
        if self.last_saved is None:
            self.last_saved = self.num_timesteps

    def _on_rollout_start(self) -> None:
        self.last_rollout_start = self.num_timesteps
        if self.last_saved is not None and self.num_timesteps - self.last_saved >= self.save_freq:
            self.save(self.num_timesteps)
            self.last_saved = self.num_timesteps

    def _on_step(self) -> bool:
        return True


class DeterministicEvalCallback(BaseCallback):
    """SB3's ``EvalCallback`` for qenv's deterministic environment: one deterministic episode of
    the current policy on each of the eval env's ``n_models`` models (``reset(options={"model_index":
    i})``) at the first rollout start at or after each multiple of ``eval_freq`` timesteps, and at
    the end of training when a multiple falls there (the policy only changes between rollouts, so
    at most one evaluation per rollout); the policy with the best mean episode return is kept.

    Why not SB3's own: its ``n_eval_episodes`` reset a multi-model env to randomly drawn models,
    while here one episode per model is the exact score (the env is deterministic); and the best
    evaluation's recipes (the terminal ``info`` of each episode) are kept, not only its return.
    As SB3 and rl-zoo3 do, the best policy goes to ``<best_model_save_path>/best_model.zip`` and
    the evaluations to ``<log_path>/evaluations.npz`` (``timesteps``, ``results``, ``ep_lengths``),
    ``eval/mean_reward`` and ``eval/mean_kl`` to the logger. A policy trained on ``VecNormalize``d
    observations is asked with the training env's statistics (``normalize_obs``; ``on_new_best``
    can save them beside ``best_model.zip``, as train_agent.py does). Each evaluation
    plays ``n_models`` episodes more than training does: count them in any equal-evaluation
    comparison.
    """

    def __init__(self, eval_env: Any, eval_freq: int, n_models: int = 1, best_model_save_path: str | Path | None = None,
                 log_path: str | Path | None = None, on_new_best: Callable[[], Any] | None = None,
                 verbose: int = 0) -> None:
        super().__init__(verbose)
        if int(eval_freq) < 1 or int(n_models) < 1:
            raise ValueError(f"eval_freq ({eval_freq}) and n_models ({n_models}) must be positive")
        self.eval_env = eval_env
        self.eval_freq = int(eval_freq)
        self.n_models = int(n_models)
        self.best_model_save_path = Path(best_model_save_path) if best_model_save_path is not None else None
        self.log_path = Path(log_path) if log_path is not None else None
        self.on_new_best = on_new_best  # e.g. the VecNormalize statistics saved beside best_model.zip
        self.next_eval: int | None = None
        self.evaluations: list[dict[str, Any]] = []
        #: the best evaluation: timesteps, mean_reward and each model's terminal info (with its recipe)
        self.best: dict[str, Any] | None = None

    def _on_training_start(self) -> None:
        if self.next_eval is None:
            self.next_eval = (self.num_timesteps // self.eval_freq + 1) * self.eval_freq

    def _due(self) -> None:
        # asked where the policy holds every update so far: at a rollout's start and at the end
        # (SB3's EvalCallback asks mid-rollout, before the last rollout's update)
        assert self.next_eval is not None
        if self.num_timesteps >= self.next_eval:
            self.next_eval = (self.num_timesteps // self.eval_freq + 1) * self.eval_freq
            self.evaluate()

    def _on_rollout_start(self) -> None:
        self._due()

    def _on_training_end(self) -> None:
        self._due()

    def _on_step(self) -> bool:
        return True

    def _predictor(self) -> Any:
        """The policy as ``rollout_recipe`` asks it: masks passed where the algorithm takes them,
        observations normalised where training normalised them."""
        import inspect

        from stable_baselines3.common.vec_env import VecNormalize, unwrap_vec_wrapper

        model = self.model
        vec = unwrap_vec_wrapper(model.get_env(), VecNormalize) if model.get_env() is not None else None
        if vec is None:
            return model
        takes_masks = "action_masks" in inspect.signature(model.predict).parameters

        class Normalized:
            def predict(self, observation: Any, state: Any = None, episode_start: Any = None,
                        deterministic: bool = True, action_masks: Any = None) -> tuple[np.ndarray, Any]:
                extra = {"action_masks": action_masks} if takes_masks and action_masks is not None else {}
                return model.predict(vec.normalize_obs(observation), state=state, episode_start=episode_start,
                                     deterministic=deterministic, **extra)
        return Normalized()

    def write_log(self) -> None:
        """``<log_path>/evaluations.npz`` in SB3's layout (rl-zoo3's plotting scripts read it)."""
        if self.log_path is None:
            return
        with atomic_path(self.log_path / "evaluations.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, timesteps=np.array([e["timesteps"] for e in self.evaluations], dtype=np.int64),
                         results=np.array([e["returns"] for e in self.evaluations], dtype=np.float64),
                         ep_lengths=np.array([e["lengths"] for e in self.evaluations], dtype=np.int64))

    def evaluate(self) -> dict[str, Any]:
        """One deterministic episode per model now; returns this evaluation's record."""
        from qenv.envs.episodes import rollout_recipe

        predictor = self._predictor()
        infos = []
        for i in range(self.n_models):
            options = {"model_index": i} if self.n_models > 1 else None
            infos.append(rollout_recipe(predictor, self.eval_env, deterministic=True, reset_options=options)[1])
        returns = [float(info["episode_return"]) for info in infos]
        record = {"timesteps": int(self.num_timesteps), "mean_reward": float(np.mean(returns)), "returns": returns,
                  "kl": [_float(info.get("kl")) for info in infos], "bpw": [_float(info.get("bpw")) for info in infos],
                  "lengths": [len(info.get("recipe") or {}) for info in infos]}
        self.evaluations.append(record)
        self.logger.record("eval/mean_reward", record["mean_reward"])
        kls = [k for k in record["kl"] if k is not None]
        if kls:
            self.logger.record("eval/mean_kl", float(np.mean(kls)))
        self.logger.dump(self.num_timesteps)  # as SB3's EvalCallback: now, at this step (the last one too)
        self.write_log()
        if self.best is None or record["mean_reward"] > self.best["mean_reward"]:
            self.best = {"timesteps": record["timesteps"], "mean_reward": record["mean_reward"], "infos": infos}
            if self.best_model_save_path is not None:
                self.best_model_save_path.mkdir(parents=True, exist_ok=True)
                save_agent_atomic(self.model, self.best_model_save_path / "best_model.zip")
            if self.on_new_best is not None:
                self.on_new_best()
            if self.verbose:
                print(f"eval at {record['timesteps']} timesteps: new best mean reward {record['mean_reward']:+.4f}")
        return record


class TqdmProgressCallback(BaseCallback):
    """A progress bar over the whole run (starts at the resumed step count): :func:`qenv.progress.progress_bar`."""

    def __init__(self, total: int, initial: int = 0, desc: str = "training", disable: bool = False) -> None:
        super().__init__(0)
        self.total, self.initial, self.desc, self.disable = int(total), int(initial), desc, disable
        self.bar: Any = None

    def _on_training_start(self) -> None:
        from qenv.progress import progress_bar

        # a tqdm bar on a terminal; a line per tenth of the run in a log (no carriage returns)
        self.bar = progress_bar(self.total, self.desc, "step", initial=self.initial, show=not self.disable)

    def _on_step(self) -> bool:
        if self.bar is not None:
            self.bar.update(self.model.num_timesteps - self.bar.n)
        return True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _on_training_end(self) -> None:
        self.close()


# -- checkpoints ------------------------------------------------------------------------------------
def save_agent_atomic(agent: Any, path: str | Path) -> Path:
    """``agent.save`` into a temporary file beside ``path``, then rename it onto ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        written = agent.save(tmp)
        if tmp.stat().st_size == 0 and written is not None and Path(written).is_file() and Path(written) != tmp:
            Path(written).replace(tmp)  # an agent that insisted on its own suffix
    return path


def checkpoint_paths(folder: str | Path, step: int) -> tuple[Path, Path]:
    folder = Path(folder)
    return folder / f"step_{int(step):010d}.zip", folder / f"step_{int(step):010d}.json"


def write_checkpoint(folder: str | Path, agent: Any, step: int, state: Mapping[str, Any]) -> Path:
    """The agent as ``step_<N>.zip`` and the run state as ``step_<N>.json`` (written last: it marks
    the checkpoint complete)."""
    model_path, state_path = checkpoint_paths(folder, step)
    save_agent_atomic(agent, model_path)
    write_json_atomic(state_path, {**state, "num_timesteps": int(step)})
    return model_path


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (``keep`` <= 0: keep all)."""
    folder = Path(folder)
    if keep <= 0 or not folder.is_dir():
        return
    steps = sorted(int(m.group(1)) for p in folder.iterdir() if (m := CHECKPOINT_RE.fullmatch(p.name)))
    complete = [s for s in steps if checkpoint_paths(folder, s)[1].is_file()]
    for step in complete[:-keep]:
        model, state = checkpoint_paths(folder, step)
        state.unlink(missing_ok=True)  # first: the state marks the pair complete
        model.unlink(missing_ok=True)
        for extra in Path(folder).glob(f"step_{int(step):010d}.best_model.*"):
            extra.unlink(missing_ok=True)


def best_model_copy(folder: str | Path, step: int, name: str = "best_model.zip") -> Path:
    """Where a checkpoint keeps the run's ``best_model.zip`` of that moment (and, by ``name``, the
    statistics beside it; ``--eval-freq``), so that a resumed run's best model is the one its
    restored evaluations describe."""
    return Path(folder) / f"step_{int(step):010d}.{name}"


def latest_checkpoint(folder: str | Path) -> tuple[int, Path, Path] | None:
    """``(step, model, state)`` of the newest complete checkpoint in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_RE.fullmatch(path.name)
        if match:
            step = int(match.group(1))
            state = checkpoint_paths(folder, step)[1]
            if state.is_file():
                found.append((step, path, state))
    return max(found) if found else None


def sigint_deferred() -> Any:
    """Hold Ctrl-C and SIGTERM back while files are being saved; see :func:`qenv.signals.stop_signals_deferred`."""
    return stop_signals_deferred()


class Stopwatch:
    """Wall time of this session plus what earlier sessions of a resumed run took."""

    def __init__(self, before: float = 0.0) -> None:
        self.before = float(before)
        self.start = time.perf_counter()

    @property
    def total(self) -> float:
        return self.before + time.perf_counter() - self.start


try:
    import gymnasium as _gym

    _Wrapper = _gym.Wrapper
except ImportError:  # pragma: no cover
    _Wrapper = object  # type: ignore[misc,assignment]


class EpisodeRecorder(_Wrapper):
    """A wrapper that reports every finished episode: ``on_episode(info, return, length)``.

    For agents that step a single environment themselves (searchers, plug-ins), so their
    episodes reach the same tracker and TensorBoard logging as an SB3 agent's.
    """

    def __init__(self, env: Any, on_episode: Callable[[dict[str, Any], float, int], Any] | None = None) -> None:
        super().__init__(env)
        self.on_episode = on_episode
        self._return = 0.0
        self._length = 0

    def reset(self, **kwargs: Any) -> Any:
        self._return, self._length = 0.0, 0
        return self.env.reset(**kwargs)

    def step(self, action: Any) -> Any:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._return += float(reward)
        self._length += 1
        if (terminated or truncated) and self.on_episode is not None and is_terminal_info(info):
            self.on_episode(info, self._return, self._length)
        return obs, reward, terminated, truncated, info


def report_scored_episode(env: Any, info: dict[str, Any], reward: float, length: int) -> None:
    """Tell the :class:`EpisodeRecorder` wrapping ``env`` (if any) about a recipe that was scored without
    stepping the env (``score_recipe``: e.g. a llama.cpp mix, whose rules the action space cannot
    express), so that it reaches the same tracker, TensorBoard and ``best_recipe.json`` as played ones."""
    layer = env
    while layer is not None:
        if isinstance(layer, EpisodeRecorder):
            if layer.on_episode is not None:
                layer.on_episode(info, float(reward), int(length))
            return
        layer = getattr(layer, "env", None)
