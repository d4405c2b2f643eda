"""The command never outlives the lock, even when kubelock is killed or frozen.

Real kubelock processes against the real API server. Commands write heartbeats
(Unix time, every 50 ms) from the group leader and from a grandchild in its
group, and ignore SIGTERM: only SIGKILL to the whole group stops them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from kubelock.errors import EXIT_LEASE_LOST
from kubelock.process import STOP_AFTER_SPAWN
from kubelock.testing import process_alive

from .kubelock_proc import hold_command, lease, read_intervals, renew_time, spawn, wait_for

LEASE = 6.0
SHORT = ["--lease-duration", "6s", "--renew-deadline", "4s", "--retry-period", "1s"]
_BEAT = "while true; do date +%s.%N > {beat}.tmp; mv {beat}.tmp {beat}; sleep 0.05; done"
# A leader and a grandchild in its group, both beating, both deaf to SIGTERM.
HEARTBEATS = "trap '' TERM; ( {grandchild_beat} ) & {leader_beat}".format(
    grandchild_beat=_BEAT.format(beat="{grandchild}"), leader_beat=_BEAT.format(beat="{leader}")
)


class Beats:
    """The two heartbeat files of one command."""

    def __init__(self, folder: Path) -> None:
        self.leader = folder / "leader-beat"
        self.grandchild = folder / "grandchild-beat"

    def command(self) -> list[str]:
        return ["sh", "-c", HEARTBEATS.format(leader=self.leader, grandchild=self.grandchild)]

    def started(self) -> bool:
        return self.leader.exists() and self.grandchild.exists()

    def last(self) -> float:
        """The latest heartbeat of either, once both have stopped (fails if they go on)."""
        latest = self._latest()
        deadline = time.monotonic() + 30
        while True:
            time.sleep(0.5)
            now = self._latest()
            if now == latest:
                return latest
            assert time.monotonic() < deadline, "the command's group is still beating"
            latest = now

    def _latest(self) -> float:
        return max(float(self.leader.read_text()), float(self.grandchild.read_text()))


def holder_and_waiter(
    kubeconfig: Path, name: str, beats: Beats, log: Path
) -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
    common = ["--kubeconfig", str(kubeconfig), "--name", name, *SHORT]
    holder = spawn(
        [*common, "--id", "holder", "--grace-period", "60s", *beats.command()],
        stderr=subprocess.PIPE,
    )
    wait_for(beats.started, what="the holder's command and its grandchild")
    waiter = spawn([*common, "--id", "waiter", *hold_command("waiter", 0, log)])
    return holder, waiter


def test_a_killed_kubelocks_command_is_gone_before_the_next_one_starts(
    kubeconfig: Path, namespace: str, tmp_path: Path
) -> None:
    beats, log = Beats(tmp_path), tmp_path / "holds"
    holder, waiter = holder_and_waiter(kubeconfig, "killed", beats, log)
    try:
        time.sleep(1.5)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        assert waiter.wait(timeout=60) == 0
        ((_, started, _),) = read_intervals(log)
        assert beats.last() < started  # leader and grandchild both, before the next command
    finally:
        for process in (holder, waiter):
            process.kill()


def test_a_frozen_kubelocks_command_dies_before_anyone_takes_over(
    kubeconfig: Path, namespace: str, tmp_path: Path
) -> None:
    beats, log = Beats(tmp_path), tmp_path / "holds"
    holder, waiter = holder_and_waiter(kubeconfig, "frozen", beats, log)
    try:
        time.sleep(1.5)
        holder.send_signal(signal.SIGSTOP)
        time.sleep(LEASE + 3)
        holder.send_signal(signal.SIGCONT)
        assert holder.wait(timeout=60) == EXIT_LEASE_LOST
        assert waiter.wait(timeout=60) == 0
        ((_, started, _),) = read_intervals(log)
        assert beats.last() < started  # no overlap, by the heartbeats
        assert holder.stderr is not None
        assert "watchdog" in holder.stderr.read()
    finally:
        for process in (holder, waiter):
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.kill()


def test_a_kubelock_resumed_past_its_deadline_exits_75_and_writes_nothing(
    kubeconfig: Path, namespace: str, tmp_path: Path, admin: httpx.Client
) -> None:
    beats = Beats(tmp_path)
    holder = spawn(
        [
            *["--kubeconfig", str(kubeconfig), "--name", "resumed", "--id", "holder", *SHORT],
            *["--grace-period", "60s", *beats.command()],
        ],
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(beats.started, what="the holder's command and its grandchild")
        time.sleep(1.5)
        holder.send_signal(signal.SIGSTOP)
        time.sleep(LEASE + 3)
        before = lease(admin, namespace, "resumed")
        assert before is not None
        holder.send_signal(signal.SIGCONT)
        assert holder.wait(timeout=60) == EXIT_LEASE_LOST
        after = lease(admin, namespace, "resumed")
        assert after is not None
        assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
        assert after["spec"]["holderIdentity"] == "holder"  # not released: nothing written
        # Dead by its safety deadline, before held_until (the last renewal's send + lease).
        assert beats.last() < renew_time(before) + LEASE
    finally:
        if holder.poll() is None:
            holder.send_signal(signal.SIGCONT)
            holder.kill()


def stopped(pid: int) -> bool:
    """Whether the process is stopped (state T in /proc)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


