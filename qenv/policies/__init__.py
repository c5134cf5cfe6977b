"""Policies that ship with qenv: ``qenv.policies.load("transfer")``, ``--policy qenv:transfer``.

Each shipped policy is three files in this folder: ``<name>.zip`` (a Stable-Baselines3 agent zip,
read with :mod:`qenv.sb3_zip`'s allow-list, never unpickled as SB3 would), ``<name>.json`` (its
card: what it was trained on, with which command, commit and settings, for which budgets and
observation, and its measured zero-shot table) and ``<name>.md`` (the card for people, rendered
from the JSON by :func:`render_card`). The zip also carries the card's settings in its own entry
(:data:`RECORD_ENTRY`), so a card that no longer describes its zip is noticed
(:func:`check_card_matches_zip`).

A user's model is played by one rollout of the policy: the programs (``eval_agent.py``,
``train_agent.py --init-from``, ``python -m qenv quantize``) resolve ``qenv:<name>`` with
:func:`resolve` and check with :func:`check_describes` that the policy can describe the model's
layers before anything slow. ``scripts/train_transfer_policy.py`` rebuilds a policy and writes
these files (:func:`write_policy`).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from qenv.errors import QenvError

#: the folder of the shipped policies (package data: a wheel carries it)
POLICIES_DIR = Path(__file__).resolve().parent
#: how a command line names a shipped policy: ``qenv:transfer``
PREFIX = "qenv:"
#: the version of the card's layout (raise it when a field changes meaning)
CARD_VERSION = 1
#: the zip entry that repeats the card's settings (SB3 ignores entries it does not know)
RECORD_ENTRY = "qenv_policy.json"
#: the card's largest size: a card is a few KB (its zero-shot table included)
MAX_CARD_BYTES = 1 * 2**20
#: what a card must hold, and of which type
CARD_KEYS: dict[str, type | tuple[type, ...]] = {
    "card_version": int, "name": str, "agent": str, "trained_on": list, "command": str, "git_commit": str,
    "config": dict, "budget_range": list, "observation": dict, "layer_kinds": list, "zero_shot": (dict, type(None)),
}
#: the settings the zip's own record repeats (so :func:`check_card_matches_zip` can compare them)
RECORDED_KEYS: tuple[str, ...] = ("name", "agent", "git_commit", "command", "config", "budget_range", "observation",
                                  "layer_kinds", "trained_on")
#: the SB3 algorithm of each agent a shipped policy may be: (module, class)
ALGORITHMS: dict[str, tuple[str, str]] = {"ppo": ("stable_baselines3", "PPO"),
                                          "maskable_ppo": ("sb3_contrib", "MaskablePPO")}
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")


def available(folder: str | Path | None = None) -> list[str]:
    """The shipped policies' names (those with both a zip and a card), sorted."""
    where = Path(folder) if folder is not None else POLICIES_DIR
    return sorted(p.stem for p in where.glob("*.zip") if _NAME.fullmatch(p.stem) and p.with_suffix(".json").is_file())


def is_shipped(spec: Any) -> bool:
    """Whether a ``--policy``/``--init-from`` value names a shipped policy (``qenv:<name>``)."""
    return isinstance(spec, str) and spec.startswith(PREFIX)


def policy_path(name: str, folder: str | Path | None = None) -> Path:
    """The zip of the shipped policy ``name`` (``transfer`` or ``qenv:transfer``); an unknown name is
    one error that lists the shipped ones."""
    key = name[len(PREFIX):] if is_shipped(name) else name
    names = available(folder)
    if not _NAME.fullmatch(key) or key not in names:
        import difflib

        close = difflib.get_close_matches(key, names, n=1)
        raise QenvError(f"No shipped policy named {PREFIX}{key}" + (f" (did you mean {PREFIX}{close[0]}?)." if close
                                                                    else "."),
                        f"use one of: {', '.join(PREFIX + n for n in names)}." if names else
                        "this qenv ships no policy; pass the model.zip of a run of train_agent.py.")
    return (Path(folder) if folder is not None else POLICIES_DIR) / f"{key}.zip"


def resolve(spec: str | Path) -> Path:
    """A ``--policy`` value as a file: ``qenv:<name>`` is the shipped zip, anything else a path."""
    return policy_path(str(spec)) if is_shipped(spec) else Path(spec)


