"""Peak dense bf16/fp16 tensor-core throughput per accelerator, for MFU (model FLOPs utilisation).

Figures are the vendors' dense (no sparsity) bf16 numbers. Lookup is by a substring of the device name
that `torch.cuda.get_device_name` returns; more specific patterns come first (an H100 PCIe is slower than
an H100 SXM). Unknown devices return None: callers say so, or take `--peak_tflops`.
"""

# (substring of the device name, peak dense bf16 TFLOP/s)
PEAK_BF16_TFLOPS = [
    ("RTX 3090", 71.0),
    ("A100", 312.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
]


def peak_tflops(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of the named device, or None when it is not in the table."""
    name = device_name.lower()
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if pattern.lower() in name:
            return tflops
    return None


def mfu(achieved_tflops: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved / peak, or None when the peak is unknown."""
    return achieved_tflops / peak if peak else None
