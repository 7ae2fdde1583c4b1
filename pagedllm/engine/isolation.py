"""When a step raises, find the request that made it fail and fail that one alone.

A step runs many requests in one batch, so an exception inside it (the sampler indexing with a
bad id, a seed that overflows, a model bug one prompt length triggers) names no request. The
core hands the step's requests to StepIsolation, which

  1. takes each of them out of the scheduler (blocks freed, tokens kept: a recompute
     preemption), unless the step ran only one request, which is then guilty at once;
  2. runs them one at a time, each in steps of its own, until it has sampled a token: a solo
     step that raises is that request's fault, it fails with the error, and the rest go on;
     one that passes rejoins the batches.

Failures that are not a request's fault stay fatal (the core dies, /health turns 503): a step
that ran no request, an executor whose workers are gone, an accelerator error (a CUDA context
is unusable after one). A request suspected in `MAX_SUSPICIONS` failed batches that passed
alone each time is failed too, so a failure that shows only in batches cannot loop forever.
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from typing import TYPE_CHECKING

import torch

from pagedllm.core.sequence import SequenceGroup, SequenceStatus
from pagedllm.engine.protocol import EngineCoreOutput

if TYPE_CHECKING:
    from pagedllm.engine.core import EngineCore

logger = logging.getLogger("pagedllm")

MAX_SUSPICIONS = 3


def is_engine_failure(exc: BaseException) -> bool:
    """An error no request can be blamed for: the device or its context is gone."""
    accel = getattr(torch, "AcceleratorError", None)
    return (accel is not None and isinstance(exc, accel)) or "CUDA error" in str(exc) or "device-side assert" in str(exc)


class StepIsolation:
    def __init__(self, core: EngineCore) -> None:
        # A proxy, not a reference: a cycle would keep the whole engine (weights, KV cache)
        # alive until the cyclic GC ran, long after its LLM was dropped.
        self.core = weakref.proxy(core)
        self.quarantine: deque[SequenceGroup] = deque()  # out of the scheduler, to run alone
        self.suspicions: dict[str, int] = {}
        self.num_isolated_failures = 0  # requests failed because a step raised on them

    def __len__(self) -> int:
        return len(self.quarantine)

    def remove(self, request_id: str) -> SequenceGroup | None:
        """An aborted request leaves the quarantine (it holds no blocks)."""
        for group in self.quarantine:
            if group.request_id == request_id:
                self.quarantine.remove(group)
                for seq in group.live_seqs():
                    seq.status = SequenceStatus.FINISHED_ABORTED
                return group
        return None

    def recover(self, exc: Exception, groups: list[SequenceGroup]) -> list[EngineCoreOutput]:
        """A batched step raised `exc` while running `groups`. Re-raise if no request can be
        blamed; else fail the one request, or quarantine them all to run alone."""
        core = self.core
        groups = [g for g in groups if g.request_id in core.requests]
        self._raise_if_engine_failure(exc)
        if not groups:
            raise exc
        logger.warning("a step of %d request(s) failed (%r); running them one at a time to "
                       "find the cause", len(groups), exc)
        outputs = []
        for group in groups:
            core.scheduler.evict(group)
            # n > 1 forks made by the failed step have no core state yet: they are forked
            # again when the first token is due.
            group.seqs = [s for s in group.seqs if s.data is not None] or group.seqs[:1]
            if group.data.beam is not None:
                group.data.beam.pending.clear()  # logits of the failed step, if any came
            for seq in group.seqs:
                if seq.num_output_placeholders:  # async scheduling: a token that never came
                    if seq.is_finished:
                        seq.status = SequenceStatus.WAITING  # it ended by length at launch
                    seq.drop_placeholders()
            n = self.suspicions[group.request_id] = self.suspicions.get(group.request_id, 0) + 1
            if len(groups) == 1 or n >= MAX_SUSPICIONS:
                outputs.append(self._fail(group, exc, alone=len(groups) == 1))
            else:
                self.quarantine.append(group)
        return outputs

    def trial(self) -> list[EngineCoreOutput] | None:
        """Run the first quarantined request alone until it samples a token. None if its
        tokens do not fit in the blocks others hold now (a normal step runs instead)."""
        core = self.core
        group = self.quarantine[0]
        core.scheduler.add(group)
        outputs: list[EngineCoreOutput] = []
        while True:
            out = core.scheduler.schedule_solo(group)
            if not out.scheduled:
                core.scheduler.evict(group)
                return outputs or None
            try:
                outputs += core.run_scheduled(out)
            except Exception as exc:
                core.stats["step_failures_total"] += 1
                self._raise_if_engine_failure(exc)
                self.quarantine.popleft()
                core.scheduler.evict(group)
                return outputs + [self._fail(group, exc, alone=True)]
            if group.request_id not in core.requests or any(e.samples for e in out.scheduled):
                self.quarantine.popleft()  # cleared: it rejoins the batches
                logger.info("request %s ran alone without error; back in the batches",
                            group.request_id)
                return outputs

    def _raise_if_engine_failure(self, exc: Exception) -> None:
        """Re-raise `exc` if no request can be blamed: a worker is gone (every request is
        lost, not one) or the device failed."""
        try:
            self.core.executor.check_health()
        except Exception:
            raise exc from None
        if is_engine_failure(exc):
            raise exc

    def _fail(self, group: SequenceGroup, exc: Exception, alone: bool) -> EngineCoreOutput:
        self.suspicions.pop(group.request_id, None)
        self.num_isolated_failures += 1
        for seq in group.live_seqs():
            seq.status = SequenceStatus.FINISHED_ABORTED
        why = "the engine step failed on this request" if alone else (
            f"this request was in {MAX_SUSPICIONS} engine steps that failed (it ran alone "
            "without error)")
        return self.core.fail(group, f"{why}: {type(exc).__name__}: {exc}")
