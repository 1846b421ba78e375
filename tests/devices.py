"""Device parameters shared by the tests: CUDA cases are always collected and skip with a reason."""

import pytest
import torch

import sinkdlm


def cuda_native() -> bool:
    """A GPU is present and sinkdlm's CUDA kernels are linked (torch is a CUDA build)."""
    return torch.cuda.is_available() and sinkdlm._C.build_info()["cuda_linked"]


def devices(native_cuda: bool = True) -> list:
    """``["cpu", "cuda"]`` as pytest params; the CUDA one skips without a GPU (or, when
    ``native_cuda``, without sinkdlm's CUDA kernels linked)."""
    if native_cuda:
        skip, reason = not cuda_native(), "needs a GPU and sinkdlm built against a CUDA torch"
    else:
        skip, reason = not torch.cuda.is_available(), "needs a GPU"
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(skip, reason=reason))]
