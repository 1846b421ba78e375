// Stand-in for the header a CUDA build of torch generates and a CPU wheel lacks. Used only by
// the compile check of csrc/**/*_ops_cuda.cpp against a CPU torch (see CMakeLists.txt); never
// linked into anything.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
