// How long one all-reduce takes through NCCL's plain path and through its symmetric kernels
// (buffers in a window registered with NCCL_WIN_COLL_SYMMETRIC), on every visible GPU of one host,
// one thread per GPU, with and without a CTA cap. It decides whether tpext stages its small
// all-reduces through a registered window (bench/NOTES.md, attempt 10).
//
//   cmake --build build/cmake --target tpext_nccl_window_probe
//   build/cmake/tpext_nccl_window_probe [max_ctas ...]      (default: NCCL's choice, then 8)
//
// Per (cap, size, path) it prints the slowest rank's median time per call, CUDA events around
// each call on the rank's stream, after warm-up. Paths:
//   plain        out-of-place all-reduce between two cudaMalloc buffers
//   window       out-of-place between two halves of one symmetric window
//   window+copy  window, then a device copy of the result into a cudaMalloc buffer (what a GEMM
//                that writes its output into the window and a caller that wants it elsewhere pay)
//   staged       copy into the window, all-reduce there, copy out (an all-reduce of any tensor)
// Every buffer holds random non-zero bf16 values; one fp32 all-reduce through the window is checked
// exactly first (small integers, so the sum is exact in any order).
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

void check_nccl(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, ncclGetErrorString(r));
    std::exit(1);
  }
}

// Random non-zero bf16 bit patterns of magnitude 0.5 .. 2 (sign random), seeded per rank.
std::vector<uint16_t> random_bf16(size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> mant(0, 127), exp(126, 127), sign(0, 1);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = static_cast<uint16_t>(sign(gen) << 15 | exp(gen) << 7 | mant(gen));
  return v;
}

struct Result {
  double median_us[4] = {0, 0, 0, 0};
};

double median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2] * 1000.0;  // ms -> us
}


void rank_main(int rank, int size, ncclUniqueId id, int max_ctas, const std::vector<size_t>& sizes,
               std::barrier<>& sync, std::vector<std::vector<Result>>& out) {
  check_cuda(cudaSetDevice(rank), "cudaSetDevice");
  ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
  if (max_ctas > 0) cfg.maxCTAs = max_ctas;
  ncclComm_t comm;
  check_nccl(ncclCommInitRankConfig(&comm, size, id, rank, &cfg), "ncclCommInitRankConfig");
  cudaStream_t stream;
  check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");

  const size_t max_bytes = *std::max_element(sizes.begin(), sizes.end());
  void* win_buf = nullptr;  // send half, then recv half
  check_nccl(ncclMemAlloc(&win_buf, 2 * max_bytes), "ncclMemAlloc");
  ncclWindow_t win;
  check_nccl(ncclCommWindowRegister(comm, win_buf, 2 * max_bytes, &win, NCCL_WIN_COLL_SYMMETRIC),
             "ncclCommWindowRegister");
  void *plain_send, *plain_recv;
  check_cuda(cudaMalloc(&plain_send, max_bytes), "cudaMalloc");
  check_cuda(cudaMalloc(&plain_recv, max_bytes), "cudaMalloc");
  char* win_send = static_cast<char*>(win_buf);
  char* win_recv = win_send + max_bytes;

  // Exactness of the symmetric path: fp32 small integers, rank r holds i % 7 + r + 1.
  {
    const size_t n = 1 << 20;
    std::vector<float> host(n);
    for (size_t i = 0; i < n; ++i) host[i] = static_cast<float>(i % 7 + rank + 1);
    check_cuda(cudaMemcpy(win_send, host.data(), n * 4, cudaMemcpyHostToDevice), "copy");
    check_nccl(ncclAllReduce(win_send, win_recv, n, ncclFloat32, ncclSum, comm, stream), "check all-reduce");
    check_cuda(cudaStreamSynchronize(stream), "sync");
    check_cuda(cudaMemcpy(host.data(), win_recv, n * 4, cudaMemcpyDeviceToHost), "copy back");
    size_t bad = 0;
    for (size_t i = 0; i < n; ++i) {
      double want = 0;
      for (int r = 0; r < size; ++r) want += static_cast<double>(i % 7 + r + 1);
      bad += host[i] != want;
    }
    if (bad) {
      std::fprintf(stderr, "rank %d: %zu of %zu window all-reduce results wrong\n", rank, bad, n);
      std::exit(1);
    }
  }

  auto fill = random_bf16(max_bytes / 2, 1234 + rank);
  for (void* p : {plain_send, plain_recv, static_cast<void*>(win_send), static_cast<void*>(win_recv)})
    check_cuda(cudaMemcpy(p, fill.data(), max_bytes, cudaMemcpyHostToDevice), "fill");

  cudaEvent_t ev[2];
  for (auto& e : ev) check_cuda(cudaEventCreate(&e), "event");
  std::vector<cudaEvent_t> starts(200), ends(200);
  for (auto& e : starts) check_cuda(cudaEventCreate(&e), "event");
  for (auto& e : ends) check_cuda(cudaEventCreate(&e), "event");

  for (size_t si = 0; si < sizes.size(); ++si) {
    const size_t bytes = sizes[si], count = bytes / 2;
    const int iters = bytes >= (64u << 20) ? 40 : 200, warm = 20;
    for (int path = 0; path < 4; ++path) {
      std::function<void()> call;
      switch (path) {
        case 0:
          call = [&] { check_nccl(ncclAllReduce(plain_send, plain_recv, count, ncclBfloat16, ncclSum, comm, stream), "ar"); };
          break;
        case 1:
          call = [&] { check_nccl(ncclAllReduce(win_send, win_recv, count, ncclBfloat16, ncclSum, comm, stream), "ar"); };
          break;
        case 2:
          call = [&] {
            check_nccl(ncclAllReduce(win_send, win_recv, count, ncclBfloat16, ncclSum, comm, stream), "ar");
            check_cuda(cudaMemcpyAsync(plain_recv, win_recv, bytes, cudaMemcpyDeviceToDevice, stream), "copy");
          };
          break;
        default:
          call = [&] {
            check_cuda(cudaMemcpyAsync(win_send, plain_send, bytes, cudaMemcpyDeviceToDevice, stream), "copy");
            check_nccl(ncclAllReduce(win_send, win_recv, count, ncclBfloat16, ncclSum, comm, stream), "ar");
            check_cuda(cudaMemcpyAsync(plain_recv, win_recv, bytes, cudaMemcpyDeviceToDevice, stream), "copy");
          };
      }
      sync.arrive_and_wait();
      for (int i = 0; i < warm; ++i) call();
      for (int i = 0; i < iters; ++i) {
        check_cuda(cudaEventRecord(starts[i], stream), "record");
        call();
        check_cuda(cudaEventRecord(ends[i], stream), "record");
      }
      check_cuda(cudaStreamSynchronize(stream), "sync");
      std::vector<float> ms(iters);
      for (int i = 0; i < iters; ++i) check_cuda(cudaEventElapsedTime(&ms[i], starts[i], ends[i]), "elapsed");
      out[rank][si].median_us[path] = median(ms);
    }
  }
  check_nccl(ncclCommWindowDeregister(comm, win), "deregister");
  check_nccl(ncclMemFree(win_buf), "ncclMemFree");
  cudaFree(plain_send);
  cudaFree(plain_recv);
  check_nccl(ncclCommDestroy(comm), "destroy");
}

}  // namespace

