// The Python module sinkdlm._C. Loading it runs the TORCH_LIBRARY registrations in
// csrc/*/*_ops.cpp, which is what exposes torch.ops.sinkdlm.*; the module itself only
// reports how it was built and which bf16 GEMMs the CPU kernels pick. This file includes
// pybind11 alone, not torch, so it compiles fast.
#include <pybind11/pybind11.h>

#include <string>

#include "common/cpu_context.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "sinkdlm native operators (registered as torch.ops.sinkdlm.*)";
  m.def(
      "build_info",
      []() {
        py::dict info;
        info["cpu"] = true;
        info["cuda_compiled"] = static_cast<bool>(SINKDLM_CUDA_COMPILED);
        info["cuda_linked"] = static_cast<bool>(SINKDLM_CUDA_LINKED);
        info["cuda_archs"] = std::string(SINKDLM_CUDA_ARCHS);
        return info;
      },
      "Which backends this build of sinkdlm._C contains.");
  m.def(
      "cpu_bf16_gemm", []() { return std::string(sinkdlm::cpu_bf16_gemm_name()); },
      "The GEMM kernels sinkdlm's native CPU kernel runs bfloat16 on here: 'avx512_bf16' "
      "(vdpbf16ps), 'fp32' (sgemm on converted tiles) or 'portable' (cpu_context.h's rule and "
      "SINKDLM_CPU_BF16_GEMM, which the ops read when they first run).");
}
