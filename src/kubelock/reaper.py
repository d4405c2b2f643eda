"""Reaping orphaned processes when kubelock is PID 1 (a container's entrypoint).

Orphans are reparented to PID 1 (or to the nearest subreaper); unreaped,
they stay zombies. As PID 1, kubelock reaps them, by scanning ``/proc`` for
zombie children and waiting for each one by PID, so the status of a process
somebody else waits for (the command kubelock runs, an auth plugin in another
thread) is never stolen. A one-file executable's launcher may be PID 1
instead: then kubelock makes itself a subreaper (``prctl``) and reaps in its place.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys

import trio

__all__ = [
    "become_subreaper",
    "is_init",
    "outer_process_is_init",
    "reap_orphans",
    "reap_zombies",
    "registry",
]

logger = logging.getLogger("kubelock")


class _Registry:
    """Which PIDs are ours to wait for, so the orphan reaper leaves them alone."""

    def __init__(self) -> None:
        self.children: set[int] = set()
        self.spawning = 0  # a spawn in flight: its PID is not known yet


#: The one registry: :class:`~kubelock.process.Child` adds and removes its PIDs.
registry = _Registry()


def is_init() -> bool:
    """True when kubelock is PID 1 (a container's entrypoint) and must reap orphans."""
    return os.getpid() == 1


def outer_process_is_init() -> bool:
    """A one-file executable whose launcher is PID 1: become the reaper in its place.

    PyInstaller's one-file launcher runs kubelock as its child and does not reap
    orphans; as a subreaper, kubelock receives them instead.
    """
    if not getattr(sys, "frozen", False) or os.getppid() != 1:
        return False
    try:
        become_subreaper()
    except OSError:
        return False
    return True


def become_subreaper() -> None:
    """Make orphaned descendants reparent to this process, as to PID 1 (Linux only)."""
    pr_set_child_subreaper = 36
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


def reap_zombies() -> list[int]:
    """Reap orphaned zombies reparented to us; return their PIDs. Not a checkpoint.

    Never a child kubelock waits for itself (:class:`Child`), and never a
    process in kubelock's own process group (such as an auth plugin another
    thread is waiting for): only those PIDs are waited for, one by one, so no
    status is stolen from their owners.
    """
    if registry.spawning:
        return []  # a new child's PID is not registered yet: come back later
    me, my_group = os.getpid(), os.getpgrp()
    reaped: list[int] = []
    for pid, state, group in _children_of(me):
        if state != "Z" or group == my_group or pid in registry.children:
            continue
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                reaped.append(pid)
    if reaped:
        logger.debug("reaped orphaned processes %s", reaped)
    return reaped


def _children_of(parent: int) -> list[tuple[int, str, int]]:
    """``(pid, state, process group)`` of each child of ``parent``, from /proc."""
    found = []
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    text = stat.read().decode(errors="replace")
            except OSError:  # it went away while we looked
                continue
            # The command name in parentheses may hold spaces or ')': split after the last one.
            fields = text.rpartition(")")[2].split()
            if len(fields) >= 3 and int(fields[1]) == parent:
                found.append((int(entry.name), fields[0], int(fields[2])))
    return found


async def reap_orphans(
    *,
    interval: float = 1.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Reap orphaned grandchildren (see :func:`reap_zombies`) until cancelled.

    Wakes on SIGCHLD, and every ``interval`` seconds in case one was missed.
    Start it only as PID 1 or a subreaper (:func:`is_init`, :func:`become_subreaper`).
    """
    with trio.open_signal_receiver(signal.SIGCHLD) as sigchld:
        task_status.started()
        while True:
            reap_zombies()
            with trio.move_on_after(interval):
                await anext(aiter(sigchld))
