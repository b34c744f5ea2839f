"""A SmolLM2-shaped Hugging Face folder with random weights, for the device checks."""
import json
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent  # smol_config.json and smol/ (the SmolLM2 tokenizer)
FOLDER = "/tmp/smol"


def save_random_model(folder: str) -> dict:
    """A SmolLM2-shaped Hugging Face folder with random weights; returns its config."""
    cfg = json.loads((HERE / "smol_config.json").read_text())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**cfg)).eval().save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(HERE / "smol" / f, folder)
    return cfg
