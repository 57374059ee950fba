"""Peak dense FLOP/s of one accelerator, looked up from its name, for MFU.

MFU is only worth reading against the right peak, so a device that is not in the table gets
none (MFU is left out of the metrics) rather than a guess. Values are the vendors' dense
(no structured sparsity) tensor-core peaks for bf16, and the non-tensor fp32 peaks for fp32
runs (TF32 matmuls are off in PyTorch by default). Names are matched as substrings of
`torch.cuda.get_device_name()` as whole words ("L4" is not "L40S"), most specific first.
"""

from __future__ import annotations

import re

# (name fragment, bf16 peak, fp32 peak)
_PEAKS: tuple[tuple[str, float, float], ...] = (
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): SXM 989 TF bf16 / 67 TF fp32;
    # NVL 835 / 60 (the sheet's 1979 and 1671 TF are with sparsity).
    ("H200 NVL", 835e12, 60e12),
    ("H200", 989.4e12, 67e12),
    # NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): SXM 989 / 67, NVL 835 / 60,
    # PCIe 756 / 51.
    ("H100 NVL", 835e12, 60e12),
    ("H100 PCIe", 756e12, 51e12),
    ("H100", 989.4e12, 67e12),
    # NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): 312 TF bf16, 19.5 TF fp32,
    # SXM and PCIe alike.
    ("A100", 312e12, 19.5e12),
    # NVIDIA L40S datasheet (nvidia.com/en-us/data-center/l40s): 362 TF bf16 (733 sparse),
    # 91.6 TF fp32.
    ("L40S", 362.05e12, 91.6e12),
    # NVIDIA L4 datasheet (nvidia.com/en-us/data-center/l4): 121 TF bf16 (242 sparse), 30.3 fp32.
    ("L4", 121e12, 30.3e12),
    # AMD Instinct MI300X and MI325X data sheets (amd.com/en/products/accelerators/instinct):
    # 1307.4 TF bf16 dense, 163.4 TF fp32 vector.
    ("MI300X", 1307.4e12, 163.4e12),
    ("MI325X", 1307.4e12, 163.4e12),
)


def peak_flops(device_name: str, bf16: bool) -> float | None:
    """The dense peak FLOP/s of the device named `device_name` in bf16 (else fp32), or None
    when the table does not know it."""
    for fragment, bf16_peak, fp32_peak in _PEAKS:
        if re.search(rf"\b{re.escape(fragment)}\b", device_name, re.IGNORECASE):
            return bf16_peak if bf16 else fp32_peak
    return None
