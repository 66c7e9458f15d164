"""Published Llama-family architectures, by name: the ``random`` model source builds them, and the ``hf``
source and the memory planner use them for well-known hub names when no config can be read offline."""

from __future__ import annotations

# The published configurations (hidden, intermediate, layers, heads, kv heads, vocab, context, rope theta, tied).
ARCHITECTURES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
                      tie_word_embeddings=False),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
                       tie_word_embeddings=False),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
                       tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048, max_position_embeddings=2048, rope_theta=10000.0,
                 tie_word_embeddings=False),
}


def llama_config(arch: str, **overrides):
    from transformers import LlamaConfig

    spec = dict(ARCHITECTURES[arch])
    rope_theta = spec.pop("rope_theta")
    return LlamaConfig(
        **spec, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        bos_token_id=1, eos_token_id=2, pad_token_id=2, **overrides
    )


# Hub names whose published config is one of the above (lower-case).
KNOWN_HUB_NAMES = {
    "nousresearch/llama-2-7b-chat-hf": "llama2-7b",
    "nousresearch/llama-2-7b-hf": "llama2-7b",
    "meta-llama/llama-2-7b-hf": "llama2-7b",
    "meta-llama/llama-2-7b-chat-hf": "llama2-7b",
    "nousresearch/llama-2-13b-chat-hf": "llama2-13b",
    "nousresearch/llama-2-13b-hf": "llama2-13b",
    "meta-llama/llama-2-13b-hf": "llama2-13b",
    "meta-llama/llama-2-13b-chat-hf": "llama2-13b",
    "nousresearch/llama-2-70b-chat-hf": "llama2-70b",
    "nousresearch/llama-2-70b-hf": "llama2-70b",
    "meta-llama/llama-2-70b-hf": "llama2-70b",
    "meta-llama/llama-2-70b-chat-hf": "llama2-70b",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
    "huggingfacetb/smollm2-135m": "smollm2-135m",
}
