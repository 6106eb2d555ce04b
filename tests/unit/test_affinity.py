"""A CPU engine's OpenMP threads each keep a core: the settings a rank is spawned with, and a real
spawned process that imports torch under them."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from shardbento.engine.core.affinity import (
    USER_SETTINGS,
    child_environment,
    describe_threads,
    rank_binding,
    spread_over_cores,
    usable_cpus,
)


def test_one_cpu_rank_binds_a_thread_a_core() -> None:
    assert rank_binding("cpu", 1, 0, [0, 1, 2, 3], {}) == {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}


def test_tensor_parallel_cpu_ranks_take_a_cpu_each_in_the_order_given() -> None:
    places = [rank_binding("cpu", 3, rank, [3, 9, 5], {})["OMP_PLACES"] for rank in range(3)]
    assert places == ["{3}", "{9}", "{5}"]


@pytest.mark.parametrize(
    ("core_of", "order"),
    [
        (lambda cpu: cpu // 2, [2, 4, 6, 3, 5, 7]),  # siblings numbered next to each other
        (lambda cpu: cpu % 3, [2, 3, 4, 5, 6, 7]),  # siblings numbered a socket apart
        (lambda cpu: cpu, [2, 3, 4, 5, 6, 7]),  # no hyperthreads
    ],
)
def test_cpus_spread_over_cores_first(core_of, order: list[int]) -> None:
    """A cpuset {2..7}: ranks given one CPU each share no core while there are cores enough."""
    assert spread_over_cores([7, 6, 5, 4, 3, 2], core_of) == order


def test_usable_cpus_are_the_affinity_mask() -> None:
    assert sorted(usable_cpus()) == sorted(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("device", "world", "cpus", "environ"),
    [
        ("cuda", 1, [0, 1], {}),  # host threads of a GPU rank only launch kernels
        ("cpu", 3, [0, 1], {}),  # more ranks than CPUs share cores whatever the binding
        ("cpu", 1, [], {}),
        *[("cpu", 1, [0, 1], {name: "x"}) for name in USER_SETTINGS],  # the user's own placement wins
    ],
)
def test_no_binding(device: str, world: int, cpus: list[int], environ: dict[str, str]) -> None:
    assert rank_binding(device, world, 0, cpus, environ) == {}


def test_rank_log_says_how_its_threads_are_placed() -> None:
    bound = describe_threads("cpu", rank_binding("cpu", 1, 0, [0, 1], {}))
    assert bound.startswith("OpenMP threads bound (OMP_PROC_BIND=close, OMP_PLACES=cores;")
    assert "unbound (set: OMP_PROC_BIND;" in describe_threads("cpu", {"OMP_PROC_BIND": "false"})
    assert "unbound (set: GOMP_CPU_AFFINITY;" in describe_threads("cpu", {"GOMP_CPU_AFFINITY": "0-3"})
    assert "unbound (a GPU rank" in describe_threads("cuda", {})


def test_child_environment_restores_what_was_there(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_PLACES", "threads")
    monkeypatch.delenv("OMP_PROC_BIND", raising=False)
    with child_environment({"OMP_PLACES": "cores", "OMP_PROC_BIND": "close"}):
        assert (os.environ["OMP_PLACES"], os.environ["OMP_PROC_BIND"]) == ("cores", "close")
    assert os.environ["OMP_PLACES"] == "threads"
    assert "OMP_PROC_BIND" not in os.environ


def _thread_cpus(report) -> None:
    import torch

    torch.ones(1 << 20).add_(1)  # a parallel region: the OpenMP team exists
    cpus = [sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")]
    report.put((sorted(os.sched_getaffinity(0)), cpus, torch.get_num_threads()))


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux CPU affinity")
def test_spawned_process_keeps_its_threads_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spawned under the one-rank settings, the process's main thread keeps to the first usable core
    and its OpenMP worker to another; unbound (OMP_PROC_BIND=false) the main thread may use every CPU."""
    for name in USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    cpus = usable_cpus()
    context = multiprocessing.get_context("spawn")

    def spawn(settings: dict[str, str]) -> tuple[list[int], list[list[int]], int]:
        report = context.Queue()
        with child_environment(settings):
            process = context.Process(target=_thread_cpus, args=(report,))
            process.start()
        try:
            return report.get(timeout=120)
        finally:
            process.join(timeout=30)

    main, threads, num_threads = spawn(rank_binding("cpu", 1, 0, cpus, os.environ))
    if len(cpus) > 1:
        assert main[0] == min(cpus) and len(main) < len(cpus)
    if num_threads > 1:
        assert any(set(t).isdisjoint(main) for t in threads)  # a worker on a core of its own
    main, _, _ = spawn({"OMP_PROC_BIND": "false"})
    assert main == sorted(cpus)