def card_path(policy: str | Path) -> Path:
    """The card beside a policy zip (``transfer.zip`` -> ``transfer.json``)."""
    return resolve(policy).with_suffix(".json")


def read_card(policy: str | Path) -> dict[str, Any]:
    """The card of a shipped policy (``"transfer"``, ``"qenv:transfer"``) or of a policy zip with a
    card beside it; checked (size, version, keys and their types): a card is input like any file."""
    from qenv.io import read_json

    text = str(policy)
    path = policy_path(text).with_suffix(".json") if _NAME.fullmatch(text) or is_shipped(text) else card_path(text)
    fix = "rebuild the policy with scripts/train_transfer_policy.py (it writes the zip and its card)."
    data = read_json(path, "Policy card", fix, max_bytes=MAX_CARD_BYTES)
    if not isinstance(data, dict) or data.get("card_version") != CARD_VERSION:
        version = data.get("card_version") if isinstance(data, dict) else None
        raise QenvError(f"Policy card {path} has version {version!r}, not {CARD_VERSION}.", fix)
    for key, kind in CARD_KEYS.items():
        if not isinstance(data.get(key), kind):
            raise QenvError(f"Policy card {path} has no valid {key!r} (edited by hand, or not written by qenv).", fix)
    return data


def read_zip_record(policy: str | Path) -> dict[str, Any]:
    """The settings a policy zip carries in :data:`RECORD_ENTRY` (size-capped; no pickle)."""
    from qenv.sb3_zip import _loads, _read_entry, check_zip_sizes

    file = resolve(policy)
    check_zip_sizes(file)
    try:
        with zipfile.ZipFile(file) as archive:
            data = _loads(_read_entry(archive, RECORD_ENTRY))
    except KeyError:
        raise QenvError(f"The policy {file} carries no {RECORD_ENTRY} record of its settings.",
                        "rebuild it with scripts/train_transfer_policy.py.") from None
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise QenvError(f"The policy {file} has an unreadable {RECORD_ENTRY} ({exc}).",
                        "rebuild it with scripts/train_transfer_policy.py.") from None
    if not isinstance(data, dict):
        raise QenvError(f"The policy {file} has a {RECORD_ENTRY} that is not a JSON object.",
                        "rebuild it with scripts/train_transfer_policy.py.")
    return data


def check_card_matches_zip(policy: str | Path) -> dict[str, Any]:
    """The card, after checking that it says what the zip's own record says (commit, command, config,
    budgets, observation, training models): a card copied beside another zip is refused."""
    card = read_card(policy)
    record = read_zip_record(policy)
    differ = [k for k in RECORDED_KEYS if json.dumps(card.get(k), sort_keys=True) != json.dumps(record.get(k),
                                                                                                sort_keys=True)]
    if differ:
        raise QenvError(f"The card of {resolve(policy)} does not describe its zip: {', '.join(differ)} differ.",
                        "rebuild the policy with scripts/train_transfer_policy.py (it writes both).")
    return card


def load(name: str, env: Any = None, device: str = "cpu") -> Any:
    """The shipped policy ``name`` (or a policy zip with a card) as its Stable-Baselines3 model.

    The zip's pickled entries go through :func:`qenv.sb3_zip.safe_custom_objects`' allow-list (SB3
    would unpickle them, running whatever they hold); ``env`` (optional) is one whose observation
    and action spaces the policy fits, e.g. a ``QuantLLM-v0`` made with the card's ``config``."""
    import importlib

    from qenv.sb3_zip import check_zip_sizes, safe_custom_objects

    file = Path(name) if str(name).endswith(".zip") else policy_path(str(name))
    card = check_card_matches_zip(file)
    agent = card["agent"]
    if agent not in ALGORITHMS:
        raise QenvError(f"The policy card of {file} names agent {agent!r}, which a shipped policy cannot be.",
                        f"ship policies of {sorted(ALGORITHMS)}.")
    module, class_name = ALGORITHMS[agent]
    try:
        algorithm = getattr(importlib.import_module(module), class_name)
    except ImportError:
        raise QenvError(f"The policy {file} is a {class_name}, which needs the {module.replace('_', '-')} package.",
                        f"pip install {module.replace('_', '-')}.") from None
    check_zip_sizes(file)
    return algorithm.load(file, env=env, device=device, custom_objects=safe_custom_objects(file))


