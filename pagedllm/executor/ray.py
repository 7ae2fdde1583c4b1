"""RayExecutor: rank 0 in the engine-core process, ranks 1.. as Ray actors in a placement group.

Uses the Ray cluster this process is connected to (ray.is_initialized(), or RAY_ADDRESS), else
starts a local one and stops it at shutdown. Steps do not go through Ray: each actor runs
worker.serve(), a loop on rank 0's control connection, and the collectives are torch.distributed
(gloo / NCCL) as with `mp`; Ray only places, starts, watches and kills the ranks. Actors die
with their owner (this process), so a crashed engine leaves none behind.
"""

from __future__ import annotations

import os

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pagedllm.executor.distributed import TIMEOUT_S, DistributedExecutor
from pagedllm.worker.worker import WorkerInit


@ray.remote
class RankActor:
    def pid(self) -> int:
        return os.getpid()

    def serve(self, init: WorkerInit) -> None:
        from pagedllm.worker.worker import serve

        serve(init)


class RayExecutor(DistributedExecutor):
    def __init__(self, config) -> None:
        self._own_cluster = False
        if not ray.is_initialized():
            # RAY_ADDRESS set: ray.init() joins that cluster; unset: it starts a local one.
            self._own_cluster = "RAY_ADDRESS" not in os.environ
            ray.init(log_to_driver=True, include_dashboard=False)
        # Ranks on other nodes reach rank 0 through this node's address.
        self.host = ray.util.get_node_ip_address()
        self._actors: dict[int, ray.actor.ActorHandle] = {}
        self._runs: dict[int, ray.ObjectRef] = {}
        self._pg = None
        super().__init__(config)

    def _device_index(self, rank: int) -> int:
        return 0  # Ray gives each actor its own GPU as the only visible one

    def _start_workers(self, inits: list[WorkerInit]) -> None:
        if not inits:
            return
        gpus = 1 if self.config.device == "cuda" else 0
        bundle = {"CPU": 1, "GPU": 1} if gpus else {"CPU": 1}
        self._pg = placement_group([bundle] * len(inits), strategy="PACK")
        ready, _ = ray.wait([self._pg.ready()], timeout=TIMEOUT_S)
        if not ready:
            raise RuntimeError(
                f"the Ray cluster cannot place {len(inits)} ranks of {bundle} within "
                f"{TIMEOUT_S:.0f} s (tensor_parallel_size={self.tp}; rank 0 runs here); "
                f"cluster resources: {ray.cluster_resources()}")
        for i, init in enumerate(inits):
            strategy = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i)
            actor = RankActor.options(num_cpus=1, num_gpus=gpus, scheduling_strategy=strategy,
                                      name=None).remote()
            self._actors[init.rank] = actor
            self._runs[init.rank] = actor.serve.remote(init)

    def _dead_workers(self) -> dict[int, str]:
        if not self._runs:
            return {}
        done, _ = ray.wait(list(self._runs.values()), num_returns=len(self._runs), timeout=0)
        dead = {}
        for rank, ref in self._runs.items():
            if ref in done:
                try:
                    ray.get(ref)
                    dead[rank] = "its actor returned"
                except Exception as e:  # RayActorError, or the rank's own exception
                    dead[rank] = f"Ray actor: {type(e).__name__}: {str(e).splitlines()[0]}"
        return dead

    def _stop_workers(self, timeout_s: float) -> None:
        if self._runs:
            ray.wait(list(self._runs.values()), num_returns=len(self._runs), timeout=timeout_s)
        for actor in self._actors.values():
            ray.kill(actor)
        if self._pg is not None:
            remove_placement_group(self._pg)
        self._actors, self._runs, self._pg = {}, {}, None
        if self._own_cluster:
            ray.shutdown()
