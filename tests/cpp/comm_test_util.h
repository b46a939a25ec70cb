// Helpers for the Communicator suites: owning wrappers for device memory, streams and pinned host
// memory (freed on their own device, whatever the calling thread's current device is), host
// conversion between double and every DataType, and an element-wise comparison that reports the
// first mismatches instead of dumping megabytes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "core/device_guard.h"
#include "core/dtype.h"
#include "core/error.h"
#include "gpu_test_util.h"

namespace tpext::testing {

// Runs body(rank) on one thread per rank and reports what any of them threw. NCCL allows one
// thread per rank without a group; Communicator::create and split need it, since they wait for
// every rank.
inline void on_every_rank(int n, const std::function<void(int)>& body) {
  std::vector<std::string> errors(n);
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      try {
        body(r);
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < n; ++r)
    if (!errors[r].empty()) ADD_FAILURE() << "rank " << r << " threw: " << errors[r];
}

using core::DataType;

// cudaMalloc'd bytes on `device`.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(int device, size_t bytes) : device_(device), bytes_(bytes) {
    core::DeviceGuard guard(device);
    if (bytes > 0) TPEXT_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
  }
  ~DeviceBuffer() { release(); }
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      release();
      device_ = other.device_;
      bytes_ = other.bytes_;
      ptr_ = std::exchange(other.ptr_, nullptr);
    }
    return *this;
  }
  void* get() const { return ptr_; }
  unsigned char* at(size_t byte_offset) const { return static_cast<unsigned char*>(ptr_) + byte_offset; }
  size_t bytes() const { return bytes_; }

 private:
  void release() noexcept {
    if (ptr_ == nullptr) return;
    int previous = 0;
    const bool have_previous = cudaGetDevice(&previous) == cudaSuccess;
    (void)cudaSetDevice(device_);
    (void)cudaFree(ptr_);
    if (have_previous) (void)cudaSetDevice(previous);
    ptr_ = nullptr;
  }
  int device_ = 0;
  size_t bytes_ = 0;
  void* ptr_ = nullptr;
};