int main(int argc, char** argv) {
  int size = 0;
  if (cudaGetDeviceCount(&size) != cudaSuccess) size = 0;
  if (size < 2) {
    std::printf("needs 2 or more GPUs, found %d\n", size);
    return 0;
  }
  std::vector<int> caps;
  for (int i = 1; i < argc; ++i) caps.push_back(std::atoi(argv[i]));
  if (caps.empty()) caps = {-1, 8};
  const std::vector<size_t> sizes = {64u << 10, 1u << 20, 4u << 20, 16u << 20, 64u << 20};
  int version = 0;
  ncclGetVersion(&version);
  std::printf("NCCL %d, %d GPUs, bf16 sum, slowest rank's median us per call\n", version, size);
  std::printf("%8s %10s %10s %10s %12s %10s %12s\n", "maxCTAs", "bytes", "plain", "window", "window+copy",
              "staged", "window/plain");
  for (int cap : caps) {
    ncclUniqueId id;
    check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
    std::vector<std::vector<Result>> out(size, std::vector<Result>(sizes.size()));
    std::barrier sync(size);
    std::vector<std::thread> threads;
    for (int r = 0; r < size; ++r)
      threads.emplace_back(rank_main, r, size, id, cap, std::cref(sizes), std::ref(sync), std::ref(out));
    for (auto& t : threads) t.join();
    for (size_t si = 0; si < sizes.size(); ++si) {
      double worst[4] = {0, 0, 0, 0};
      for (int r = 0; r < size; ++r)
        for (int p = 0; p < 4; ++p) worst[p] = std::max(worst[p], out[r][si].median_us[p]);
      std::printf("%8s %10zu %10.1f %10.1f %12.1f %10.1f %12.3f\n", cap > 0 ? std::to_string(cap).c_str() : "nccl",
                  sizes[si], worst[0], worst[1], worst[2], worst[3], worst[1] / worst[0]);
    }
  }
  return 0;
}
