"""Start-up cost of `kubelock -- true` on an uncontended lock, and memory while holding.

    uv run python -m benchmarks.startup [--runs 10] [--executable PATH]

Runs the command as a user would against a real control plane, twice: with a
kubeconfig file (which loads the `kubernetes` package's config loader) and
in-cluster (a Pod's environment, which never imports it). Prints medians of
wall time, and the peak resident memory (VmHWM) of kubelock while its child runs.
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import kubelock

from ._plane import control_plane

LEASE_RULES = [
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "verbs": ["get", "create", "update", "patch", "watch"],
    }
]


def this_venvs_kubelock() -> list[str]:
    """This venv's ``kubelock``, with its own modules compiled to bytecode as an install's are.

    pip, ``uv sync --compile-bytecode`` and the image's executables all ship
    bytecode, but an editable install's sources (``src/kubelock``) get it only when
    Python may write it: under ``PYTHONDONTWRITEBYTECODE`` (set on some machines,
    this project's among them) every start would compile kubelock from source,
    about 35 ms of CPU that no installed kubelock spends.
    """
    compileall.compile_dir(Path(kubelock.__file__).parent, quiet=1)
    return [str(Path(sys.prefix) / "bin/kubelock")]


def timed_runs(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return times


def peak_memory_kib(argv: list[str], env: dict[str, str]) -> int:
    """VmHWM of kubelock itself (not its child) after holding the lock for a while."""
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(argv, env=env, stderr=stderr, text=True)
        try:
            time.sleep(6)  # acquired, and a couple of renewals
            status = Path(f"/proc/{process.pid}/status").read_text()
            for line in status.splitlines():
                if line.startswith("VmHWM"):
                    return int(line.split()[1])
            stderr.seek(0)
            raise RuntimeError(f"kubelock exited early ({process.poll()}):\n{stderr.read()}")
        finally:
            process.terminate()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--executable", help="a kubelock executable (default: this venv's)")
    args = parser.parse_args()
    kubelock = [args.executable] if args.executable else this_venvs_kubelock()
    base_env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("KUBELOCK_", "KUBERNETES_")) and key != "KUBECONFIG"
    }
    with control_plane("bench") as (plane, kubeconfig), tempfile.TemporaryDirectory() as folder:
        plane.create_service_account("bench", "bench")
        plane.grant("bench", "system:serviceaccount:bench:bench", LEASE_RULES)
        pod_env = {
            **base_env,
            **plane.in_cluster_environment("bench", "bench", Path(folder) / "sa"),
        }
        file_env = {**base_env, "KUBECONFIG": str(kubeconfig)}
        print(f"kubelock: {' '.join(kubelock)}")
        variants: tuple[tuple[str, dict[str, str], list[str]], ...] = (
            ("kubeconfig", file_env, []),
            ("in-cluster", pod_env, []),
            ("in-cluster + metrics", pod_env, ["--metrics-address", "127.0.0.1:0"]),
        )
        for label, env, extra in variants:
            slug = label.replace(" + ", "-")
            argv = [*kubelock, *extra, "--name", f"startup-{slug}", "--", "true"]
            subprocess.run(argv, env=env, check=True, stderr=subprocess.DEVNULL)  # warm caches
            times = timed_runs(argv, env, args.runs)
            peak = peak_memory_kib(
                [*kubelock, *extra, "--name", f"memory-{slug}", "--", "sleep", "30"], env
            )
            print(
                f"{label:>20}: `kubelock -- true` median {statistics.median(times) * 1000:.0f} ms "
                f"(min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}, {args.runs} runs); "
                f"peak RSS while holding {peak / 1024:.1f} MiB"
            )
        version = [*kubelock, "--version"]
        times = timed_runs(version, base_env, args.runs)
        print(
            f"{'version':>20}: `kubelock --version` median {statistics.median(times) * 1000:.0f} ms"
        )


if __name__ == "__main__":
    main()