# -- what a policy can describe -----------------------------------------------------------------------
def described_kinds(kinds: Iterable[str], observation: str) -> set[str]:
    """The layer kinds an observation of this kind shows for layers of ``kinds``: with ``relative``
    (and ``actions``), a fused layer shows as the parts it fuses (GPT-2's qkv as q, k and v)."""
    from qenv.envs.features import _FUSED_KINDS

    out: set[str] = set()
    for kind in kinds:
        out |= set(_FUSED_KINDS.get(kind, (kind,))) if observation != "full" else {kind}
    return out


def check_describes(card: Mapping[str, Any], layers: Iterable[Any], model: str, source: str) -> None:
    """One error when the policy cannot describe ``model``'s layers: observation entries this qenv
    no longer computes in that order, or a kind of layer it never saw (e.g. the output head, or a
    layer of kind ``other``), whose one-hot entry it would read as nothing it learned."""
    from qenv.envs.features import EPISODE_NAMES, STATIC_NAMES

    observation = card.get("observation") or {}
    names = observation.get("names")
    if names != list(STATIC_NAMES + EPISODE_NAMES):
        raise QenvError(f"{source} was trained on observation entries that this qenv does not compute the same way "
                        f"({len(names or [])} entries recorded, {len(STATIC_NAMES + EPISODE_NAMES)} computed now), so "
                        f"it cannot describe the layers of {model}.",
                        "use the qenv release it shipped with, or rebuild it with scripts/train_transfer_policy.py.")
    seen = set(card.get("layer_kinds") or [])
    kinds = {getattr(layer, "kind", None) for layer in layers}
    unseen = sorted(described_kinds(kinds, str(observation.get("kind", "full"))) - seen)
    if unseen:
        raise QenvError(f"{source} cannot describe the layers of {model}: it has layers of kind(s) {unseen}, which the "
                        f"policy never saw (it was trained on {sorted(seen)}).",
                        "leave include_lm_head off, fine-tune it on this model (train_agent.py --init-from "
                        f"{source} --model {model}), or train a policy on models with such layers.")


