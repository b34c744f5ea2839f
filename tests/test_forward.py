"""Logits against Hugging Face transformers (the independent oracle), all formats and dtypes."""

import numpy as np
import pytest
from helpers import BACKEND, TINY_CONFIGS, causal_reference_logits, rng_ids

import minillm
from minillm.convert import convert


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_folder_matches_transformers(tiny_dir, name):
    folder, ref_model = tiny_dir(name)
    model = minillm.load(folder, backend=BACKEND)
    ids = rng_ids(50, model.config.vocab_size)
    ours = model.logits(ids)
    assert ours.dtype == np.float32 and ours.shape == (50, model.config.vocab_size)
    np.testing.assert_allclose(ours, causal_reference_logits(ref_model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_single_file_matches_transformers(tiny_dir, tmp_path, name, dtype):
    folder, ref_model = tiny_dir(name)
    out = convert(folder, tmp_path / f"{name}.safetensors", dtype=dtype)
    model = minillm.load(out, backend=BACKEND)
    ids = rng_ids(40, model.config.vocab_size, seed=1)
    np.testing.assert_allclose(model.logits(ids), causal_reference_logits(ref_model, ids, dtype),
                               atol=1e-4, rtol=0)


def test_sharded_folder(tiny_dir, tmp_path):
    _, ref_model = tiny_dir("gqa")
    folder = tmp_path / "sharded"
    ref_model.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").exists()
    (folder / "tokenizer.json").write_bytes((tiny_dir("gqa")[0] / "tokenizer.json").read_bytes())
    model = minillm.load(folder, backend=BACKEND)
    ids = rng_ids(30, model.config.vocab_size, seed=2)
    np.testing.assert_allclose(model.logits(ids), causal_reference_logits(ref_model, ids),
                               atol=1e-4, rtol=0)


@pytest.mark.skipif(BACKEND != "numpy", reason="memory mapping is the CPU backend's")
def test_float32_file_is_memory_mapped(tiny_dir, tmp_path):
    out = convert(tiny_dir("gqa")[0], tmp_path / "m.safetensors")
    model = minillm.load(out, backend=BACKEND)
    base = model.weights.layers[0].wq
    while base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)


@pytest.mark.skipif(BACKEND != "numpy", reason="memory mapping is the CPU backend's")
def test_fused_matrices_are_views_of_a_converted_file(tiny_dir, tmp_path):
    """convert writes q|k|v and gate|up back to back, so the fused GEMM weights cost no copy."""
    out = convert(tiny_dir("gqa")[0], tmp_path / "m.safetensors")
    lw = minillm.load(out, backend=BACKEND).weights.layers[1]
    for fused in (lw.w_qkv, lw.w_gate_up):
        base = fused
        while base is not None and not isinstance(base, np.memmap):
            base = base.base
        assert isinstance(base, np.memmap)
    assert np.shares_memory(lw.w_qkv, lw.wv) and np.shares_memory(lw.w_gate_up, lw.w_up)


def test_rope_angles_exact_at_huge_positions(tiny_model):
    """cos/sin at position 10^8 computed in float64: a float32 angle would be off by radians."""
    from minillm.rope import cos_sin
    pos = 100_000_007
    cos, _ = cos_sin([pos], tiny_model.freq)
    exact = np.cos(np.float64(pos) * tiny_model.freq)
    np.testing.assert_allclose(cos[0], exact, atol=1e-6)
    sloppy = np.cos(np.float32(pos) * tiny_model.freq.astype(np.float32))
    assert np.abs(sloppy - exact).max() > 1e-2  # the test would notice float32 angles
