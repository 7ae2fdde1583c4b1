"""The engine on CUDA: greedy parity with HF transformers in bf16, CUDA graphs vs eager, bf16 by
default, and the KV cache sized from gpu_memory_utilization.

The model is a small random Llama (GQA 8:2, head_dim 64) saved as safetensors by transformers
itself, with a word-level tokenizer (no tokenizer is downloadable here).
"""

from __future__ import annotations

import gc
import logging

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

transformers = pytest.importorskip("transformers")

VOCAB = 4096
CONFIG = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
              vocab_size=VOCAB, rms_norm_eps=1e-5, rope_theta=10000.0, initializer_range=0.05,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=None)
MAX_TOKENS = 32


def save_word_tokenizer(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(
        path)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """(checkpoint dir, the HF model in bf16 on CUDA)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    model = model.to(torch.bfloat16).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path, safe_serialization=True)
    save_word_tokenizer(path)
    return str(path), model.cuda()


def random_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def make_llm(path: str, **kwargs):
    from pagedllm import LLM

    kwargs.setdefault("num_gpu_blocks_override", 1024)
    kwargs.setdefault("max_num_seqs", 16)
    return LLM(path, swap_space=0.25, **kwargs)


def generate(llm, prompts, logprobs=None):
    from pagedllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            logprobs=logprobs)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def free_gpu():
    gc.collect()
    torch.cuda.empty_cache()


def test_bf16_and_cuda_by_default(tiny_llama):
    from pagedllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=tiny_llama[0]).create_engine_config()
    assert config.device == "cuda" and config.model.dtype == "bfloat16"
    assert not config.enforce_eager


@pytest.mark.parametrize("engine_kwargs", [dict(), dict(max_num_batched_tokens=64)],
                         ids=["batched", "chunked"])
def test_greedy_parity_with_hf_in_bf16(tiny_llama, engine_kwargs):
    """vLLM's rule for low precision: tokens agree up to the first divergence, and there each
    side's token is among the other's top-5 logprobs. A random model's next-token
    distribution is nearly flat, so divergence comes early; the logprobs are checked too:
    HF, teacher-forced on our tokens, must give each of them nearly our logprob."""
    path, hf = tiny_llama
    prompts = random_prompts([1, 7, 16, 33, 150, 400], seed=1)
    llm = make_llm(path, **engine_kwargs)
    ours = generate(llm, prompts, logprobs=5)
    agree, diffs = [], []
    for i, (prompt, out) in enumerate(zip(prompts, ours)):
        x = torch.tensor([prompt], device="cuda")
        with torch.inference_mode():
            ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_TOKENS,
                              do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)
        hf_tokens = ref.sequences[0, len(prompt):].tolist()
        our_tokens = out.outputs[0].token_ids
        assert len(our_tokens) == len(hf_tokens) == MAX_TOKENS
        t = next((t for t, (a, b) in enumerate(zip(hf_tokens, our_tokens)) if a != b), None)
        agree.append(MAX_TOKENS if t is None else t)
        if t is not None:
            a, b = hf_tokens[t], our_tokens[t]
            hf_top5 = torch.log_softmax(ref.logits[t][0].float(), -1).topk(5).indices.tolist()
            our_top = set(out.outputs[0].logprobs[t])  # our top-5 + the chosen token
            assert b in hf_top5, f"prompt {i} step {t}: ours {b} not in HF top-5 {hf_top5}"
            assert a in our_top, f"prompt {i} step {t}: HF {a} not in our top-5 {our_top}"
        # Teacher forcing: HF's logprob of each of our tokens, after our own tokens.
        seq = torch.tensor([prompt + our_tokens], device="cuda")
        with torch.inference_mode():
            logits = hf(seq).logits[0, len(prompt) - 1:-1].float()
        hf_lp = torch.log_softmax(logits, -1)[torch.arange(MAX_TOKENS), our_tokens]
        our_lp = [out.outputs[0].logprobs[j][tok].logprob for j, tok in enumerate(our_tokens)]
        diffs.append((hf_lp.cpu() - torch.tensor(our_lp)).abs())
    diffs = torch.cat(diffs)
    print(f"tokens agreeing before the first divergence: {agree}; |logprob diff| mean "
          f"{diffs.mean():.4f}, max {diffs.max():.4f}")
    assert diffs.mean() < 0.1 and diffs.max() < 0.5, (agree, diffs)
    del llm
    free_gpu()


@pytest.mark.parametrize("engine_kwargs", [
    dict(),  # 13 prompts: decode batches padded to 16, then smaller as nothing finishes early
    dict(max_num_batched_tokens=64),  # chunked prefill: mixed prefill + decode steps
    dict(num_gpu_blocks_override=40),  # too few blocks: preemption and recompute
], ids=["batched", "chunked", "preempted"])
def test_cuda_graphs_and_eager_give_identical_tokens(tiny_llama, engine_kwargs):
    """Graphs and eager run the same padded buffers: the same bits, so the same greedy tokens.
    The third batch repeats prompts of the first (prefix-cache hits: chunks that start past
    cached blocks) and arrives while nothing else runs; the second is one short prompt."""
    from pagedllm.worker.cuda_graph import capture_sizes, token_buckets

    path, _ = tiny_llama
    first = random_prompts([5 + 11 * i for i in range(13)], seed=2)
    batches = [first, random_prompts([9], seed=3),
               random_prompts([20, 3, 64, 128, 17], seed=4) + [p + [7, 8] for p in first[6:9]]]
    results = {}
    for eager in (False, True):
        llm = make_llm(path, enforce_eager=eager, **engine_kwargs)
        runner = llm.llm_engine.engine_core.executor.runner.graph_runner
        shapes = set(runner.graph_shapes())
        assert set(runner.graphs) == (set() if eager else shapes)
        sc = llm.llm_engine.config.scheduler
        assert {s.num_tokens for s in shapes if s.decode} == set(capture_sizes(16))
        assert {s.num_tokens for s in shapes if not s.decode} == set(
            token_buckets(sc.max_num_batched_tokens))
        steps = []
        run = runner.run
        runner.run = lambda step, _run=run, _steps=steps: _steps.append(step.shape) or _run(step)
        results[eager] = [[o.outputs[0].token_ids for o in generate(llm, b)] for b in batches]
        assert sum(s.decode for s in steps) >= MAX_TOKENS  # decode-only steps took this path
        assert any(not s.decode for s in steps)  # and so did prefill and mixed steps
        assert all(s in shapes for s in steps)  # every step had a captured shape
        if "num_gpu_blocks_override" in engine_kwargs:
            assert llm.get_metrics()["num_preemptions_total"] > 0
        else:
            assert llm.get_metrics()["prefix_cache_hits_total"] > 0
        llm.llm_engine.engine_core.block_manager.check_integrity()
        del llm, runner
        free_gpu()
    assert results[False] == results[True]


@pytest.mark.parametrize("engine_kwargs", [
    dict(max_num_batched_tokens=64),  # chunked prefill: mixed steps fed from the device
    dict(num_gpu_blocks_override=40),  # preemption while a step is in flight
    dict(max_num_seqs=1, stop=True),  # stop ids: one wasted row after each stop
], ids=["chunked", "preempted", "stop-ids"])
def test_async_scheduling_gives_the_tokens_of_synchronous_steps(tiny_llama, engine_kwargs):
    """Async steps take each decode input from the previous step's device tensor and read
    tokens back through pinned memory one step late; the tokens must be those of synchronous
    steps. Sequences that end by length free their rows when their last step is launched,
    so both modes run the same batches, and bf16 gives the same bits. A stop id is seen one
    step late (a wasted row), which changes the batches, and bf16 GEMMs are not batch
    invariant: that case runs one sequence at a time, where the batches agree again."""
    from pagedllm import SamplingParams

    path, _ = tiny_llama
    kwargs = dict(engine_kwargs)
    stop = kwargs.pop("stop", False)
    prompts = random_prompts([5 + 11 * i for i in range(13)], seed=7)
    stop_ids = list(range(3, VOCAB, 97)) if stop else []  # a random model hits some early
    params = [SamplingParams(temperature=0.0, max_tokens=8 + 3 * i, stop_token_ids=stop_ids,
                             ignore_eos=True) for i in range(len(prompts))]
    results = {}
    for async_scheduling in (False, True):
        llm = make_llm(path, async_scheduling=async_scheduling, **kwargs)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results[async_scheduling] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason)
                                     for o in outs]
        if "num_gpu_blocks_override" in kwargs:
            assert llm.get_metrics()["num_preemptions_total"] > 0
        llm.llm_engine.engine_core.block_manager.check_integrity()
        del llm
        free_gpu()
    reasons = [r for _, r in results[False]]
    assert ("stop" in reasons) == stop and "length" in reasons, reasons
    assert results[True] == results[False]


def test_mixed_graphs_match_the_flat_batch(tiny_llama):
    """Padding changes GEMM shapes, so the padded steps need not give the flat path's bits;
    the greedy tokens of a chunked, mixed workload still agree with the flat eager path up to
    near-ties (as in the HF parity test: the other side's token is in our top-5)."""
    path, _ = tiny_llama
    prompts = random_prompts([5 + 23 * i for i in range(10)], seed=6)
    outs = {}
    for flat in (False, True):
        llm = make_llm(path, max_num_batched_tokens=128)
        if flat:  # the flat batch of prepare_inputs, as on a CPU
            llm.llm_engine.engine_core.executor.runner.graph_runner = None
        outs[flat] = generate(llm, prompts, logprobs=5)
        del llm
        free_gpu()
    for a, b in zip(outs[False], outs[True]):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        t = next((t for t, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
        if t is not None:
            assert ta[t] in b.outputs[0].logprobs[t] and tb[t] in a.outputs[0].logprobs[t]


def test_kv_cache_is_sized_from_gpu_memory_utilization(tiny_llama, caplog):
    free_gpu()
    util = 0.3
    with caplog.at_level(logging.INFO):
        llm = make_llm(tiny_llama[0], gpu_memory_utilization=util, num_gpu_blocks_override=None)
    free, total = torch.cuda.mem_get_info()
    used = (total - free) / total
    num_blocks = llm.get_metrics()["num_gpu_blocks"]
    block_bytes = llm.llm_engine.engine_core.executor.runner.block_bytes()
    print(f"used {used:.3f} of the GPU at gpu_memory_utilization {util}; {num_blocks} blocks")
    assert "GPU memory:" in caplog.text and f"{num_blocks} blocks" in caplog.text
    # The KV cache takes nearly all of util * total (the model and activations are small).
    assert num_blocks * block_bytes > util * total - 2 * 2**30
    assert util - 0.03 <= used <= util + 0.01
    generate(llm, random_prompts([100], seed=5))  # and it runs
    del llm
    free_gpu()
