"""Fixes for two defects of Triton 3.6's CPU interpreter (`TRITON_INTERPRET=1`) that the kernels
run into; compiled kernels never import this module.

1. Scalars are 1-element arrays and become loop bounds through `int(array)`, which NumPy ≥ 2.4
   rejects, so `range(start, end)` over kernel arguments or loaded values fails.
2. `tl.dot` on bfloat16 multiplies the raw 16-bit patterns as integers (NumPy has no bfloat16).

Each fix is installed only where the defect is present, so a fixed Triton runs untouched.
"""

from __future__ import annotations

import numpy as np
import triton.language as tl
from triton.runtime import interpreter


def _bfloat16_as_float32(data: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32.
    return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _has_index_defect() -> bool:
    try:
        int(np.zeros(1))
    except TypeError:
        return True
    return False


def _has_bfloat16_dot_defect() -> bool:
    one = interpreter.TensorHandle(np.array([[0x3F80]], dtype=np.int16), tl.bfloat16)
    acc = interpreter.TensorHandle(np.zeros((1, 1), dtype=np.float32), tl.float32)
    product = interpreter.InterpreterBuilder().create_dot(one, one, acc, None, None)
    return product.data[0, 0] != 1.0


def install() -> None:
    if _has_index_defect():
        patch_tensor = interpreter._patch_lang_tensor

        def patch_tensor_with_item_index(tensor, scope):
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

        interpreter._patch_lang_tensor = patch_tensor_with_item_index

    if _has_bfloat16_dot_defect():
        create_dot = interpreter.InterpreterBuilder.create_dot

        def create_dot_widening_bfloat16(self, a, b, d, input_precision, max_num_imprecise_acc):
            if a.dtype == tl.bfloat16:
                a = interpreter.TensorHandle(_bfloat16_as_float32(a.data), tl.float32)
            if b.dtype == tl.bfloat16:
                b = interpreter.TensorHandle(_bfloat16_as_float32(b.data), tl.float32)
            return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

        interpreter.InterpreterBuilder.create_dot = create_dot_widening_bfloat16
