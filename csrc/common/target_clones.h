// SINKDLM_TARGET_CLONES(isa, ...): compile a function once per listed instruction set and pick the
// variant at load time (GCC on x86-64; elsewhere it compiles once), so one binary built for
// baseline x86-64 still uses the wide vectors where the CPU has them. Functions that take or
// return vectors must be inlined into the clone (see row_ops_cpu.cpp).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SINKDLM_TARGET_CLONES(...) __attribute__((target_clones(__VA_ARGS__)))
#else
#define SINKDLM_TARGET_CLONES(...)
#endif

// The two instruction-set lists. GCC contracts a * b + c into one FMA wherever the target has
// FMA (AVX-512F included), which changes the rounding. Code whose bits must equal those of code
// compiled without FMA (the remasking step's Philox noise, matched bit for bit by the CUDA kernel
// and the Python reference) is cloned for SINKDLM_ISAS_NO_FMA; remask_step_cpu.cpp clones all
// its loops for it.
#define SINKDLM_ISAS_FMA "avx512f", "avx2,fma", "default"
#define SINKDLM_ISAS_NO_FMA "avx2", "default"
