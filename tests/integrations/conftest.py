"""Tiny random models of every supported family, and stock-vs-paged comparison fixtures.

Models are built from configs (no hub access), fp32 on CPU, with eager attention as the stock
oracle (gemma2's softcap needs it; sdpa and eager agree elsewhere). Kernels run on the torch
backend: the root conftest sets TRITON_INTERPRET=1, which would otherwise send CPU tensors to
the (slow) Triton interpreter; one test opts back in to prove the Triton kernels serve generate.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from pagedkv.integrations import disable_paged_attention, enable_paged_attention

VOCAB = 96
PAD, BOS, EOS = 0, 1, 2
BLOCK_SIZE = 4  # small, so a short generation crosses many block boundaries


def _decoder(**overrides):
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    cfg.update(overrides)
    return cfg


_GPT = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256)
_IDS = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)

# family -> config builder. Sliding windows are short (8) so the generations cross them.
FAMILIES: dict[str, Callable[[], tf.PretrainedConfig]] = {
    "llama": lambda: tf.LlamaConfig(**_decoder()),
    "mistral": lambda: tf.MistralConfig(**_decoder(sliding_window=8)),
    "mixtral": lambda: tf.MixtralConfig(
        **_decoder(num_local_experts=4, num_experts_per_tok=2, sliding_window=8)
    ),
    # layer 0 full, layer 1 sliding
    "qwen2": lambda: tf.Qwen2Config(
        **_decoder(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    ),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(
        **_decoder(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        )
    ),
    "qwen3": lambda: tf.Qwen3Config(
        **_decoder(head_dim=16, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    ),
    "gemma": lambda: tf.GemmaConfig(**_decoder(head_dim=16)),
    "gemma2": lambda: tf.Gemma2Config(
        **_decoder(
            head_dim=16,
            sliding_window=8,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        )
    ),
    "gemma3": lambda: tf.Gemma3TextConfig(
        **_decoder(
            head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]
        )
    ),
    "phi": lambda: tf.PhiConfig(**_decoder()),
    "phi3": lambda: tf.Phi3Config(**_decoder(sliding_window=8)),
    "gpt2": lambda: tf.GPT2Config(**_GPT, **_IDS),
    "gpt_neox": lambda: tf.GPTNeoXConfig(**_decoder(num_key_value_heads=None)),
    "gptj": lambda: tf.GPTJConfig(**_GPT, rotary_dim=8, **_IDS),
    "opt": lambda: tf.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
        **_IDS,
    ),
    "olmo2": lambda: tf.Olmo2Config(**_decoder()),
    "starcoder2": lambda: tf.Starcoder2Config(**_decoder(sliding_window=8)),
    "granite": lambda: tf.GraniteConfig(**_decoder()),
    "cohere": lambda: tf.CohereConfig(**_decoder()),
    "cohere2": lambda: tf.Cohere2Config(
        **_decoder(sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    ),
    # attention sinks (s_aux); layers alternate sliding and full
    "gpt_oss": lambda: tf.GptOssConfig(
        **_decoder(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8)
    ),
    "smollm3": lambda: tf.SmolLM3Config(**_decoder()),
    "stablelm": lambda: tf.StableLmConfig(**_decoder()),
}

# Attention outside transformers' registry (gptj too on transformers 5.17): they keep their own
# attention, which reads K/V that PagedCache.update gathers from the blocks.
GATHER_FAMILIES = ["falcon", "falcon_gqa", "bloom", "mpt"]
FAMILIES.update(
    falcon=lambda: tf.FalconConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **_IDS
    ),
    # the new decoder architecture: GQA with num_kv_heads (multi_query is ignored)
    falcon_gqa=lambda: tf.FalconConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        new_decoder_architecture=True,
        num_kv_heads=2,
        **_IDS,
    ),
    bloom=lambda: tf.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, **_IDS),
    # mpt defaults to use_cache=False; turn it on so generate runs on the cache
    mpt=lambda: tf.MptConfig(
        vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=256, use_cache=True, **_IDS
    ),
)


def build_model(family: str, seed: int = 0, attn_implementation: str = "eager") -> torch.nn.Module:
    builder = FAMILIES[family]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(builder(), attn_implementation=attn_implementation)
    return model.eval()


def uses_registry(model) -> bool:
    """Whether this transformers version routes the model's attention through the registry."""
    return all(
        m._can_set_attn_implementation()
        for m in model.modules()
        if isinstance(m, tf.PreTrainedModel)
    )


