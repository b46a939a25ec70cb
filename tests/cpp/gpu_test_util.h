// Shared helpers for the GoogleTest suites: how many GPUs this machine has (0 on CI), and a
// macro that skips a GPU test with the reason instead of failing on a machine without one.
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

namespace tpext::testing {

inline int visible_gpu_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // no driver or no device: not an error for a CPU machine
    return 0;
  }
  return n;
}

// Ranks for the multi-rank schedule tests (one thread and GPU each): every visible GPU, up to the
// 8 of the largest box tpext runs on, so TP 4 and 8 run wherever the GPUs are there.
inline int tp_test_ranks() { return std::min(visible_gpu_count(), 8); }

// Fresh random values in [-1, 1): never test on zeros.
inline std::vector<float> random_floats(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

}  // namespace tpext::testing

#define TPEXT_REQUIRE_GPUS(n)                                                             \
  do {                                                                                    \
    int have_ = ::tpext::testing::visible_gpu_count();                                    \
    if (have_ < (n))                                                                      \
      GTEST_SKIP() << "needs " << (n) << " GPU(s), this machine has " << have_;           \
  } while (0)
