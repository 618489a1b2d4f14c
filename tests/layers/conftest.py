"""Without a CUDA device the Triton kernels (attention, MoE, the layer ops) run under the Triton interpreter, which must be switched on
before triton is first imported: ``@triton.jit`` reads ``TRITON_INTERPRET`` when it decorates, and
triton.language decorates its own helpers on import."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
