"""Multi-process training without CUDA: a thin launcher around detectron2's ``launch``.

detectron2 0.6's ``launch`` asserts CUDA and hard-codes NCCL, and its ``create_ddp_model`` passes
``device_ids=[local_rank]``, which torch's DistributedDataParallel refuses for a CPU model. With
CUDA, :func:`launch` is detectron2's own, unchanged. Without CUDA it starts the same processes
itself with the gloo backend and detectron2's process-group conventions (global rank =
machine_rank * processes_per_machine + local_rank, one local group per machine), so
``--num-gpus N``, ``--num-machines``, ``--machine-rank`` and ``--dist-url`` mean on CPU what they
mean on GPUs. Done here at run time rather than in tools/install_detectron2.py's install-time
patch so that it works with any installed detectron2 (a user's own upstream build included)
without reinstalling it; upstream detectron2 later added a similar CPU path to its launch.

Each CPU process gets its share of the cores as torch threads (``cores // N``, at least 1): left
alone, every one of N processes would start a thread per core, oversubscribing the machine N
times (benchmarks/cpu_processes.py measures it). An explicit ``OMP_NUM_THREADS`` is kept.

Ending: after a normal return every process leaves together and nothing keeps a process group
past ``destroy_process_group`` (see :func:`_leave_process_groups`); when one process fails, the
others get :data:`STOP_GRACE` to stop on their own (log and say why) before they are terminated.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

__all__ = ["launch", "cpu_ddp_model", "cpu_ddp", "threads_per_process", "available_cores"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)
#: seconds the other processes of a machine get to stop on their own once one has failed
STOP_GRACE = 30.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's or taskset's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads_per_process(processes: int, cores: Optional[int] = None,
                        environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """Torch threads for each of ``processes`` on one machine: the cores shared out, at least 1;
    ``None`` where ``OMP_NUM_THREADS`` is set (the user's choice, which torch already follows)."""
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS", "").strip():
        return None
    return max(1, (available_cores() if cores is None else cores) // max(1, processes))


def _leave_process_groups() -> None:
    """Leave together and destroy every process group while the interpreter is fully alive.

    A gloo group destroyed only during interpreter finalization can abort the process ("terminate
    called without an active exception", SIGABRT: test_distributed's resumed run, once, under
    load), which reads as a failed run although the work was done. ``destroy_process_group`` alone
    does not prevent it, because three references outlive it: the trainer sits in reference
    cycles (its hooks hold its bound methods), so its DDP model, whose reducer holds the group,
    lives until some later gc run; detectron2's ``comm._LOCAL_PROCESS_GROUP`` holds the local
    group; and ``comm._get_global_gloo_group`` is an ``lru_cache`` that holds the world group
    (every ``comm.all_gather``/``gather`` fills it). So: collect the cycles, meet at the barrier,
    drop detectron2's two references, destroy the groups, collect again.
    """
    gc.collect()
    comm.synchronize()
    comm._LOCAL_PROCESS_GROUP = None
    getattr(comm._get_global_gloo_group, "cache_clear", lambda: None)()
    dist.destroy_process_group()
    gc.collect()


def _cpu_worker(local_rank: int, main_func: Callable, world_size: int, per_machine: int, machine_rank: int,
                dist_url: str, args: Sequence[Any], timeout: timedelta, threads: Optional[int] = None) -> None:
    if threads:
        torch.set_num_threads(threads)
    rank = machine_rank * per_machine + local_rank
    dist.init_process_group("gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout)
    # detectron2's comm.get_local_rank/size read its local group: one group per machine, created
    # by every process in the same order (no local variable keeps one: see _leave_process_groups).
    for machine in range(world_size // per_machine):
        ranks = list(range(machine * per_machine, (machine + 1) * per_machine))
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = dist.new_group(ranks)
        else:
            dist.new_group(ranks)
    comm.synchronize()
    main_func(*args)
    # Not after an exception: the others may never arrive at the barrier.
    _leave_process_groups()


def launch(main_func: Callable, num_gpus_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: Optional[str] = None, args: Sequence[Any] = (), timeout: timedelta = DEFAULT_TIMEOUT) -> None:
    """detectron2's ``launch`` with CUDA; without it, ``num_gpus_per_machine`` CPU processes on gloo."""
    if torch.cuda.is_available():
        from detectron2.engine import launch as d2_launch

        return d2_launch(main_func, num_gpus_per_machine, num_machines=num_machines, machine_rank=machine_rank,
                         dist_url=dist_url, args=args, timeout=timeout)
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        return main_func(*args)
    if dist_url in (None, "", "auto"):
        if num_machines > 1:
            raise SystemExit("usdet launch: --dist-url auto works on one machine only; give every machine "
                             "tcp://HOST_OF_MACHINE_0:PORT")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    threads = threads_per_process(num_gpus_per_machine)
    logger.info("No CUDA: starting %d CPU process(es) on this machine (rank %d of %d machines), gloo backend, %s; "
                "%s torch thread(s) each", num_gpus_per_machine, machine_rank, num_machines, dist_url,
                threads if threads else f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    context = mp.start_processes(_cpu_worker, nprocs=num_gpus_per_machine, start_method="spawn", daemon=False,
                                 args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url,
                                       tuple(args), timeout, threads), join=False)
    try:
        # With a grace period: a failure seen by every rank (a NaN found through all_gather) stops
        # each on its own, but not at the same instant; without it torch terminates the slower ones
        # at once, before they log why.
        while not context.join(grace_period=STOP_GRACE):
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        # torch stopped the other processes of this machine; each printed its own message above.
        raise SystemExit(f"usdet: a training process failed, all processes on this machine were stopped "
                         f"({str(e).strip().splitlines()[0]})") from None


def cpu_ddp_model(create_ddp_model: Callable) -> Callable:
    """detectron2's ``create_ddp_model`` without ``device_ids`` for a CPU model (torch refuses them)."""

    def create(model: torch.nn.Module, **kwargs: Any):
        params = list(model.parameters())
        if params and params[0].device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return create_ddp_model(model, **kwargs)

    return create


@contextlib.contextmanager
def cpu_ddp() -> Iterator[None]:
    """While building a ``DefaultTrainer``: its DDP wrapping works for CPU models too."""
    from detectron2.engine import defaults

    original = defaults.create_ddp_model
    defaults.create_ddp_model = cpu_ddp_model(original)
    try:
        yield
    finally:
        defaults.create_ddp_model = original