# -- writing a policy --------------------------------------------------------------------------------
def render_card(card: Mapping[str, Any]) -> str:
    """The card for people (``<name>.md``), from the JSON card: what it is, what it was trained on and
    how, and the zero-shot table with its verdicts, losses included."""
    name = card["name"]
    config = card.get("config") or {}
    env = config.get("env_kwargs") or {}
    low, high = card["budget_range"]
    lines = [f"# `{PREFIX}{name}`: a qenv policy card", "",
             str(card.get("summary") or "A quantization policy shipped with qenv."), "",
             "## Use", "", "```bash",
             f"python eval_agent.py --policy {PREFIX}{name} --model <yours> --budget-bpw 4.0 --export",
             f"python train_agent.py --init-from {PREFIX}{name} --model <yours> --evaluations 16   # fine-tune",
             "```", "", "```python", "import qenv.policies",
             f'model = qenv.policies.load("{name}")  # a Stable-Baselines3 {card["agent"]} model', "```", "",
             "## What it is", "",
             f"- agent: `{card['agent']}`, action kind `{env.get('action_kind')}`, observation "
             f"`{card['observation'].get('kind')}` ({card['observation'].get('size')} entries)",
             f"- budgets: one policy for {low:g}–{high:g} bits per weight (the budget is in the observation)",
             f"- trained for {config.get('total_timesteps')} timesteps, seed {config.get('seed')}"
             + (f", {card['training'].get('episodes')} episodes in {card['training'].get('wall_time_s', 0):.0f} s"
                if isinstance(card.get("training"), dict) else ""),
             f"- layer kinds it can describe: {', '.join(card['layer_kinds'])}",
             f"- commit `{card['git_commit']}`", "", "Trained on:", "",
             "| model | layers | fingerprint |", "|---|---|---|"]
    for m in card["trained_on"]:
        lines.append(f"| {m.get('name') or m.get('spec')} | {m.get('n_layers', '')} | `{m.get('fingerprint', '')}` |")
    lines += ["", "Command:", "", "```bash", card["command"], "```", "",
              "Hyperparameters: `" + json.dumps(config.get("hyperparams") or {}, sort_keys=True) + "`", ""]
    zero = card.get("zero_shot")
    lines += ["## Zero-shot table", ""]
    if not zero or not zero.get("rows"):
        lines += ["Not measured yet.", ""]
    else:
        lines += [str(zero.get("how", "")), "", "```bash", str(zero.get("command", "")).replace("; ", "\n"), "```", "",
                  "| model | budget | scored on | policy KL (bpw) | greedy KL | vs greedy | best start KL | vs best start | "
                  "GPTQ frontier at its bpw | vs GPTQ | AWQ frontier at its bpw | vs AWQ |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in zero["rows"]:
            scored = "held-out text" if str(r.get("scored_on", "")).startswith("held-out") else "calibration tokens"
            budget = f"{r['budget']:g}" if isinstance(r.get("budget"), (int, float)) else str(r.get("budget"))
            lines.append(f"| {r['model']} | {budget} | {scored} | {_num(r.get('policy_kl'))} "
                         f"({_num(r.get('policy_bpw'), 3)}) "
                         f"| {_num(r.get('greedy_kl'))} | {_verdict(r.get('greedy_kl'), r.get('policy_kl'))} "
                         f"| {_num(r.get('best_start_kl'))} | {_verdict(r.get('best_start_kl'), r.get('policy_kl'))} "
                         f"| {_num(r.get('gptq_frontier_kl'))} | {_verdict(r.get('gptq_frontier_kl'), r.get('policy_kl'))} "
                         f"| {_num(r.get('awq_frontier_kl'))} | {_verdict(r.get('awq_frontier_kl'), r.get('policy_kl'))} |")
        lines += ["", "Ratios are other KL / policy KL: above 1 the policy is better. " + str(zero.get("verdict", "")), ""]
    return "\n".join(lines) + "\n"


def _num(value: Any, digits: int = 4) -> str:
    return "–" if not isinstance(value, (int, float)) else f"{value:.{digits}g}" if digits == 4 else f"{value:.{digits}f}"


def _verdict(other: Any, policy: Any) -> str:
    if not isinstance(other, (int, float)) or not isinstance(policy, (int, float)) or policy <= 0:
        return "–"
    ratio = other / policy
    return f"{ratio:.3f}x " + ("better" if ratio > 1 else "worse" if ratio < 1 else "equal")


def write_policy(zip_file: str | Path, card: Mapping[str, Any], folder: str | Path) -> Path:
    """Write ``<folder>/<name>.zip`` (the agent zip plus :data:`RECORD_ENTRY`), ``<name>.json`` and
    ``<name>.md``, each through a temporary file renamed into place; returns the zip."""
    name = str(card["name"])
    if not _NAME.fullmatch(name):
        raise QenvError(f"Policy name {name!r} is not a plain lower-case name.", "use e.g. transfer or transfer_v2.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.zip"
    record = {k: card.get(k) for k in RECORDED_KEYS}
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".zip.tmp", delete=False) as handle:
        temp = Path(handle.name)
    try:
        shutil.copyfile(zip_file, temp)
        with zipfile.ZipFile(temp, "a") as archive:
            if RECORD_ENTRY in archive.namelist():
                raise QenvError(f"{zip_file} already carries a {RECORD_ENTRY}.", "pass the run's own model.zip.")
            archive.writestr(RECORD_ENTRY, json.dumps(record, sort_keys=True))
        from qenv.io import default_mode

        temp.chmod(default_mode())  # a temporary file is private; the policy is read like any package file
        temp.replace(target)
    finally:
        temp.unlink(missing_ok=True)
    write_card(card, folder)
    return target


def write_card(card: Mapping[str, Any], folder: str | Path) -> Path:
    """Write ``<folder>/<name>.json`` and the ``<name>.md`` rendered from it; returns the JSON card.
    (The zip's record holds the settings, not the zero-shot table: a table measured again rewrites
    the card alone.)"""
    from qenv.io import write_json_atomic, write_text_atomic

    folder = Path(folder)
    name = str(card["name"])
    write_json_atomic(folder / f"{name}.json", dict(card))
    write_text_atomic(folder / f"{name}.md", render_card(card))
    return folder / f"{name}.json"
