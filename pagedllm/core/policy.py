"""Scheduling policies: who is admitted first and who is preempted first (no torch here).

A policy ranks sequence groups; the smaller rank is served first. The scheduler keeps `waiting`
and `running` in rank order: admission takes the head of `waiting`, preemption the tail of
`running` (so the victim is the group the policy would have admitted last).

    policy     rank                                                     fixed at arrival?
    fcfs       (arrival_time,)                                          yes
    priority   (priority, arrival_time)   smaller value = more important  yes
    sjf        (predicted output tokens + aging_rate * arrival_step,     yes (see NOTE)
                arrival_time)
    fair       (the client's virtual token counter, arrival_time)       no: counters grow

`priority` is strict, as vLLM's: a waiting group that cannot get blocks preempts running
groups of a larger priority value (Scheduler._preempt_for_waiting). `sjf` and `fair` only
order admission and preemption.

NOTE (sjf ageing): a group that has waited w steps ranks as if aging_rate * w tokens shorter.
Every waiting group gains the same credit per step, so ranking by predicted + aging_rate *
arrival_step (the step it arrived at) orders them exactly as predicted - aging_rate * w would,
at every step: the key is fixed when the group arrives and the queues stay sorted by insort.
A long request waits at most (its prediction - a newcomer's) / aging_rate steps behind
requests that arrive after it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from pagedllm.core.sequence import SequenceGroup, SequenceStatus

if TYPE_CHECKING:
    from pagedllm.config import SchedulerConfig

POLICIES = ("fcfs", "priority", "sjf", "fair")
LENGTH_PREDICTORS = ("oracle", "online")
DEFAULT_AGING_RATE = 0.5  # predicted tokens forgiven per step waited (benchmarks/scheduling.py)
DEFAULT_FAIR_WEIGHTS = (1.0, 2.0)  # VTC's prefill and decode token weights (the paper's)


class OutputLengthPredictor(Protocol):
    """Predicts how many tokens a request will generate (SJF's ranking key)."""

    def predict(self, group: SequenceGroup) -> float: ...

    def observe(self, group: SequenceGroup, num_output_tokens: int) -> None:
        """A request finished (by length or stop) after `num_output_tokens` tokens."""


class OraclePredictor:
    """The request's max_tokens: its true output length when it runs to it (a replay with
    ignore_eos, as benchmarks/scheduling.py runs), an upper bound otherwise."""

    def predict(self, group: SequenceGroup) -> float:
        return float(group.max_tokens)

    def observe(self, group: SequenceGroup, num_output_tokens: int) -> None:
        pass


class BucketPredictor:
    """Online statistics: the mean output length of finished requests whose prompt length fell
    in the same power-of-two bucket, shrunk toward the mean over all finished requests by
    `prior_weight` pseudo-requests (a bucket with few samples predicts near the global mean);
    0 before anything finished. It never reads max_tokens: in a replay that is the answer."""

    def __init__(self, prior_weight: float = 8.0) -> None:
        self.prior_weight = prior_weight
        self.buckets: dict[int, list[float]] = {}  # bucket -> [count, sum of output lengths]
        self.count = 0
        self.total = 0.0

    @staticmethod
    def bucket(num_prompt_tokens: int) -> int:
        return num_prompt_tokens.bit_length()  # [2^(b-1), 2^b)

    def predict(self, group: SequenceGroup) -> float:
        if not self.count:
            return 0.0
        mean = self.total / self.count
        n, s = self.buckets.get(self.bucket(group.seqs[0].num_prompt_tokens), (0, 0.0))
        return (s + self.prior_weight * mean) / (n + self.prior_weight)

    def observe(self, group: SequenceGroup, num_output_tokens: int) -> None:
        stats = self.buckets.setdefault(self.bucket(group.seqs[0].num_prompt_tokens), [0, 0.0])
        stats[0] += 1
        stats[1] += num_output_tokens
        self.count += 1
        self.total += num_output_tokens


class SchedulingPolicy:
    """First come, first served; the base of the others. `fixed`: a group's rank never changes
    while it is queued (else the scheduler re-sorts `running` every step and takes the
    minimum of `waiting`)."""

    fixed = True
    preempts_for_waiting = False

    def rank(self, group: SequenceGroup) -> tuple:
        return (group.arrival_time,)

    def on_add(self, group: SequenceGroup, queues: tuple[list[SequenceGroup], ...]) -> None:
        """A request enters the scheduler (`queues`: waiting, running, swapped, without it)."""

    def on_step(self) -> None:
        """A step's planning begins."""

    def on_planned(self, entries: list) -> None:
        """A group's tokens of this step were planned (ScheduledSeq entries, not yet run)."""

    def on_finished(self, group: SequenceGroup) -> None:
        """A request left the scheduler finished (all its tokens read back)."""


class PriorityPolicy(SchedulingPolicy):
    preempts_for_waiting = True

    def rank(self, group: SequenceGroup) -> tuple:
        return (group.priority, group.arrival_time)


class ShortestJobFirst(SchedulingPolicy):
    """Shortest predicted output first, with ageing (the module's NOTE). The prediction is
    made once, when the request arrives, and kept in `group.predicted_output_len`."""

    def __init__(self, predictor: OutputLengthPredictor, aging_rate: float) -> None:
        self.predictor = predictor
        self.aging_rate = aging_rate
        self.step = 0  # steps planned so far: the ageing clock

    def rank(self, group: SequenceGroup) -> tuple:
        return (group.predicted_output_len + self.aging_rate * group.arrival_step,
                group.arrival_time)

    def on_add(self, group: SequenceGroup, queues) -> None:
        if group.predicted_output_len is None:  # not again when isolation re-adds it
            group.predicted_output_len = self.predictor.predict(group)
            group.arrival_step = self.step

    def on_step(self) -> None:
        self.step += 1

    def on_finished(self, group: SequenceGroup) -> None:
        if any(s.status is SequenceStatus.FINISHED_ABORTED for s in group.seqs):
            return  # cut short: not its length
        self.predictor.observe(group, max(s.num_output_tokens for s in group.seqs))


class VirtualTokenCounter(SchedulingPolicy):
    """Fairness between clients (`group.user`; None is one client), VTC (Sheng et al., OSDI'24):
    each client's counter grows by the tokens the engine computes for it, prompt tokens at
    `prefill_weight` and sampled tokens at `decode_weight`; the client with the smallest
    counter is admitted first, the one with the largest preempted first.

    Charged as each group's step is planned: prompt positions computed before the request's first
    output token (prefix-cache hits are free; a recompute of a preempted request's prompt and
    outputs is not charged again) and one decode token per sampled sequence. A client that
    arrives with nothing queued is lifted to the smallest counter of the active clients (to
    the largest counter of all when none is active), so time away banks no credit."""

    fixed = False

    def __init__(self, prefill_weight: float, decode_weight: float) -> None:
        self.prefill_weight = prefill_weight
        self.decode_weight = decode_weight
        self.counters: dict[str | None, float] = {}

    def rank(self, group: SequenceGroup) -> tuple:
        return (self.counters[group.user], group.arrival_time)

    def on_add(self, group: SequenceGroup, queues) -> None:
        active = {g.user for queue in queues for g in queue}
        if group.user in active:
            return
        c = self.counters
        floor = min(c[u] for u in active) if active else max(c.values(), default=0.0)
        c[group.user] = max(c.get(group.user, 0.0), floor)

    def on_planned(self, entries: list) -> None:
        for e in entries:
            seq = e.seq
            prefill = 0
            if seq.num_output_tokens == 0:
                start = seq.num_computed_tokens
                prefill = max(0, min(start + e.num_new_tokens, seq.num_prompt_tokens) - start)
            sampled = 1 + len(e.forks) if e.samples else 0
            self.counters[e.group.user] += (self.prefill_weight * prefill
                                            + self.decode_weight * sampled)


def create_policy(config: SchedulerConfig,
                  predictor: OutputLengthPredictor | None = None) -> SchedulingPolicy:
    """The policy `config.policy` names; `predictor` overrides config.length_predictor (sjf)."""
    if config.policy == "priority":
        return PriorityPolicy()
    if config.policy == "sjf":
        if predictor is None:
            predictor = (OraclePredictor() if config.length_predictor == "oracle"
                         else BucketPredictor())
        rate = DEFAULT_AGING_RATE if config.aging_rate is None else config.aging_rate
        return ShortestJobFirst(predictor, rate)
    if config.policy == "fair":
        return VirtualTokenCounter(*(config.fair_weights or DEFAULT_FAIR_WEIGHTS))
    assert config.policy == "fcfs", config.policy
    return SchedulingPolicy()


def check_policy_options(config: SchedulerConfig) -> None:
    """An option of another policy is an error, not silently ignored."""
    if config.policy not in POLICIES:
        raise ValueError(f"scheduling policy must be one of {', '.join(POLICIES)}, "
                         f"got {config.policy!r}")
    for name, owner in (("length_predictor", "sjf"), ("aging_rate", "sjf"),
                        ("fair_weights", "fair")):
        if getattr(config, name) is not None and config.policy != owner:
            raise ValueError(f"{name} applies to the {owner!r} scheduling policy only "
                             f"(policy is {config.policy!r})")
    if config.length_predictor not in (None, *LENGTH_PREDICTORS):
        raise ValueError(f"length_predictor must be one of {', '.join(LENGTH_PREDICTORS)}, "
                         f"got {config.length_predictor!r}")
    if config.aging_rate is not None and not config.aging_rate >= 0:
        raise ValueError(f"aging_rate must be >= 0, got {config.aging_rate}")
    if config.fair_weights is not None and (
            len(config.fair_weights) != 2 or not all(w >= 0 for w in config.fair_weights)
            or not any(w > 0 for w in config.fair_weights)):
        raise ValueError("fair_weights must be two weights >= 0 (prefill, decode), not both 0, "
                         f"got {config.fair_weights}")


def control_admission(waiting: list[SequenceGroup], arrivals: list[SequenceGroup],
                      cap_n: int | None, cap_tokens: int | None
                      ) -> tuple[list[SequenceGroup], list[tuple[SequenceGroup, str]]]:
    """(kept, refused with a reason) among the requests added since the last step: those still
    waiting after it are refused, in the order they came, while the waiting queue would hold
    more than `cap_n` requests or `cap_tokens` uncomputed tokens. Requests that waited before
    (preempted ones among them) are never refused: only arrivals, which nothing was sent for."""
    new = {id(g) for g in arrivals}
    n, tokens = 0, 0
    for group in waiting:
        if id(group) not in new:
            n += 1
            tokens += sum(s.num_tokens - s.num_computed_tokens for s in group.live_seqs())
    in_waiting = {id(g) for g in waiting}
    kept, refused = [], []
    for group in arrivals:
        if group.is_finished:
            continue  # aborted before this step
        if id(group) in in_waiting:
            need = sum(s.num_tokens for s in group.live_seqs())
            over = (f"{n} requests wait (max_waiting={cap_n})"
                    if cap_n is not None and n + 1 > cap_n else
                    f"{tokens} prompt tokens wait and this request adds {need} "
                    f"(max_queued_tokens={cap_tokens})"
                    if cap_tokens is not None and tokens + need > cap_tokens else None)
            if over is not None:
                refused.append((group, f"the server is busy: {over}; retry later"))
                continue
            n, tokens = n + 1, tokens + need
        kept.append(group)
    return kept, refused
