"""llama.cpp's quantization grid as a PyTorch projection, for quantization-aware distillation: a weight matrix is
quantized by llama.cpp's own quantizer (`ggml_quantize_chunk`, from the ggml library inside the installed `llama_cpp`
bindings) and dequantized by the `gguf` package, so every type both know is projected exactly as llama.cpp writes it
into a GGUF file, with no re-implementation of the formats."""
from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from distill.core.errors import require_package

INSTALL = "bash scripts/setup.sh (it builds llama-cpp-python once and caches the wheel)"


@functools.cache
def ggml():
    """The ggml library the bindings load, with the two functions used here typed as ggml.h declares them."""
    bindings = require_package("llama_cpp", "fake quantization on llama.cpp's grid needs llama.cpp's bindings,",
                               INSTALL)
    library = ctypes.CDLL(str(Path(bindings.__file__).parent / "lib" / "libggml-base.so"))
    library.ggml_quantize_chunk.restype = ctypes.c_size_t
    library.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    library.ggml_row_size.restype = ctypes.c_size_t
    library.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    library.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    library.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return library


def gguf_package():
    return require_package("gguf", "fake quantization on llama.cpp's grid needs", INSTALL)


def projectable(ggml_type: int) -> bool:
    """Whether a tensor type can be projected here: the `gguf` package dequantizes it and llama.cpp quantizes it
    without an importance matrix."""
    gguf = gguf_package()
    known = {gguf.GGMLQuantizationType.F16, *gguf.quants._type_traits}  # the types `dequantize` handles
    return ggml_type in {int(t) for t in known} and not ggml().ggml_quantize_requires_imatrix(ggml_type)


def project(weight: np.ndarray, ggml_type: int, threads: int = 1) -> np.ndarray:
    """`weight` (rows, columns; float32) quantized to `ggml_type` row by row, as llama.cpp's quantizer does, and
    dequantized back to float32; `threads` quantize slices of the rows side by side (ctypes lets go of the GIL)."""
    gguf = gguf_package()
    kind = gguf.GGMLQuantizationType(ggml_type)
    rows, columns = weight.shape
    if columns % gguf.GGML_QUANT_SIZES[kind][0]:
        raise ValueError(f"rows of {columns} values do not fill {kind.name}'s blocks of {gguf.GGML_QUANT_SIZES[kind][0]}")
    source = np.ascontiguousarray(weight, dtype=np.float32)
    row_bytes = ggml().ggml_row_size(ggml_type, columns)
    packed = np.empty((rows, row_bytes), dtype=np.uint8)

    def quantize(first: int, count: int) -> None:
        # both pointers are the whole arrays': llama.cpp offsets them by `start` itself
        ggml().ggml_quantize_chunk(ggml_type, source.ctypes.data, packed.ctypes.data, first * columns, count, columns,
                                   None)

    step = -(-rows // threads)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(quantize, range(0, rows, step), [min(step, rows - first) for first in range(0, rows, step)]))
    return gguf.quants.dequantize(packed, kind).reshape(rows, columns)


class GridProjection(torch.nn.Module):
    """A parametrization (`torch.nn.utils.parametrize`) that puts a weight on llama.cpp's grid of `ggml_type` in the
    forward pass and hands the gradient to the latent weight unchanged (straight-through). With `via_f16` the weight
    is rounded to float16 first, as the export's quantizer reads it from the F16 file. The projection is kept until
    the latent weight changes (an optimizer step or a loaded checkpoint bumps its version), so the many reads of one
    step quantize once."""

    def __init__(self, ggml_type: int, via_f16: bool):
        super().__init__()
        self.ggml_type, self.via_f16 = ggml_type, via_f16
        self._kept: tuple = (None, None)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version)
        if self._kept[0] != key:
            self._kept = (key, self.projected(weight.detach()))
        return weight + (self._kept[1] - weight).detach()

    def projected(self, weight: torch.Tensor) -> torch.Tensor:
        source = weight.float().cpu()
        if self.via_f16:
            source = source.half().float()
        grid = project(source.numpy(), self.ggml_type, torch.get_num_threads())
        return torch.from_numpy(grid).to(device=weight.device, dtype=weight.dtype)
