#!/usr/bin/env python3
"""Do a GPT-2 and a Llama look alike to a policy? The per-layer observation features of two models,
role by role (issue 25 item 6).

A policy trained on one layout meets another's layers: GPT-2's fused ``c_attn`` (Conv1D, stored
``[in, out]``) where Llama has separate q/k/v, ``c_fc``/``c_proj`` where Llama has gate/up/down. For
each role (attention input, attention output, MLP input, MLP output) this prints every static
observation entry (``--observation relative``, what the transfer configs use, or ``full``) averaged
over each model's layers of that role, and the difference. Entries that differ because the layers
*are* different (sizes of a 4x MLP against a 2.7x SwiGLU, the activation statistics of GELU against
SwiGLU) should differ; entries that differ only because of how a layout stores the same kind of
layer should not.

    python3 bench/layout_features.py <gpt2 folder> <llama folder> [--observation relative]

(the zoo's ``zoo-gpt2`` and ``zoo-llama``, ``scripts/train_bench_models.py --zoo zoo-gpt2 zoo-llama``,
are two trained models of one size.)
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

#: role -> the layer kinds that play it, in any layout
ROLES: dict[str, tuple[str, ...]] = {
    "attn_in": ("q", "k", "v", "qkv"),
    "attn_out": ("o",),
    "mlp_in": ("gate", "up", "gate_up", "fc_in"),
    "mlp_out": ("down", "fc_out"),
}


def role_features(spec: str, observation: str, n_tokens: int, seq_len: int) -> dict[str, np.ndarray]:
    """role -> the mean static observation row of the model's layers of that role."""
    from qenv.cli.envs import make_quant_env

    env = make_quant_env(model=spec, observation=observation, n_tokens=n_tokens, seq_len=seq_len)
    task = env.unwrapped.task
    static = task.static if observation == "full" else task.relative_static
    kinds = [info.kind for info in task.layers]
    out = {}
    for role, members in ROLES.items():
        rows = [static[i] for i, kind in enumerate(kinds) if kind in members]
        if rows:
            out[role] = np.mean(rows, axis=0)
    env.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--observation", default="relative", choices=("relative", "full"))
    p.add_argument("--n-tokens", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--min-diff", type=float, default=0.05, help="print entries differing by at least this much")
    args = p.parse_args(argv)
    from qenv.envs.features import STATIC_NAMES

    a = role_features(args.first, args.observation, args.n_tokens, args.seq_len)
    b = role_features(args.second, args.observation, args.n_tokens, args.seq_len)
    print(f"{args.observation} observation, static entries differing by >= {args.min_diff} (mean over each role's layers)")
    print(f"{'role':9} {'entry':18} {'first':>8} {'second':>8} {'diff':>8}")
    for role in ROLES:
        if role not in a or role not in b:
            continue
        for j, name in enumerate(STATIC_NAMES):
            if abs(a[role][j] - b[role][j]) >= args.min_diff:
                print(f"{role:9} {name:18} {a[role][j]:8.3f} {b[role][j]:8.3f} {a[role][j] - b[role][j]:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
