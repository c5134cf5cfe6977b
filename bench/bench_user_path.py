"""The user's path, timed as the user runs it: ``python -m qenv quantize`` and ``eval_agent.py`` (issue 26 item 8).

Each command runs as a child process, as a user would start it, with its output going to a log (not
a terminal), so the programs write their own stage and progress lines; this script timestamps every
line as it arrives. Each command runs cold (a fresh, empty ``QENV_CACHE_DIR``) and then warm (the
same cache again), and the report gives per run:

- the wall time, the child's CPU time (user + system: on a shared machine, a steadier number) and
  its peak resident memory (``ru_maxrss`` from ``wait4``, the child and nothing else);
- the time of each stage, from the programs' own lines (``<stage>: done in N s``, and a progress
  bar's ``<what>: done, N <unit> in T s``), and the time to the first line of output;
- on ``--device cuda``, the child's peak GPU memory, polled with ``nvidia-smi`` (per process, else
  the whole card's use, said so).

The load average is recorded before and after each run: on a machine shared with other work, the
wall times are only as good as the load beside them.

    python bench/bench_user_path.py --out /tmp/user_path                # SmolLM2 at 4.0 bpw, CPU
    python bench/bench_user_path.py --device cuda --budget-bpw 3.0 --eval-tokens 2048 --out /tmp/up_gpu

It writes ``user_path.json`` (every run, its stages and log lines' count) and ``user_path.md`` (the
table) into ``--out``, with one log per run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2"
COMMANDS = ("quantize", "eval_agent")
PHASES = ("cold", "warm")

#: ``<stage>: done in 12.3 s`` (qenv.progress.stage) and ``<bar>: done, 3990 layer-rule in 95.6 s`` (a bar's end)
STAGE_DONE = re.compile(r"^(?P<name>.+?): done in (?P<s>[0-9.]+) s$")
BAR_DONE = re.compile(r"^(?P<name>.+?): done, (?P<n>[0-9.]+) (?P<unit>\S+) in (?P<s>[0-9.]+) s$")


def parse_stages(lines: list[tuple[float, str]]) -> list[dict[str, Any]]:
    """The stages the programs reported, in order: ``{"stage", "s", "at"}`` (``at``: seconds since the
    start when it ended), from stage lines and progress bars' final lines. Stages nest (a bar runs
    inside a stage): the times are each stage's own, not shares of the total."""
    stages = []
    for at, line in lines:
        text = line.strip()
        found = STAGE_DONE.match(text) or BAR_DONE.match(text)
        if found:
            stages.append({"stage": found["name"], "s": float(found["s"]), "at": round(at, 2)})
    return stages


def load_average() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class GpuPoller:
    """Peak GPU memory of one process (MiB) from ``nvidia-smi``, polled every ``every`` seconds; the
    whole card's use when per-process numbers are not given (``scope`` says which)."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.pid, self.every, self.peak, self.scope = pid, every, None, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None
        if self.available:
            self._thread.start()

    def _query(self, what: str) -> list[str]:
        try:
            return subprocess.run(["nvidia-smi", f"--query-{what}", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=10).stdout.splitlines()
        except (OSError, subprocess.SubprocessError):
            return []

    def _run(self) -> None:
        while not self._stop.is_set():
            mine = [line.split(",")[1] for line in self._query("compute-apps=pid,used_memory")
                    if line.split(",")[0].strip() == str(self.pid)]
            if mine:
                used, self.scope = sum(float(m) for m in mine), "process"
            else:
                card = self._query("gpu=memory.used")
                used = max((float(c) for c in card if c.strip()), default=None)
                self.scope = self.scope or ("card" if used is not None else None)
            if used is not None and (self.peak is None or used > self.peak):
                self.peak = used
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        if self.available:
            self._thread.join(timeout=15)


def run_timed(argv: list[str], env: dict[str, str], log: Path, *, gpu: bool, timeout: float) -> dict[str, Any]:
    """Run ``argv`` with its output to ``log`` (a pipe: the child sees no terminal), each line
    timestamped; the wall time, CPU time and peak resident memory of the child, its stages."""
    load_before = load_average()
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env, cwd=REPO, text=True, errors="replace", bufsize=1)
    poller = GpuPoller(child.pid) if gpu else None
    lines: list[tuple[float, str]] = []
    timer = threading.Timer(timeout, child.kill)
    timer.start()
    with open(log, "w") as out:
        assert child.stdout is not None
        for line in child.stdout:
            at = time.perf_counter() - start
            lines.append((at, line.rstrip("\n")))
            out.write(f"[{at:7.1f}] {line}")
            out.flush()  # the log can be followed while the command runs
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    timer.cancel()
    if poller is not None:
        poller.stop()
    child.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": child.returncode, "wall_s": round(wall, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
            "peak_gpu_mib": poller.peak if poller is not None else None,
            "gpu_scope": poller.scope if poller is not None else None,
            "first_line_s": round(lines[0][0], 2) if lines else None, "log_lines": len(lines),
            "carriage_returns": sum(line.count("\r") for _, line in lines),
            "stages": parse_stages(lines), "load_before": load_before, "load_after": load_average(),
            "log": str(log), "argv": argv}


def command_argv(name: str, args: argparse.Namespace, out: Path) -> list[str]:
    """The user's command line for ``name`` (into ``out``)."""
    if name == "quantize":
        argv = [sys.executable, "-m", "qenv", "quantize", "--model", args.model, "--budget-bpw", str(args.budget_bpw),
                "--agent", args.agent, "--n-tokens", str(args.n_tokens), "--device", args.device,
                "--search-evals", str(args.search_evals), "--out", str(out)]
        argv += ["--seq-len", str(args.seq_len)] if args.seq_len else []
        return argv + (["--data", args.calib_data] if args.calib_data else [])
    argv = [sys.executable, str(REPO / "eval_agent.py"), "--policy", args.policy, "--model", args.model,
            "--budget-bpw", str(args.budget_bpw), "--searchers", args.searchers, "--presets", args.presets,
            "--n-tokens", str(args.eval_tokens), "--device", args.device, "--search-evals", str(args.search_evals),
            "--out", str(out)]
    argv += ["--calib-data", args.calib_data] if args.calib_data else []
    return argv + (["--data", args.eval_data] if args.eval_data else [])


