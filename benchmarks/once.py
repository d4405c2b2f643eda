"""Migrations with --once: N replicas start at once, one runs a 2 s migration, all pass.

    uv run python -m benchmarks.once [--replicas 20] [--runs 3] [--migration 2]

Starts N real `kubelock --once KEY -- sh -c 'sleep 2'` processes together (as
the init containers of N Pods of one rollout would: in-cluster, each with a
Pod's environment), with a fresh KEY per run,
and measures from the moment all were started to the moment the last one
exited. Prints the median over the runs, and checks that the migration ran
exactly once per run and that every replica exited 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from ._plane import control_plane
from .startup import LEASE_RULES, this_venvs_kubelock


def one_rollout(
    kubelock: list[str],
    env: dict[str, str],
    replicas: int,
    key: str,
    migration: float,
    log: Path,
    expected_runs: int = 1,
) -> float:
    command = ["sh", "-c", f'echo "$KUBELOCK_IDENTITY" >> "{log}"; sleep {migration}']
    # Each replica's stderr goes to a file: read only when it failed, to say why.
    stderrs = [log.with_name(f"{log.name}.pod-{index}.stderr") for index in range(replicas)]
    processes = []
    for index, stderr in enumerate(stderrs):
        with stderr.open("w") as file:
            argv = [*kubelock, "--name", "migrations", "--id", f"pod-{index}", "--once", key]
            processes.append(subprocess.Popen([*argv, *command], env=env, stderr=file))
    started = time.monotonic()
    codes = [process.wait() for process in processes]
    elapsed = time.monotonic() - started
    if codes != [0] * replicas:
        said = "".join(
            f"\npod-{index} exited {code}:\n{stderrs[index].read_text()}"
            for index, code in enumerate(codes)
            if code != 0
        )
        raise RuntimeError(f"not every replica exited 0: {codes}{said}")
    ran = log.read_text().split() if log.exists() else []
    if len(ran) != expected_runs:
        raise RuntimeError(f"the migration ran {len(ran)} times: {ran}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--migration", type=float, default=2.0, help="seconds it takes")
    args = parser.parse_args()
    kubelock = this_venvs_kubelock()
    with control_plane("bench") as (plane, _), tempfile.TemporaryDirectory() as folder:
        # In-cluster, as init containers run: the kubeconfig loader is never imported.
        plane.create_service_account("bench", "bench")
        plane.grant("bench", "system:serviceaccount:bench:bench", LEASE_RULES)
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("KUBELOCK_", "KUBERNETES_")) and key != "KUBECONFIG"
        }
        env.update(plane.in_cluster_environment("bench", "bench", Path(folder) / "sa"))
        times = []
        for run in range(args.runs):
            log = Path(folder) / f"ran-{run}"
            elapsed = one_rollout(kubelock, env, args.replicas, f"v{run}", args.migration, log)
            times.append(elapsed)
            print(
                f"run {run + 1}: {args.replicas} replicas through in {elapsed:.2f} s "
                f"(migration {args.migration:g} s, ran once)",
                flush=True,
            )
        print(
            f"--once, {args.replicas} replicas, {args.migration:g} s migration: median "
            f"{statistics.median(times):.2f} s from all started to the last one through "
            f"(min {min(times):.2f}, max {max(times):.2f}, {args.runs} runs)"
        )
        # The floor: the same replicas when the KEY is already done (start-up and one GET).
        floor = [
            one_rollout(kubelock, env, args.replicas, "v0", 0, Path(folder) / "none", 0)
            for _ in range(args.runs)
        ]
        print(
            f"  floor, the same {args.replicas} replicas with the KEY already done: median "
            f"{statistics.median(floor):.2f} s (start-up and one GET each; this machine's load)"
        )


if __name__ == "__main__":
    main()