def cache_kwarg(model) -> str:
    """generate's cache argument: `cache` on transformers >= 5.24, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def padded_batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts (tokens avoid pad/bos/eos) and their attention mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[i, width - n :] = 1
    return ids, mask


# ---- fixtures -------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    monkeypatch.setenv("PAGEDKV_BACKEND", "torch")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Tiny models are faster on one thread, and far faster on a busy 2-core CI machine."""


def pytest_generate_tests(metafunc):
    if "family" in metafunc.fixturenames and not any(
        "family" in m.args[0] for m in metafunc.definition.iter_markers("parametrize")
    ):
        metafunc.parametrize("family", list(FAMILIES), ids=list(FAMILIES))


@pytest.fixture
def model(family):
    return build_model(family)


def _generate(model, seed, inputs, kwargs):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(**inputs, **kwargs)


@pytest.fixture
def stock_vs_paged():
    """`run(model, inputs, seed=0, enable=None, **generate_kwargs) -> (stock, paged, manager)`.

    Runs stock generate, enables paged attention (block_size 4 unless `enable` says otherwise),
    runs the same call under the same seed, and disables again. Outputs are dict-style
    (`return_dict_in_generate=True`, logits included). `run.blocks` then lists, per forward of
    the paged call, (blocks in use, blocks the rows would hold without sharing), of the first
    KV cache group (full attention, unless every layer slides).
    """

    def record(manager, module, args, kwargs, output):
        cache = kwargs.get("cache")
        if cache is None:
            cache = kwargs.get("past_key_values")
        private = sum(-(-manager.seq_len(s) // manager.config.block_size) for s in cache.seq_ids)
        run.blocks.append((manager.allocators[0].num_used_blocks, private))

    def run(model, inputs, seed=0, enable=None, **kwargs):
        kwargs = {
            "return_dict_in_generate": True,
            "output_logits": True,
            "pad_token_id": PAD,
            **kwargs,
        }
        stock = _generate(model, seed, inputs, kwargs)
        manager = enable_paged_attention(model, **{"block_size": BLOCK_SIZE, **(enable or {})})
        run.blocks = []
        hook = model.register_forward_hook(functools.partial(record, manager), with_kwargs=True)
        try:
            paged = _generate(model, seed, inputs, kwargs)
        finally:
            hook.remove()
            disable_paged_attention(model)
        return stock, paged, manager

    return run


def assert_same_generation(stock, paged, atol: float = 1e-4) -> None:
    """Identical tokens; per-step logits within `atol`."""
    assert torch.equal(stock.sequences, paged.sequences), (
        f"tokens differ:\nstock {stock.sequences.tolist()}\npaged {paged.sequences.tolist()}"
    )
    assert len(stock.logits) == len(paged.logits)
    for step, (a, b) in enumerate(zip(stock.logits, paged.logits, strict=True)):
        diff = (a - b).abs().max().item()
        assert diff <= atol, f"step {step}: logits differ by {diff:.3g} > {atol}"


@pytest.fixture
def same_generation():
    return assert_same_generation


@pytest.fixture
def helpers():
    """Module-level helpers for tests (conftest is not importable under importlib mode)."""

    class _Helpers:
        build_model = staticmethod(build_model)
        padded_batch = staticmethod(padded_batch)
        cache_kwarg = staticmethod(cache_kwarg)
        uses_registry = staticmethod(uses_registry)
        gather_families = GATHER_FAMILIES
        families = list(FAMILIES)
        block_size = BLOCK_SIZE
        pad, eos = PAD, EOS

    return _Helpers
