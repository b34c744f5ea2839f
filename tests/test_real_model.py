"""SmolLM2-135M-Instruct end to end: logits against transformers reading the same GGUF."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA

GPL3 = Path("/usr/share/common-licenses/GPL-3")


def real_text() -> str:
    for path in (SHARED_DATA / "news-from-nowhere.txt", GPL3):
        if path.is_file():
            return path.read_text(encoding="utf-8")[2000:6000]
    return "The quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture(scope="module")
def hf_gguf_model(smollm2_gguf_path):
    from transformers import AutoModelForCausalLM
    path = Path(smollm2_gguf_path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 torch_dtype=torch.float32)
    model.config._attn_implementation = "eager"
    return model.eval()


def test_logits_match_transformers_on_the_same_gguf(real_model, hf_gguf_model):
    ids = real_model.tokenizer.encode(real_text())[:300]
    assert len(ids) == 300
    ours = real_model.logits(ids)
    with torch.no_grad():
        ref = hf_gguf_model(torch.tensor(ids)[None]).logits[0].numpy()
    assert np.abs(ours - ref).max() < 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_lminfinite_session_equals_causal_within_the_window(real_model):
    ids = real_model.tokenizer.encode(real_text())[:200]
    causal = real_model.logits(ids)
    streamed = real_model.session().feed(ids, chunk_size=64)
    assert np.abs(causal - streamed).max() < 1e-3


def test_greedy_capital_of_france(real_model):
    from minillm.generate import generate_text
    from minillm.sampling import SamplingParams
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = real_model.tokenizer.encode(prompt, special=True)
    text = "".join(generate_text(real_model, real_model.session(), ids,
                                 SamplingParams(temperature=0, max_tokens=20)))
    assert "Paris" in text
