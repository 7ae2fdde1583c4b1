"""Beam search inside the engine, on fork + copy-on-write (the paper's Sec. 4.4).

Each live beam is a Sequence of one SequenceGroup. Once every live beam has new logits, one
beam step picks the next beams; the engine then applies the decision to the block tables:
  - a beam chosen k times continues as itself once and forks k - 1 times (blocks shared,
    ref_cnt += k - 1; the first write into a shared partial block copies it);
  - a beam chosen 0 times is dropped and its blocks are freed at once.

Selection follows HF transformers' `generate(num_beams=W, do_sample=False)`:
  candidates = the top K = max(2, 1 + #eos) * W of (beam score + log p(token)) over all beams;
  a candidate that ends (EOS, or max_tokens reached) and ranks in the top W becomes a finished
  hypothesis scored score / generated_len ** length_penalty (best W kept); the best W
  candidates that did not end are the next beams. The search stops when every candidate ends,
  or when W hypotheses are finished and the best beam can no longer beat the worst of them
  (HF's early_stopping=False heuristic).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.core.sequence import Sequence


@dataclass(slots=True)
class Hypothesis:
    token_ids: list[int]  # generated tokens (EOS included when it ended on one)
    score: float  # cum_logprob / len ** length_penalty
    cum_logprob: float
    ended_on_eos: bool


@dataclass(slots=True)
class BeamDecision:
    """How to turn the current beams into the next ones."""

    extend: list[tuple[Sequence, int, float]]  # (parent beam, token, new cum logprob)
    drop: list[Sequence]  # beams with no continuation
    done: bool


@dataclass
class BeamState:
    beam_width: int
    max_tokens: int
    length_penalty: float
    eos_token_ids: set[int]  # empty when ignore_eos
    finished: list[Hypothesis] = field(default_factory=list)
    improvable: bool = True  # HF's is_early_stop_heuristic_unsatisfied (sticky)
    # seq_id -> {token: logprob} of beams that have new logits, waiting for the others.
    pending: dict[int, dict[int, float]] = field(default_factory=dict)

    @property
    def num_candidates(self) -> int:
        return max(2, 1 + len(self.eos_token_ids)) * self.beam_width

    def step(self, beams: list[Sequence]) -> BeamDecision:
        """One beam step over the live beams (each has a pending top-K logprob row)."""
        width, k = self.beam_width, self.num_candidates
        cands = [(beam.cumulative_logprob + lp, beam, token)
                 for beam in beams for token, lp in self.pending.pop(beam.seq_id).items()]
        cands.sort(key=lambda c: -c[0])
        cands = cands[:k]
        gen_len = beams[0].num_output_tokens + 1  # all beams have the same length
        ends = [token in self.eos_token_ids or gen_len >= self.max_tokens
                for _, _, token in cands]

        if self.improvable:
            for rank, ((score, beam, token), end) in enumerate(zip(cands, ends)):
                if end and rank < width:
                    self.finished.append(Hypothesis(
                        beam.output_token_ids + [token], score / gen_len ** self.length_penalty,
                        score, token in self.eos_token_ids))
            self.finished.sort(key=lambda h: -h.score)
            del self.finished[width:]

        nxt = [c for c, end in zip(cands, ends) if not end][:width]
        if nxt and self.improvable:
            best_possible = nxt[0][0] / gen_len ** self.length_penalty
            worst_finished = self.finished[-1].score if len(self.finished) == width else -1e9
            self.improvable = best_possible > worst_finished
        done = not nxt or not self.improvable
        if done:
            return BeamDecision([], list(beams), True)
        chosen = {id(beam) for _, beam, _ in nxt}
        return BeamDecision([(beam, token, score) for score, beam, token in nxt],
                            [b for b in beams if id(b) not in chosen], False)

    def results(self) -> list[Hypothesis]:
        return sorted(self.finished, key=lambda h: -h.score)
