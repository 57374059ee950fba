import os

import torch

# No GPU in CI: Triton kernels run under the interpreter on CPU tensors. Set before any
# `triton.jit` decoration happens (it reads the variable then).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
