"""Session checkpoints (minillm.checkpoint): a saved and reloaded session continues the stream
exactly; foreign, damaged and format-1 files are refused with one clear line."""

import json

import numpy as np
import pytest
from helpers import BACKEND, rng_ids

import minillm
from minillm.checkpoint import write_checkpoint
from minillm.errors import MiniLLMError


def test_saved_session_continues_the_stream(tiny_model, tmp_path):
    ids = rng_ids(60, tiny_model.config.vocab_size, seed=11)
    whole = tiny_model.session(n_global=2, n_local=16).nll(ids, chunk_size=7)
    first = tiny_model.session(n_global=2, n_local=16)
    first.nll(ids[:37], chunk_size=7)
    first.save(tmp_path / "s.ckpt")
    resumed = minillm.Session.load(tmp_path / "s.ckpt", tiny_model)
    assert resumed.position == 37 and resumed.spec == first.spec
    np.testing.assert_allclose(resumed.nll(ids[37:], chunk_size=7), whole[37:], atol=1e-5)


def test_the_record_is_flat_and_carries_the_callers_keys(tiny_model, tmp_path):
    s = tiny_model.session(n_global=2, n_local=16)
    s.feed(rng_ids(20, tiny_model.config.vocab_size), logits="none")
    write_checkpoint(tmp_path / "s.ckpt", s, {"tokens": 20, "note": "x"})
    meta = json.loads(np.load(tmp_path / "s.ckpt")["meta"].tobytes())
    assert meta["format"] == 2 and meta["position"] == 20 and meta["n_local"] == 16
    assert meta["tokens"] == 20 and meta["note"] == "x"
    assert all(not isinstance(v, (dict, list)) for v in meta.values())
    with pytest.raises(ValueError, match="flat"):
        write_checkpoint(tmp_path / "t.ckpt", s, {"position": 3})
    with pytest.raises(ValueError, match="flat"):
        write_checkpoint(tmp_path / "t.ckpt", s, {"nested": {"a": 1}})


def test_format_1_is_refused(tiny_model, tmp_path):
    s = tiny_model.session(n_global=2, n_local=16)
    s.feed(rng_ids(20, tiny_model.config.vocab_size), logits="none")
    s.save(tmp_path / "s.ckpt")
    with np.load(tmp_path / "s.ckpt") as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(arrays.pop("meta").tobytes())
    old = {"format": 1, "model": meta["model"], "length": 20, "extra": "",
           "spec": {"preset": "lminfinite", "n_global": 2, "n_local": 16, "ceiling": 16}}
    with open(tmp_path / "old.ckpt", "wb") as f:
        np.savez(f, meta=np.frombuffer(json.dumps(old).encode(), np.uint8), **arrays)
    with pytest.raises(MiniLLMError, match="format 1.*start the run again"):
        minillm.Session.load(tmp_path / "old.ckpt", tiny_model)


def test_other_model_and_damaged_files_are_refused(tiny_model, tiny_dir, tmp_path):
    s = tiny_model.session(n_global=2, n_local=16)
    s.feed(rng_ids(20, tiny_model.config.vocab_size), logits="none")
    s.save(tmp_path / "s.ckpt")
    other = minillm.load(tiny_dir("mha_tied")[0], backend=BACKEND)
    with pytest.raises(MiniLLMError, match="another model"):
        minillm.Session.load(tmp_path / "s.ckpt", other)
    data = (tmp_path / "s.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[:len(data) // 2])
    with pytest.raises(MiniLLMError, match="not a minillm checkpoint"):
        minillm.Session.load(tmp_path / "cut.ckpt", tiny_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.ckpt", "s.ckpt"]  # no temporaries
