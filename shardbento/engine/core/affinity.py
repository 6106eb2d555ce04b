"""Where a CPU engine's OpenMP threads run: each on a core of its own, as vLLM's CPU worker binds its own.

Unbound, the kernel may stack two threads of one forward on a core while the other core runs something
else (the service process, a load generator, a second model); the forward then waits at each OpenMP
barrier for the stacked thread's turn. On a loaded machine that made rounds of decode steps up to 7 x
slower (docs/performance.md#cpu-threads). Bound, each thread keeps its core.

The variables are read when a process loads libgomp (on importing torch), so they are set for the
engine's processes when they are spawned, never in the service process itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path

# A user's own placement wins: any of these in the environment and the engine binds nothing.
USER_SETTINGS = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")


def rank_binding(
    device: str, world: int, rank: int, cpus: Sequence[int], environ: Mapping[str, str]
) -> dict[str, str]:
    """The OpenMP settings rank `rank` of `world` starts with: one thread a core over the cores this
    process may use for a single rank; CPU `cpus[rank]` for each of several one-thread ranks (tensor
    parallelism on CPU; `cpus` in usable_cpus' order). Nothing on GPU, where the host threads only
    launch kernels, nothing when the user set their own placement, and nothing when the ranks outnumber
    the CPUs (they would share cores whatever the binding)."""
    if device != "cpu" or any(name in environ for name in USER_SETTINGS) or not cpus:
        return {}
    if world == 1:
        return {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}
    if world > len(cpus):
        return {}
    return {"OMP_PROC_BIND": "true", "OMP_PLACES": f"{{{cpus[rank]}}}"}


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask: a container's cpuset, taskset), one of each
    physical core first, then their hyperthread siblings: ranks given one each share no core while
    there are cores enough."""
    return spread_over_cores(_allowed_cpus(), _core_of)


def spread_over_cores(cpus: Sequence[int], core_of: Callable[[int], Hashable]) -> list[int]:
    """`cpus` ordered by their rank among their core's CPUs, then by number: [0, 2, 1, 3] when CPUs 0
    and 1 are one core's two hardware threads and 2 and 3 another's."""
    seen: dict[Hashable, int] = {}
    order = []
    for cpu in sorted(cpus):
        core = core_of(cpu)
        order.append((seen.get(core, 0), cpu))
        seen[core] = seen.get(core, 0) + 1
    return [cpu for _, cpu in sorted(order)]


def _allowed_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _core_of(cpu: int) -> Hashable:
    topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
    try:
        return (topology / "physical_package_id").read_text().strip(), (
            topology / "core_id"
        ).read_text().strip()
    except OSError:
        return cpu  # no topology to read: each CPU its own core


def describe_threads(device: str, environ: Mapping[str, str]) -> str:
    """How this rank's OpenMP threads are placed (its startup log; the variables it was spawned with)."""
    bind = environ.get("OMP_PROC_BIND", "")
    where = f"the loop's thread on CPUs {_allowed_cpus()}"
    if bind and bind.lower() != "false":
        places = environ.get("OMP_PLACES", "unset")
        return f"OpenMP threads bound (OMP_PROC_BIND={bind}, OMP_PLACES={places}; {where}); OMP_PROC_BIND=false unbinds"
    own = [name for name in USER_SETTINGS if name in environ]
    why = "a GPU rank" if device != "cpu" else f"set: {', '.join(own)}" if own else "more ranks than CPUs"
    return f"OpenMP threads unbound ({why}; {where})"


@contextlib.contextmanager
def child_environment(extra: Mapping[str, str]) -> Iterator[None]:
    """`extra` in os.environ while a child process is spawned (it copies the environment), then the
    environment as it was."""
    saved = {name: os.environ.get(name) for name in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