// A caller's stream on `device`. Non-blocking, so that it never synchronises implicitly with the
// legacy default stream: ordering the tests observe must come from the communicator's fences.
class Stream {
 public:
  explicit Stream(int device) : device_(device) {
    core::DeviceGuard guard(device);
    TPEXT_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  ~Stream() {
    if (stream_ == nullptr) return;
    int previous = 0;
    const bool have_previous = cudaGetDevice(&previous) == cudaSuccess;
    (void)cudaSetDevice(device_);
    (void)cudaStreamDestroy(stream_);
    if (have_previous) (void)cudaSetDevice(previous);
  }
  Stream(Stream&& other) noexcept : device_(other.device_), stream_(std::exchange(other.stream_, nullptr)) {}
  Stream& operator=(Stream&&) = delete;
  cudaStream_t get() const { return stream_; }
  int device() const { return device_; }
  void sync() const { TPEXT_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

 private:
  int device_;
  cudaStream_t stream_ = nullptr;
};

// Page-locked host memory, so that cudaMemcpyAsync is truly asynchronous and stays on its stream.
class PinnedBuffer {
 public:
  explicit PinnedBuffer(size_t bytes) : bytes_(bytes) { TPEXT_CUDA_CHECK(cudaMallocHost(&ptr_, bytes)); }
  ~PinnedBuffer() {
    if (ptr_ != nullptr) (void)cudaFreeHost(ptr_);
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  size_t bytes_;
  void* ptr_ = nullptr;
};

// ---------------------------------------------------------------------------------------------
// host conversion
// ---------------------------------------------------------------------------------------------

// `values` in the binary layout of `dt`, rounded to nearest (integers: rounded to nearest too).
inline std::vector<unsigned char> encode(const std::vector<double>& values, DataType dt) {
  const size_t e = core::element_size(dt);
  std::vector<unsigned char> out(values.size() * e);
  for (size_t i = 0; i < values.size(); ++i) {
    unsigned char* p = out.data() + i * e;
    const double v = values[i];
    switch (dt) {
      case DataType::kFloat32: {
        const float f = static_cast<float>(v);
        std::memcpy(p, &f, e);
        break;
      }
      case DataType::kFloat64: std::memcpy(p, &v, e); break;
      case DataType::kFloat16: {
        const __half h = __float2half_rn(static_cast<float>(v));
        std::memcpy(p, &h, e);
        break;
      }
      case DataType::kBFloat16: {
        const __nv_bfloat16 b = __float2bfloat16_rn(static_cast<float>(v));
        std::memcpy(p, &b, e);
        break;
      }
      case DataType::kInt8: {
        const int8_t x = static_cast<int8_t>(std::llround(v));
        std::memcpy(p, &x, e);
        break;
      }
      case DataType::kUInt8: {
        const uint8_t x = static_cast<uint8_t>(std::llround(v));
        std::memcpy(p, &x, e);
        break;
      }
      case DataType::kInt32: {
        const int32_t x = static_cast<int32_t>(std::llround(v));
        std::memcpy(p, &x, e);
        break;
      }
      case DataType::kInt64: {
        const int64_t x = static_cast<int64_t>(std::llround(v));
        std::memcpy(p, &x, e);
        break;
      }
    }
  }
  return out;
}

inline double decode_one(const unsigned char* p, DataType dt) {
  switch (dt) {
    case DataType::kFloat32: {
      float f;
      std::memcpy(&f, p, sizeof f);
      return f;
    }
    case DataType::kFloat64: {
      double d;
      std::memcpy(&d, p, sizeof d);
      return d;
    }
    case DataType::kFloat16: {
      __half h;
      std::memcpy(&h, p, sizeof h);
      return __half2float(h);
    }
    case DataType::kBFloat16: {
      __nv_bfloat16 b;
      std::memcpy(&b, p, sizeof b);
      return __bfloat162float(b);
    }
    case DataType::kInt8: return static_cast<int8_t>(*p);
    case DataType::kUInt8: return *p;
    case DataType::kInt32: {
      int32_t x;
      std::memcpy(&x, p, sizeof x);
      return x;
    }
    case DataType::kInt64: {
      int64_t x;
      std::memcpy(&x, p, sizeof x);
      return static_cast<double>(x);
    }
  }
  return NAN;
}

inline std::vector<double> decode(const std::vector<unsigned char>& bytes, DataType dt) {
  const size_t e = core::element_size(dt);
  std::vector<double> out(bytes.size() / e);
  for (size_t i = 0; i < out.size(); ++i) out[i] = decode_one(bytes.data() + i * e, dt);
  return out;
}

// The gap between 1 and the next representable value: one rounding changes a value by at most
// half of it, relatively.
inline double machine_epsilon(DataType dt) {
  switch (dt) {
    case DataType::kFloat32: return std::ldexp(1.0, -23);
    case DataType::kFloat64: return std::ldexp(1.0, -52);
    case DataType::kFloat16: return std::ldexp(1.0, -10);
    case DataType::kBFloat16: return std::ldexp(1.0, -7);
    default: return 0.0;  // integers: exact
  }
}

// A byte pattern no test value can take: NaN in every float format, a large negative number in
// every integer format the tests use. Written into outputs first, so an element the collective
// never wrote cannot pass.
inline int poison_byte(DataType dt) { return core::is_floating(dt) ? 0xFF : 0xA5; }

// ---------------------------------------------------------------------------------------------
// test values
// ---------------------------------------------------------------------------------------------

// Uniform in [-1, 1), then rounded to `dt`, so the value the reference sees is exactly the value
// the GPU reads.
inline std::vector<double> rounded_random(size_t n, DataType dt, uint32_t seed) {
  std::vector<double> v(n);
  if (core::is_floating(dt)) {
    const std::vector<float> f = random_floats(n, seed);
    for (size_t i = 0; i < n; ++i) v[i] = f[i];
    return decode(encode(v, dt), dt);
  }
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> dist(-100, 100);
  for (auto& x : v) x = dist(gen);
  return v;
}

// Non-zero integers in [-bound, bound]: sums of a few of them are exact in fp16 and bf16 too.
inline std::vector<double> small_integers(size_t n, int bound, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> dist(1, bound);
  std::bernoulli_distribution negative(0.5);
  std::vector<double> v(n);
  for (auto& x : v) x = negative(gen) ? -dist(gen) : dist(gen);
  return v;
}

// +-1 and +-2: a product over up to 8 ranks is a power of two, exact in every format.
inline std::vector<double> signed_ones_and_twos(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> dist(0, 3);
  static constexpr double kValues[] = {-2.0, -1.0, 1.0, 2.0};
  std::vector<double> v(n);
  for (auto& x : v) x = kValues[dist(gen)];
  return v;
}

// ---------------------------------------------------------------------------------------------
// comparison
// ---------------------------------------------------------------------------------------------

// |got - want| <= tol element-wise (NaN never passes); names the first few mismatches.
inline ::testing::AssertionResult all_close(const std::vector<double>& got, const std::vector<double>& want,
                                            const std::vector<double>& tol) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "got " << got.size() << " elements, expected " << want.size();
  size_t bad = 0;
  std::ostringstream first;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::fabs(got[i] - want[i]) <= tol[i]) continue;
    if (bad < 5) first << "\n  [" << i << "] got " << got[i] << ", expected " << want[i] << " +- " << tol[i];
    ++bad;
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << got.size() << " elements differ:" << first.str();
}

inline ::testing::AssertionResult same_bytes(const void* got, const void* want, size_t bytes) {
  const auto* g = static_cast<const unsigned char*>(got);
  const auto* w = static_cast<const unsigned char*>(want);
  for (size_t i = 0; i < bytes; ++i)
    if (g[i] != w[i])
      return ::testing::AssertionFailure() << "first differing byte at offset " << i << " of " << bytes << ": got "
                                           << int(g[i]) << ", expected " << int(w[i]);
  return ::testing::AssertionSuccess();
}

}  // namespace tpext::testing
