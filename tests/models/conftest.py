"""Tiny random checkpoints of every family, saved by transformers itself (fp32), and the HF
oracles the parity tests compare with: logits of one forward pass, and a greedy loop that runs
the whole sequence through HF's forward at every step (no KV cache on the HF side)."""

from __future__ import annotations

import pytest
import torch
import transformers

from pagedllm.forward_context import AttentionMetadata, forward_context
from pagedllm.layers.attention import Attention

VOCAB = 384
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
            max_position_embeddings=256, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
GQA = dict(intermediate_size=128, num_key_value_heads=2)

# name -> (transformers model class, config class, config fields beyond TINY)
FAMILIES = {
    "opt": (transformers.OPTForCausalLM, transformers.OPTConfig, dict(ffn_dim=128)),  # pre-LN
    # opt-350m: post-LN, tokens embedded in 32 dims and projected in/out of the hidden 64
    "opt-350m": (transformers.OPTForCausalLM, transformers.OPTConfig,
                 dict(ffn_dim=128, do_layer_norm_before=False, word_embed_proj_dim=32)),
    "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config, dict(n_inner=128)),
    # head_dim 32 != hidden / heads, tied embeddings
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config,
              dict(GQA, head_dim=32, tie_word_embeddings=True)),
    "phi3": (transformers.Phi3ForCausalLM, transformers.Phi3Config, GQA),
    # a window of 32 tokens (Phi-3-mini-4k has 2047), shorter than the longer prompts
    "phi3-partial-rotary-window": (transformers.Phi3ForCausalLM, transformers.Phi3Config,
                                   dict(GQA, partial_rotary_factor=0.5, sliding_window=32)),
    "mixtral-window": (transformers.MixtralForCausalLM, transformers.MixtralConfig,
                       dict(GQA, intermediate_size=96, num_local_experts=4,
                            num_experts_per_tok=2, sliding_window=32)),
    # layer 0 sparse (4 experts + shared expert), layer 1 dense
    "qwen2-moe": (transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig,
                  dict(GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=64, mlp_only_layers=[1])),
    "qwen2-moe-norm-topk": (transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig,
                            dict(GQA, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                 norm_topk_prob=True)),
}

# Mixed lengths: several blocks of 16, a partial last block, and one shorter than a block.
PROMPT_LENS = (5, 19, 33, 47)


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
    """family name -> (checkpoint directory, the HF model it was saved from); built once."""
    made: dict[str, tuple[str, torch.nn.Module]] = {}
    tokenizer = []

    def get(name: str) -> tuple[str, torch.nn.Module]:
        if name not in made:
            from pagedllm.loader import default_model_path, load_tokenizer

            if not tokenizer:  # the engine needs one; SmolLM2's covers the small vocabulary
                tokenizer.append(load_tokenizer(default_model_path(), "gguf"))
            model_cls, config_cls, extra = FAMILIES[name]
            torch.manual_seed(0)
            model = model_cls(config_cls(**TINY, **extra)).eval()
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path, safe_serialization=True)
            tokenizer[0].save_pretrained(path)
            made[name] = (str(path), model)
        return made[name]

    return get


@torch.inference_mode()
def hf_greedy(model, ids: list[int], max_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the log-probabilities [max_tokens, vocab] they were chosen from."""
    ids, logprobs = list(ids), []
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1]
        logprobs.append(torch.log_softmax(logits.float(), dim=-1))
        ids.append(int(logits.argmax()))
    return ids[-max_tokens:], torch.stack(logprobs)


class OneSequence:
    """Drives a pagedllm model by hand through one sequence: prefill chunks and decode steps
    over a private paged KV cache (block table 0, 1, 2, ...), as the runner would."""

    def __init__(self, model: torch.nn.Module, max_len: int, block_size: int = 16) -> None:
        self.model, self.block_size, self.num_computed = model, block_size, 0
        num_blocks = -(-max_len // block_size)
        self.block_table = torch.arange(num_blocks, dtype=torch.int32)[None]
        for layer in model.modules():
            if isinstance(layer, Attention):
                layer.kv_cache = torch.zeros(2, num_blocks, block_size, layer.num_kv_heads,
                                             layer.head_dim)

    @torch.inference_mode()
    def step(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [len(token_ids), vocab] of the next tokens (a decode step if one token)."""
        start, n = self.num_computed, len(token_ids)
        positions = torch.arange(start, start + n)
        meta = AttentionMetadata(
            slot_mapping=positions.clone(), block_tables=self.block_table,
            seq_lens=torch.tensor([start + n], dtype=torch.int32),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32),
            max_query_len=n, max_seq_len=start + n)
        with forward_context(meta):
            hidden = self.model(torch.tensor(token_ids), positions)
        self.num_computed += n
        return self.model.compute_logits(hidden)
