"""Pure quantization functions (torch only, plus adapterkit.errors), each with a reference.

* :mod:`.pack`: 1/2/4/8-bit codes packed into uint8 bytes;
* :mod:`.normal`: Gaussian-codebook quantization of adapter weights (Jie et al., 2023);
* :mod:`.uniform`: int8 / int4 weight-only quantization of base weights (absmax / min-max);
* :mod:`.groups`: per-tensor / per-channel / group-wise statistics.
"""
from .groups import check_group_size, group_view, num_groups
from .normal import (
    dequantize_normal,
    dequantize_normal_reference,
    fake_quantize_normal,
    normal_codebook,
    quantize_normal,
    quantize_normal_reference,
)
from .pack import BITS, check_bits, pack_bits, pack_bits_reference, packed_size, unpack_bits, unpack_bits_reference
from .uniform import (
    INT_BITS,
    SCHEMES,
    dequantize_int,
    dequantize_int_reference,
    int_range,
    quantize_int,
    quantize_int_reference,
)

__all__ = [
    "BITS", "INT_BITS", "SCHEMES", "check_bits", "check_group_size", "dequantize_int", "dequantize_int_reference",
    "dequantize_normal", "dequantize_normal_reference", "fake_quantize_normal", "group_view", "int_range",
    "normal_codebook", "num_groups", "pack_bits", "pack_bits_reference", "packed_size", "quantize_int",
    "quantize_int_reference", "quantize_normal", "quantize_normal_reference", "unpack_bits", "unpack_bits_reference",
]
