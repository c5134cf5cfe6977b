"""What a first run shows: plug-in names in the eval table, evaluation counts, TensorBoard hparams
of plug-ins, Pareto labels that neither overlap nor leave the axes, and ``python -m qenv cache``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script, run_main

SMALL_ENV = ["--env-kwargs", "n_tokens=512", "seq_len=64", "--n-tokens", "512"]

LAZY = '''\
"""A heuristic plug-in that plays no episode in learn()."""
import json
from pathlib import Path


class LazyAgent:
    action_kinds = ("discrete",)

    def __init__(self, env, seed=0):
        self.env, self.seed = env, seed

    def learn(self, total_timesteps, callback=None, progress_bar=False):
        return self

    def predict(self, observation, state=None, episode_start=None, deterministic=True):
        return 0, state

    def save(self, path):
        Path(path).write_text(json.dumps({"seed": self.seed}))

    @classmethod
    def load(cls, path, env=None):
        return cls(env, **json.loads(Path(path).read_text()))
'''


@pytest.fixture(scope="module")
def lazy_run(stories_bin, cache_dir, tmp_path_factory):
    """train_agent.py with a plug-in given by file path, which runs 0 steps."""
    folder = tmp_path_factory.mktemp("lazy")
    plugin = folder / "lazy_agent.py"
    plugin.write_text(LAZY)
    agent = f"{plugin}:LazyAgent"
    code = run_main(load_script("train_agent"), ["--agent", agent, "--model", stories_bin, "--timesteps", 350,
                                                 "--logdir", folder / "runs", "--name", "lazy", "--no-progress",
                                                 "--env-kwargs", "n_tokens=512", "seq_len=64"])
    assert code == 0
    return folder / "runs" / "lazy", agent


@pytest.mark.slow  # extended tier: a training run and an evaluation
def test_plugin_hparams_show_the_steps_it_ran(lazy_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run, _ = lazy_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["timesteps"] == 0 and summary["total_timesteps"] == 350
    acc = EventAccumulator(str(run / "tb" / "run_1"), size_guidance={"tensors": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    values = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert values["total_timesteps"].number_value == 0  # what it ran, not the 350 it was granted
    assert values["granted_timesteps"].number_value == 350


@pytest.mark.slow  # extended tier: a training run and an evaluation
def test_eval_table_names_the_plugin_class_and_counts_evaluations(lazy_run, capsys):
    run, agent = lazy_run
    out = run / "eval"
    code = run_main(load_script("eval_agent"), ["--policy", run / "model.zip", "--agent", agent, "--no-progress",
                                                "--searchers", "greedy,random", "--search-evals", 2, "--out", out,
                                                *SMALL_ENV])
    assert code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    policy = next(line for line in lines if "policy (" in line)
    assert policy.split()[:2] == ["policy", "(LazyAgent)"] and str(run.parent) not in policy
    greedy = next(line for line in lines if line.strip().startswith("greedy"))
    # two evaluations granted: greedy's plan, then the next candidate of the best start
    assert greedy.rstrip().endswith("2 evaluations")
    random_row = next(line for line in lines if line.strip().startswith("random"))
    assert random_row.rstrip().endswith("2 evaluations")
    results = json.loads((out / "results.json").read_text())
    assert results["agent"] == agent  # the full path stays in the files, for reloading


def test_evaluations_note_and_short_name():
    eval_agent = load_script("eval_agent")
    assert eval_agent.evaluations_note(1) == "1 evaluation"
    assert eval_agent.evaluations_note(8, 16) == "8 evaluations + 16 screenings"
    assert eval_agent.evaluations_note(2, 1) == "2 evaluations + 1 screening"
    assert eval_agent.evaluations_note(None) == ""
    assert eval_agent.short_agent_name("ppo") == "ppo"
    assert eval_agent.short_agent_name("/a/b/depth_agent.py:DepthAgent") == "DepthAgent"
    assert eval_agent.short_agent_name("mypkg.mod:Thing") == "Thing"


def _boxes(anns, renderer):
    return [a.get_window_extent(renderer) for a in anns]


def test_labels_do_not_overlap_and_stay_inside():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from qenv.callbacks import place_labels

    fig = Figure(figsize=(6.4, 4.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # the eval table's crowded spots: three presets at one bpw, a searcher on a preset, points at the edges
    pts = [(2.264, 3.0, "awq-w2"), (2.264, 4.7, "gptq-w2"), (2.264, 4.9, "rtn-w2"), (2.999, 1.70, "greedy"),
           (3.0, 1.59, "evolution"), (2.987, 1.38, "policy (ppo)"), (3.278, 0.54, "awq-w3"),
           (3.278, 0.59, "gptq-w3"), (3.962, 0.4493, "llamacpp"), (3.962, 0.4493, "q3_k_m"),
           (4.857, 0.0656, "q4_k_m")]
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    ax.set_yscale("log")
    fig.tight_layout()
    anns = place_labels(ax, [(x, y, t, "black") for x, y, t in pts], fontsize=6)
    renderer = fig.canvas.get_renderer()
    boxes = _boxes(anns, renderer)
    assert len(anns) == len(pts) - 1  # the two methods at one point share a label
    assert any(a.get_text() in ("llamacpp = q3_k_m", "q3_k_m = llamacpp") for a in anns)
    frame = ax.get_window_extent(renderer)
    for i, a in enumerate(boxes):
        assert frame.x0 - 0.5 <= a.x0 and a.x1 <= frame.x1 + 0.5 and frame.y0 - 0.5 <= a.y0 and a.y1 <= frame.y1 + 0.5
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)


def test_reference_label_of_the_training_plot_is_not_clipped():
    from qenv.callbacks import pareto_figure

    episodes = [{"model": "m", "bpw": 2.9 + 0.1 * k / 50, "kl": 1.0 + k / 50, "reward": k / 50 - 0.5}
                for k in range(51)]
    best = {"reward": 0.3, "metrics": {"bpw": 2.994, "kl": 1.05}}
    fig = pareto_figure(episodes, best=best, references={"m": {"bpw": 3.0, "kl": 1.43}}, budget_bpw=3.0)
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    label = next(t for t in ax.texts if t.get_text() == "uniform RTN reference")
    box, frame = label.get_window_extent(renderer), ax.get_window_extent(renderer)
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1


def test_cache_info_and_clear(tmp_path, monkeypatch, capsys):
    from qenv.__main__ import main

    monkeypatch.setenv("QENV_CACHE_DIR", str(tmp_path))
    key = "0123456789abcdef"
    (tmp_path / f"reference-v2-{key}-89abcdef-{key}-b8x8-n01234567.safetensors").write_bytes(b"x" * 3000)
    (tmp_path / f"tokens-{key}-s0-n512-l64-n01234567.safetensors").write_bytes(b"x" * 100)
    (tmp_path / f"features-v1-{key}.npy").write_bytes(b"x" * 10)
    (tmp_path / f"presets-v1-{key}abcd.safetensors").write_bytes(b"x")  # eval_agent.py's preset metrics
    (tmp_path / f".reference-v2-{key}.safetensors.k3j_x9z0.tmp").write_bytes(b"x" * 7)  # a killed writer's leftover
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["cache", "--info"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "$QENV_CACHE_DIR" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert rows["reference"][1] == "2" and rows["tokens"][1] == "1" and rows["features"][1] == "1"
    assert rows["presets"][1] == "1" and rows["total"][1] == "5" and "1 other file" in out
    assert main(["cache", "--clear"]) == 0
    assert "removed 5 file(s), 3.0 KiB" in capsys.readouterr().out  # the size freed (it said 0 B)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing of the user's is deleted
    assert main(["cache", "--info"]) == 0
    assert "total          0" in capsys.readouterr().out


def test_cache_command_errors_are_one_line(capsys):
    from qenv.__main__ import main

    for argv in (["cache"], ["cache", "--info", "--clear"], ["nothing"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "Fix: " in err[0], err


@pytest.mark.slow  # extended tier: an env writing every cache kind
def test_cache_info_knows_every_file_the_env_writes(tmp_path):
    """Every file an env writes in its cache (including the per-rule error table of the greedy
    plan behind the residual kind) is counted as qenv's, so ``cache --clear`` removes it."""
    import gymnasium as gym

    from qenv.cache import cache_info

    env = gym.make("QuantLLM-v0", model="tiny-llama", action_kind="residual", n_tokens=128, seq_len=32,
                   cache_dir=str(tmp_path))
    env.reset(seed=0)
    env.close()
    info = cache_info(tmp_path)
    assert info.total_files >= 3 and info.other == [], info.other
