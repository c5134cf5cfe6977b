"""Safe reading of Stable-Baselines3 agent zips: sizes capped, pickles through an allow-list.

SB3 would ``cloudpickle.loads`` a zip's non-JSON entries, which runs whatever code the file holds.
Here they are unpickled with an exact allow-list and handed to SB3 as ``custom_objects``. It lives
in the library (not in the agents' layer) because the library loads the policies it ships
(:mod:`qenv.policies`) with it too: one reader of agent zips, used by both layers.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

from qenv.errors import QenvError


# -- safe loading of SB3 zips ---------------------------------------------------------------------
def _names(module: str, *names: str) -> set[tuple[str, str]]:
    return {(module, n) for n in names}


#: every object an SB3 zip's pickled entries may refer to, as exact (module, name) pairs: no module
#: prefixes, no dotted names, no "any subclass of" (through those, torch.fx.GraphModule and
#: torch.jit.ScriptModule, both torch.nn.Module subclasses, got in). Gathered from the zips of every
#: built-in agent and action kind, plus the activations, optimizers, extractors and noises a config
#: may name.
_SAFE_NAMES: frozenset[tuple[str, str]] = frozenset(
    _names("builtins", "set", "frozenset", "slice", "range", "complex", "bytearray", "list", "dict", "tuple", "int",
           "float", "bool", "str", "bytes", "object")
    | _names("copyreg", "_reconstructor") | _names("collections", "OrderedDict", "deque", "defaultdict")
    | _names("qenv.cli.config", "LinearSchedule")
    | _names("stable_baselines3.common.utils", "FloatSchedule", "ConstantSchedule", "LinearSchedule")
    | _names("stable_baselines3.common.type_aliases", "TrainFreq", "TrainFrequencyUnit")
    | _names("stable_baselines3.common.policies", "ActorCriticPolicy", "ActorCriticCnnPolicy",
             "MultiInputActorCriticPolicy")
    | _names("stable_baselines3.dqn.policies", "DQNPolicy", "CnnPolicy", "MultiInputPolicy")
    | _names("stable_baselines3.sac.policies", "SACPolicy", "CnnPolicy", "MultiInputPolicy")
    | _names("stable_baselines3.td3.policies", "TD3Policy", "CnnPolicy", "MultiInputPolicy")
    | _names("sb3_contrib.common.recurrent.policies", "RecurrentActorCriticPolicy",
             "RecurrentActorCriticCnnPolicy", "RecurrentMultiInputActorCriticPolicy")
    | _names("sb3_contrib.common.maskable.policies", "MaskableActorCriticPolicy", "MaskableActorCriticCnnPolicy",
             "MaskableMultiInputActorCriticPolicy")
    | _names("sb3_contrib.common.maskable.buffers", "MaskableRolloutBuffer", "MaskableDictRolloutBuffer")
    | _names("stable_baselines3.common.buffers", "ReplayBuffer", "RolloutBuffer", "DictReplayBuffer",
             "DictRolloutBuffer")
    | _names("sb3_contrib.common.recurrent.buffers", "RecurrentRolloutBuffer", "RecurrentDictRolloutBuffer")
    | _names("stable_baselines3.common.noise", "NormalActionNoise", "OrnsteinUhlenbeckActionNoise")
    | _names("stable_baselines3.common.torch_layers", "FlattenExtractor", "MlpExtractor")
    | _names("torch.nn.modules.activation", "Tanh", "ReLU", "ELU", "LeakyReLU", "GELU", "SiLU", "Sigmoid")
    | _names("torch.optim.adam", "Adam") | _names("torch.optim.adamw", "AdamW") | _names("torch.optim.sgd", "SGD")
    | _names("torch.optim.rmsprop", "RMSprop")
    | _names("gymnasium.spaces.box", "Box") | _names("gymnasium.spaces.discrete", "Discrete")
    | _names("gymnasium.spaces.multi_discrete", "MultiDiscrete") | _names("gymnasium.spaces.multi_binary", "MultiBinary")
    | _names("gymnasium.spaces.dict", "Dict") | _names("gymnasium.spaces.tuple", "Tuple")
    | _names("numpy", "dtype", "ndarray", "bool_", "float16", "float32", "float64", "int8", "int16", "int32", "int64",
             "uint8", "uint16", "uint32", "uint64")
    | {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
    | {(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")}
    | _names("numpy.random._pickle", "__generator_ctor", "__bit_generator_ctor", "__randomstate_ctor")
    | _names("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence", "SeedSequence")
    | _names("numpy.random._pcg64", "PCG64", "PCG64DXSM") | _names("numpy.random._mt19937", "MT19937")
    | _names("numpy.random._philox", "Philox") | _names("numpy.random._sfc64", "SFC64")
    | _names("numpy.random._generator", "Generator") | _names("numpy.random.mtrand", "RandomState")
)


class _Refused(Exception):
    pass


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves only the exact (module, name) pairs of :data:`_SAFE_NAMES`; nothing is imported or
    looked up for anything else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_NAMES:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


#: the zip entry in which qenv records the agent that saved an SB3 zip
AGENT_ENTRY = "qenv_agent.json"
#: what :func:`agent_name_of_zip` returns for a record that is not a plain agent name (a plug-in path,
#: or anything else a file may hold): never an import path to follow
UNNAMED_AGENT = "<not a registered agent>"
_PLAIN_AGENT_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
#: the largest uncompressed sizes of an agent zip's entries: its JSON ``data`` (a PPO's is a few KB)
#: and every entry (the policy's tensors: qenv's MLPs are KBs, a large SB3 network tens of MB).
#: Checked on the zip's directory before anything is read, and again while reading.
MAX_DATA_BYTES = 16 * 2**20
MAX_ENTRY_BYTES = 512 * 2**20
MAX_ZIP_BYTES = 1024 * 2**20


def check_zip_sizes(path: str | Path) -> None:
    """Refuse an agent zip whose entries would inflate past the caps above, before any is read
    (a 2 MB file can hold gigabytes of compressed spaces)."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise QenvError(f"{path} is not a readable Stable-Baselines3 agent file ({exc}).",
                        "pass the model.zip written by train_agent.py or agent.save().") from None
    total = 0
    for info in infos:
        cap = MAX_DATA_BYTES if info.filename in ("data", AGENT_ENTRY) else MAX_ENTRY_BYTES
        total += info.file_size
        if info.file_size > cap or total > MAX_ZIP_BYTES:
            size = info.file_size if info.file_size > cap else total
            limit = cap if info.file_size > cap else MAX_ZIP_BYTES
            raise QenvError(f"The agent file {path} would inflate to {size / 2**20:,.0f} MiB "
                            f"({'entry ' + repr(info.filename) if info.file_size > cap else 'all entries'}), more than "
                            f"the {limit / 2**20:,.0f} MiB an agent file may hold; it is not read.",
                            "pass the model.zip written by train_agent.py or agent.save().")


