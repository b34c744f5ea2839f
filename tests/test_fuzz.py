"""The file readers under fuzzing (tests/fuzz): every input that once broke a reader is replayed
(tests/fuzz_corpus), and a few derandomized hypothesis examples run per reader. A reader must
load a file or refuse it with one MiniLLMError line: no other exception, no hang, no allocation
of what the file merely declares. `make fuzz` runs the long campaign."""

import pytest
from fuzz import corpus, mutate, runner, targets
from fuzz.seeds import build_seeds

import minillm

# a fixed, small number: the same inputs on every run, a few seconds in all
EXAMPLES = 20
CORPUS = corpus.entries()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return build_seeds(tmp_path_factory.mktemp("fuzz_seeds"))


@pytest.fixture(scope="module")
def seed_model(seeds):
    """The model the checkpoint seeds belong to."""
    return minillm.load(seeds.model_file, backend="numpy")


def test_the_corpus_is_small():
    assert len(CORPUS) >= 20
    assert sum(path.stat().st_size for _, path in CORPUS) < 100_000


@pytest.mark.parametrize("reader, path", CORPUS, ids=[f"{r}/{p.stem}" for r, p in CORPUS])
def test_corpus_input(reader, path, seeds, seed_model):
    """Refused with one clean line (or loaded) exactly as when the bug was fixed."""
    entry = corpus.load(path)
    outcome = targets.check(reader, mutate.apply(seeds, entry), seed_model)
    assert outcome == entry.get("expect", outcome), entry["found"]


@pytest.mark.parametrize("reader", mutate.READERS)
def test_fuzz(reader, seeds, seed_model):
    result = runner.fuzz(reader, seeds, seed_model, EXAMPLES)
    assert result.inputs >= EXAMPLES


@pytest.mark.parametrize("reader", mutate.READERS)
def test_seeds_load(reader, seeds, seed_model):
    for name in mutate.SEEDS_OF[reader]:
        assert targets.check(reader, seeds.bytes(name), seed_model) == "loaded", name


@pytest.mark.parametrize("name", ["gguf_bpe", "gguf_spm"])
def test_gguf_mutator_writes_the_seed_back_exactly(seeds, name):
    """The mutator's GGUF writer, on the layout the `gguf` package reads, gives back the very
    bytes the package's GGUFWriter wrote: its field offsets are where the format puts them."""
    data, fields = mutate.gguf_bytes(mutate.gguf_layout(seeds.path(name)))
    assert data == seeds.bytes(name)
    assert fields["tensor_count"] == [(8, 8)] and fields["kv_count"] == [(16, 8)]


def test_a_hang_and_an_allocation_are_reader_bugs(monkeypatch, seeds, seed_model):
    """The bounds themselves work: a reader that sleeps past the time limit, or allocates past
    the memory limit, fails the check."""
    import time

    import numpy as np

    data = seeds.bytes("single_f32")
    monkeypatch.setattr(targets, "TIME_LIMIT", 0.2)
    monkeypatch.setattr(targets, "open_model", lambda path: time.sleep(5))
    with pytest.raises(targets.ReaderBug, match="hang"):
        targets.check("safetensors", data)
    # zeros: the pages are never touched, the allocation still counts (the reader then goes
    # on to load the model: time enough for that on a busy machine)
    monkeypatch.setattr(targets, "TIME_LIMIT", 30)
    monkeypatch.setattr(targets, "open_model", lambda path: np.zeros(300 << 20, np.uint8))
    with pytest.raises(targets.ReaderBug, match="allocated"):
        targets.check("safetensors", data)