def markdown(runs: list[dict[str, Any]], device: str) -> str:
    gpu = device.startswith("cuda")
    head = "| command | cache | rc | wall s | CPU s | peak RSS GiB |" + (" peak GPU GiB |" if gpu else "") + \
           " load before/after | stages (s) |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        stages = "; ".join(f"{s['stage']} {s['s']:g}" for s in r["stages"])
        cells = [r["command"], r["phase"], str(r["rc"]), f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}",
                 f"{r['peak_rss_mib'] / 1024:.2f}"]
        if gpu:
            cells.append("—" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib'] / 1024:.2f} ({r['gpu_scope']})")
        cells += [f"{r['load_before']} / {r['load_after']}", stages]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budget-bpw", type=float, default=4.0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--commands", nargs="+", choices=COMMANDS, default=list(COMMANDS))
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES),
                   help="cold: a fresh cache (<out>/cache, emptied first); warm: that cache again (alone: "
                        "the cache an earlier cold run of this --out left)")
    p.add_argument("--agent", default="greedy", help="quantize's searcher (default: %(default)s)")
    p.add_argument("--n-tokens", type=int, default=256, help="quantize's calibration tokens (default: %(default)s)")
    p.add_argument("--seq-len", type=int, help="quantize's sequence length (default: the command's)")
    p.add_argument("--search-evals", type=int, default=16)
    p.add_argument("--calib-data", default=str(DATA / "train.txt") if (DATA / "train.txt").is_file() else None,
                   help="calibration text (default: wikitext-2's train.txt when found; '' for sampled tokens)")
    p.add_argument("--eval-data", default=str(DATA / "test.txt") if (DATA / "test.txt").is_file() else None,
                   help="eval_agent's held-out text (default: wikitext-2's test.txt when found)")
    p.add_argument("--eval-tokens", type=int, default=256, help="eval_agent's scored tokens (default: %(default)s)")
    p.add_argument("--policy", default="qenv:transfer", help="eval_agent's policy (default: %(default)s)")
    p.add_argument("--presets", default="default")
    p.add_argument("--searchers", default="greedy")
    p.add_argument("--timeout", type=float, default=1800, help="per run, seconds (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.calib_data = args.calib_data or None
    args.eval_data = args.eval_data or None
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "cache"
    runs = []
    for name in args.commands:
        if cache.exists() and args.phases[0] == "cold":  # every command starts cold: its own fresh cache
            shutil.rmtree(cache)
        for phase in args.phases:
            target = args.out / f"{name}-{phase}"
            if target.exists():
                shutil.rmtree(target)
            env = {**os.environ, "QENV_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
            result = run_timed(command_argv(name, args, target), env, args.out / f"{name}-{phase}.log",
                               gpu=args.device.startswith("cuda"), timeout=args.timeout)
            runs.append({"command": name, "phase": phase, **result})
            print(f"{name} {phase}: rc {result['rc']}, {result['wall_s']:.1f} s wall, {result['cpu_s']:.1f} s CPU, "
                  f"peak RSS {result['peak_rss_mib'] / 1024:.2f} GiB, load {result['load_before']} -> "
                  f"{result['load_after']}", flush=True)
    report = {"model": args.model, "budget_bpw": args.budget_bpw, "device": args.device, "cpus": os.cpu_count(),
              "runs": runs}
    (args.out / "user_path.json").write_text(json.dumps(report, indent=1))
    table = markdown(runs, args.device)
    (args.out / "user_path.md").write_text(table)
    print(table)
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
