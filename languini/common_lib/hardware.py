"""Peak dense bf16/fp16 tensor-core throughput per accelerator, for MFU (model FLOPs utilisation).

Figures are the vendors' dense (no sparsity) tensor-core numbers for 16-bit inputs with fp32
accumulation, the precision of mixed-precision training (bf16 where the chip has it; fp16 on Volta and
Turing, which have no bf16). On the GeForce cards fp32 accumulation runs at half the rate of fp16
accumulation, so their figures are half of the headline fp16 ones: RTX 3090 71 (142 with fp16
accumulation), RTX 3090 Ti 80 (160).

Lookup is by a pattern that appears in the name `torch.cuda.get_device_name` returns as a whole word (not
inside a longer model number: "NVIDIA RTX A1000" is no A100), and the most specific (longest) matching
pattern wins, whatever the order of the table: "NVIDIA H200 NVL" is an H200 NVL, not an H200 SXM ("NVIDIA
H200"), and "NVIDIA GeForce RTX 3090 Ti" is not an RTX 3090. Unknown devices return None: callers say so,
or take `--peak_tflops`. These are 16-bit peaks: an fp32 (TF32) run's MFU against them reads low, and the
throughput tool says so.
"""

import re

# (substring of the device name, peak dense 16-bit tensor TFLOP/s with fp32 accumulation)
PEAK_BF16_TFLOPS = [
    ("V100-PCIE", 112.0),  # fp16 (Volta has no bf16)
    ("V100-SXM2", 125.0),  # fp16
    ("V100S", 130.0),  # fp16
    ("Tesla T4", 65.0),  # fp16 (Turing has no bf16)
    ("RTX 3090", 71.0),
    ("RTX 3090 Ti", 80.0),
    ("A100", 312.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # SXM: "NVIDIA H200"
]


def peak_tflops(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of the named device (the longest matching pattern), or None when unknown."""
    matches = [
        (len(pattern), tflops)
        for pattern, tflops in PEAK_BF16_TFLOPS
        if re.search(rf"(?<![a-z0-9]){re.escape(pattern.lower())}(?![a-z0-9])", device_name.lower())
    ]
    return max(matches)[1] if matches else None


def mfu(achieved_tflops: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved / peak, or None when the peak is unknown."""
    return achieved_tflops / peak if peak else None
