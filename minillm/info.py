"""What `minillm info` reports about a loaded model."""

from __future__ import annotations

import math

from .attention import attention_spec
from .cache import cache_bytes, session_bytes
from .middle import store_bytes_per_token


def parameter_count(cfg) -> int:
    from .weights import expected_shapes
    return sum(math.prod(s) for s in expected_shapes(cfg).values())


def default_cache_bytes(cfg) -> int:
    """Bytes of the default lminfinite cache (n_global=10, n_local=training length)."""
    spec = attention_spec(cfg)
    return cache_bytes(cfg, spec.n_global, spec.n_local)


def default_session_bytes(cfg, xp) -> int:
    """Bytes of a default session, cache and workspace: what Session checks before allocating."""
    spec = attention_spec(cfg)
    return session_bytes(cfg, spec.n_global, spec.n_local, xp)


def model_info(model) -> dict:
    cfg = model.config
    params = parameter_count(cfg)
    weights_mb = params * 4 / 1e6  # the CPU computes in float32
    cache_mb = default_cache_bytes(cfg) / 1e6
    session_mb = default_session_bytes(cfg, model.xp) / 1e6
    scaling = cfg.rope_scaling or {}
    return {
        "path": model.path,
        "architecture": "LlamaForCausalLM",
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling.get("rope_type", "none"),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "parameters": params,
        "stored_dtype": model.stored_dtype,
        "weights_mb_float32": round(weights_mb, 1),
        "default_cache_mb": round(cache_mb, 1),
        "memory_needed_mb": round(weights_mb + session_mb, 1),
        # top-k middle attention (off by default) keeps every token's keys and values of the
        # layers from 4 up on disk, float16
        "middle_store_bytes_per_token": round(store_bytes_per_token(cfg)),
        "middle_store_gb_per_1m_tokens": round(store_bytes_per_token(cfg) * 1e6 / 1e9, 2),
        "tokenizer_vocab": model.tokenizer.vocab_size,
        "add_bos": model.tokenizer.add_bos,
        "chat_template": bool(model.chat_template),
        "backend": model.backend,
    }