def test_a_kubelock_killed_right_after_the_spawn_leaves_no_command_behind(
    kubeconfig: Path, namespace: str, tmp_path: Path
) -> None:
    """The instant between the spawn and the watchdog hearing of the group, held open.

    A test hook (STOP_AFTER_SPAWN, read only by tests) makes kubelock SIGSTOP
    itself right after the spawn; the test SIGKILLs it there. The lease (60 s)
    is far off, so only the watchdog's end-of-pipe kill can stop the command.
    """
    beats, pid_file = Beats(tmp_path), tmp_path / "pid"
    command = f"echo $$ > {pid_file}.tmp; mv {pid_file}.tmp {pid_file}; " + HEARTBEATS.format(
        leader=beats.leader, grandchild=beats.grandchild
    )
    holder = spawn(
        [
            *["--kubeconfig", str(kubeconfig), "--name", "spawning", "--id", "holder"],
            *["--lease-duration", "60s", "--renew-deadline", "40s", "--retry-period", "5s"],
            *["sh", "-c", command],
        ],
        env={STOP_AFTER_SPAWN: "1"},
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: beats.started() and pid_file.exists(), what="the command to start")
        wait_for(lambda: stopped(holder.pid), what="kubelock to stop itself after the spawn")
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        beats.last()  # leader and grandchild both stop beating (it fails if they go on)
        assert not process_alive(int(pid_file.read_text()))
    finally:
        holder.kill()
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def test_a_held_lease_deleted_stops_its_command_before_a_newcomer_starts(
    kubeconfig: Path, namespace: str, tmp_path: Path, admin: httpx.Client
) -> None:
    # kubectl delete lease while the command runs: a contender started right
    # after finds no lock and creates it, so the old command must be gone first.
    beats, log = Beats(tmp_path), tmp_path / "holds"
    common = ["--kubeconfig", str(kubeconfig), "--name", "deleted", *SHORT]
    holder = spawn(
        [*common, "--id", "holder", "--grace-period", "60s", *beats.command()],
        stderr=subprocess.PIPE,
    )
    newcomer: subprocess.Popen[str] | None = None
    try:
        wait_for(beats.started, what="the holder's command and its grandchild")
        path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/deleted"
        admin.delete(path).raise_for_status()
        newcomer = spawn([*common, "--id", "newcomer", *hold_command("newcomer", 0, log)])
        assert holder.wait(timeout=60) == EXIT_LEASE_LOST
        assert newcomer.wait(timeout=60) == 0
        ((_, started, _),) = read_intervals(log)
        assert beats.last() < started  # leader and grandchild both, before the next command
        assert holder.stderr is not None
        assert "deleted" in holder.stderr.read()
    finally:
        for process in (holder, newcomer):
            if process is not None:
                process.kill()
