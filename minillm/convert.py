"""Conversion: any model minillm reads, written as one self-contained minillm .safetensors file."""

from __future__ import annotations

from .config import Config
from .files import model_files, prepare_output, refuse_overlaps
from .formats import open_model, single_file
from .formats.safetensors import DTYPE_NAMES, write_safetensors
from .weights import check_source, expected_shapes


def convert(src_path, out_path, dtype: str = "float32") -> str:
    """Write `src_path` (GGUF, HF folder or its model.safetensors, or a minillm file: converted
    again, e.g. to another dtype) as one self-contained file."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, not {dtype!r}")
    # nothing is opened for writing before the output is known not to be the source
    refuse_overlaps({"the output": str(out_path)}, {"the source": model_files(str(src_path))})
    prepare_output(str(out_path))
    src = open_model(src_path)
    cfg = Config.from_dict(src.config, source=str(src_path))
    check_source(src, cfg, str(src_path))  # refuse a bad model before writing anything
    # minillm's tensor order, so that the fused q|k|v and gate|up matrices are views of the file
    names = list(expected_shapes(cfg))
    write_safetensors(str(out_path), [(k, src.shape(k)) for k in names], src.tensor,
                      dtype=dtype, metadata=single_file.metadata(src, cfg.to_json()))
    return str(out_path)