def _read_entry(archive: zipfile.ZipFile, name: str, cap: int = MAX_DATA_BYTES) -> bytes:
    """One zip entry, read at most ``cap`` bytes (a directory may understate what an entry inflates to)."""
    if archive.getinfo(name).file_size > cap:
        raise ValueError(f"entry {name!r} is larger than {cap} bytes")
    with archive.open(name) as handle:
        raw = handle.read(cap + 1)
    if len(raw) > cap:
        raise ValueError(f"entry {name!r} is larger than {cap} bytes")
    return raw


def _loads(raw: bytes) -> Any:
    """JSON from a file's bytes; nesting too deep to parse is a ValueError, like other bad JSON."""
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError("its JSON nests too deeply") from None


def agent_name_of_zip(path: str | Path) -> str | None:
    """The qenv agent name (``ppo``, ``a2c``, ...) an SB3 zip was saved by; ``None`` if it cannot tell.

    qenv's own zips say so in :data:`AGENT_ENTRY`. For other SB3 zips it is read from what SB3 stored:
    the policy class (resolved through the same allow-list, never executed) and the algorithm's own
    hyperparameters (PPO stores ``clip_range``, A2C does not; DDPG is TD3 with ``policy_delay`` 1).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if AGENT_ENTRY in names:
                name = _loads(_read_entry(archive, AGENT_ENTRY)).get("agent")
                if not name:
                    return None
                return str(name) if _PLAIN_AGENT_NAME.fullmatch(str(name)) else UNNAMED_AGENT
            if "data" not in names:
                return None
            data = _loads(_read_entry(archive, "data"))
        raw = base64.b64decode(str(data["policy_class"][":serialized:"]).encode())
        policy = _AllowListUnpickler(io.BytesIO(raw)).load()
    except (zipfile.BadZipFile, OSError, KeyError, TypeError, ValueError, AttributeError, _Refused,
            pickle.UnpicklingError, EOFError):
        return None
    module = getattr(policy, "__module__", "")
    if module.startswith("stable_baselines3.dqn"):
        return "dqn"
    if module.startswith("stable_baselines3.sac"):
        return "sac"
    if module.startswith("stable_baselines3.td3"):
        return "ddpg" if data.get("policy_delay") == 1 and data.get("target_noise_clip") == 0.0 else "td3"
    if module.startswith("sb3_contrib.common.recurrent"):
        return "recurrent_ppo"
    if module.startswith("sb3_contrib.common.maskable"):
        return "maskable_ppo"
    if module == "stable_baselines3.common.policies":
        return "ppo" if "clip_range" in data else "a2c"
    return None


def safe_custom_objects(path: str | Path) -> dict[str, Any]:
    """The pickled entries of an SB3 zip's ``data``, unpickled with an allow-list.

    SB3 stores what JSON cannot hold (policy class, spaces, schedules, noise) cloudpickled and
    would ``cloudpickle.loads`` it, which runs any code the file carries. Passing the entries
    unpickled here as ``custom_objects`` keeps SB3 from unpickling them; an entry that needs
    anything outside the allow-list is a :class:`QenvError` and is never executed. (SB3 reads the
    zip's ``.pth`` tensors with ``torch.load(weights_only=True)`` itself.)
    """
    path = Path(path)
    check_zip_sizes(path)
    try:
        with zipfile.ZipFile(path) as archive:
            if "data" not in archive.namelist():
                raise QenvError(f"{path} is not a Stable-Baselines3 agent file (it has no 'data' entry).",
                                "pass the model.zip written by train_agent.py or agent.save().")
            data = _loads(_read_entry(archive, "data"))
    except (zipfile.BadZipFile, OSError) as exc:
        raise QenvError(f"{path} is not a readable Stable-Baselines3 agent file ({exc}).",
                        "pass the model.zip written by train_agent.py or agent.save().") from None
    except ValueError as exc:  # not UTF-8, not JSON, nested too deeply, larger than it said
        raise QenvError(f"{path} is damaged: its 'data' entry is not readable JSON ({exc}).",
                        "pass an intact model.zip (e.g. a checkpoint in the run's checkpoints/ folder).") from None
    if not isinstance(data, dict):
        raise QenvError(f"{path} is damaged: its 'data' entry is not a JSON object.", "pass an intact model.zip.")
    out: dict[str, Any] = {}
    for key, item in data.items():
        if not (isinstance(item, dict) and ":serialized:" in item):
            continue
        try:
            raw = base64.b64decode(str(item[":serialized:"]).encode())
            out[key] = _AllowListUnpickler(io.BytesIO(raw)).load()
        except _Refused as exc:
            raise QenvError(
                f"The agent file {path} holds a pickled object in {key!r} that needs {exc}, which qenv does not "
                "load: unpickling it could run arbitrary code.",
                "use agent files written by qenv (train_agent.py) or SB3 with standard policies; if you trust this "
                "file, load it with Stable-Baselines3 directly.") from None
        except Exception as exc:  # noqa: BLE001 - a corrupt pickle, whatever the error
            raise QenvError(f"The agent file {path} is damaged: entry {key!r} cannot be read ({type(exc).__name__}).",
                            "pass an intact model.zip (e.g. a checkpoint in the run's checkpoints/ folder).") from None
    return out
