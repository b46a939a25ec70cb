// Which of cuBLASLt's algorithms is fastest for tpext's MLP GEMMs when they run back to back for
// long enough that the GPU sits at its power limit, as a training step's GEMMs do (on 2 H200s the
// M=4096 / 16384 fwd+bwd ran at ~1450 MHz against the 700 W cap, bench/NOTES.md attempt 8), rather
// than in the short bursts the heuristic's model and tpext's autotuner see. Under a power cap the
// time of a GEMM follows its energy, which the tile shape and the data movement set, so the order
// of the candidates can differ from the unconstrained one. One GPU; torch-free (csrc/core only).
//
//   cmake --build build/cmake --target tpext_gemm_sustained_probe
//   build/cmake/tpext_gemm_sustained_probe [--tp 2] [-M 4096,16384] [--hidden 8192] [--ffn 28672]
//                                          [--candidates 16] [--sustain-ms 250] [--rounds 3]
//
// The six GEMMs of one rank's MLP forward + backward, as tpext's ops enqueue them (tp_linear.cpp,
// linear_ops.cpp), bf16, H = hidden, F = ffn / tp:
//   fc1 fwd    [M,H] x [F,H]^T + b, GELU, aux     fc2 fwd    [M,F] x [H,F]^T
//   fc2 dgrad  [M,H] x [H,F]                      fc2 wgrad  [M,H]^T x [M,F], bias gradient
//   fc1 dgrad  [M,F] x [F,H]                      fc1 wgrad  [M,F]^T x [M,H], bias gradient
// Per GEMM, every candidate the heuristic offers is first checked against the first choice on a
// sample of D (and the bias gradient), then timed in `rounds` rounds, the candidates in a rotated
// order each round: each timing is a pre-heat of sustain-ms of back-to-back calls, then sustain-ms
// more with a CUDA event between calls; the median of those per-call times is the candidate's
// round time, its ratio to the first choice's time in the same round the number reported, and the
// median of those ratios over the rounds what the table shows. Finally the whole chain of six in
// fwd+bwd order, with every GEMM on the first choice against every GEMM on its best candidate
// (where that won in every round), alternating, sustained the same way.
// Operands hold random non-zero bf16 values (magnitude 0.5 .. 2, random sign), never zeros: the
// power a GEMM draws depends on its data.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/gemm.h"
#include "core/gemm_check.h"
#include "core/gemm_plan.h"

namespace {

using tpext::core::DataType;
using tpext::core::Epilogue;
using tpext::core::MatmulDesc;
using tpext::core::MatmulPlan;
using tpext::core::MatmulPointers;

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit DeviceBuffer(size_t n_bytes) : bytes(n_bytes) { check_cuda(cudaMalloc(&ptr, bytes), "cudaMalloc"); }
  ~DeviceBuffer() { (void)cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

// Fills `elems` bf16 values: a random pattern of 1M values copied in at rotating offsets, so the
// fill of a 470 MB operand costs no host-side generation of all of it.
void fill_random_bf16(void* dst, size_t elems, unsigned seed) {
  constexpr size_t kPattern = size_t{1} << 20;
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> mant(0, 127), exp(126, 127), sign(0, 1);
  std::vector<uint16_t> pattern(2 * kPattern);
  for (auto& x : pattern) x = static_cast<uint16_t>(sign(gen) << 15 | exp(gen) << 7 | mant(gen));
  auto* out = static_cast<uint16_t*>(dst);
  for (size_t off = 0, i = 0; off < elems; off += kPattern, ++i) {
    const size_t n = std::min(kPattern, elems - off);
    const size_t shift = (i * 7919) % kPattern;
    check_cuda(cudaMemcpy(out + off, pattern.data() + shift, n * 2, cudaMemcpyHostToDevice), "fill");
  }
}

float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Largest |x - ref| / max|ref| over the first `elems` bf16 values of two device buffers.
double relative_difference(const void* got, const void* ref, size_t elems) {
  std::vector<uint16_t> a(elems), b(elems);
  check_cuda(cudaMemcpy(a.data(), got, elems * 2, cudaMemcpyDeviceToHost), "copy back");
  check_cuda(cudaMemcpy(b.data(), ref, elems * 2, cudaMemcpyDeviceToHost), "copy back");
  double worst = 0, scale = 0;
  for (size_t i = 0; i < elems; ++i) {
    worst = std::max(worst, std::fabs(double(bf16_to_float(a[i])) - bf16_to_float(b[i])));
    scale = std::max(scale, std::fabs(double(bf16_to_float(b[i]))));
  }
  return scale > 0 ? worst / scale : worst;
}

struct Gemm {
  std::string name;
  MatmulDesc desc;
  MatmulPointers ptrs;
  std::unique_ptr<MatmulPlan> plan;
  std::vector<std::vector<double>> ratios;  // [candidate][round]: time / first choice's time
  std::vector<std::vector<double>> times;   // [candidate][round]: us per call
  std::vector<bool> ok;                     // ran and matched the first choice
  size_t best = 0;                          // a candidate faster than the first choice in every round
};

struct Workspace {
  void* ptr;
  size_t bytes;
};

// Median of the per-call times of `run` over sustain_ms, after as long again of pre-heat.
template <class Run>
double sustained_us(Run run, double sustain_ms, cudaStream_t stream) {
  cudaEvent_t e0, e1;
  check_cuda(cudaEventCreate(&e0), "event");
  check_cuda(cudaEventCreate(&e1), "event");
  check_cuda(cudaEventRecord(e0, stream), "record");
  run();
  check_cuda(cudaEventRecord(e1, stream), "record");
  check_cuda(cudaEventSynchronize(e1), "sync");
  float first_ms = 0;
  check_cuda(cudaEventElapsedTime(&first_ms, e0, e1), "elapsed");
  const int calls = std::max(8, static_cast<int>(sustain_ms / std::max(first_ms, 0.001f)));
  for (int i = 0; i < calls; ++i) run();  // pre-heat: clocks and power settle
  std::vector<cudaEvent_t> marks(static_cast<size_t>(calls) + 1);
  for (auto& m : marks) check_cuda(cudaEventCreate(&m), "event");
  check_cuda(cudaEventRecord(marks[0], stream), "record");
  for (int i = 0; i < calls; ++i) {
    run();
    check_cuda(cudaEventRecord(marks[static_cast<size_t>(i) + 1], stream), "record");
  }
  check_cuda(cudaEventSynchronize(marks.back()), "sync");
  std::vector<double> us(static_cast<size_t>(calls));
  for (int i = 0; i < calls; ++i) {
    float ms = 0;
    check_cuda(cudaEventElapsedTime(&ms, marks[static_cast<size_t>(i)], marks[static_cast<size_t>(i) + 1]), "elapsed");
    us[static_cast<size_t>(i)] = ms * 1000.0;
  }
  for (auto& m : marks) (void)cudaEventDestroy(m);
  (void)cudaEventDestroy(e0);
  (void)cudaEventDestroy(e1);
  std::nth_element(us.begin(), us.begin() + us.size() / 2, us.end());
  return us[us.size() / 2];
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::vector<int64_t> parse_list(const char* s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(std::stoll(item));
  return out;
}

void probe(int64_t m, int64_t hidden, int64_t ffn, int candidates, double sustain_ms, int rounds,
           const Workspace& ws, cudaStream_t stream) {
  const int64_t h = hidden, f = ffn;
  // Operands: activations of the step and the rank's weight shards, and every output.
  DeviceBuffer x(size_t(m * h) * 2), w1(size_t(f * h) * 2), b1(size_t(f) * 2), pre(size_t(m * f) * 2),
      act(size_t(m * f) * 2), w2(size_t(h * f) * 2), y(size_t(m * h) * 2), dy(size_t(m * h) * 2),
      dact(size_t(m * f) * 2), dw2(size_t(h * f) * 2), db2(size_t(h) * 2), dx(size_t(m * h) * 2),
      dw1(size_t(f * h) * 2), db1(size_t(f) * 2);
  unsigned seed = 1000;
  for (DeviceBuffer* b : {&x, &w1, &b1, &act, &w2, &dy, &dact}) fill_random_bf16(b->ptr, b->bytes / 2, seed++);

  auto desc = [&](int64_t mm, int64_t nn, int64_t kk, bool ta, bool tb, Epilogue e) {
    MatmulDesc d;
    d.m = mm;
    d.n = nn;
    d.k = kk;
    d.trans_a = ta;
    d.trans_b = tb;
    d.dtype = DataType::kBFloat16;
    d.epilogue = e;
    return tpext::core::with_resolved_leading_dims(d);
  };
  std::vector<Gemm> gemms(6);
  gemms[0] = {"fc1 fwd", desc(m, f, h, false, true, Epilogue::kBiasGeluAux), {x.ptr, w1.ptr, act.ptr, b1.ptr, pre.ptr, nullptr}, {}, {}, {}, {}, 0};
  gemms[1] = {"fc2 fwd", desc(m, h, f, false, true, Epilogue::kNone), {act.ptr, w2.ptr, y.ptr, nullptr, nullptr, nullptr}, {}, {}, {}, {}, 0};
  gemms[2] = {"fc2 dgrad", desc(m, f, h, false, false, Epilogue::kNone), {dy.ptr, w2.ptr, dact.ptr, nullptr, nullptr, nullptr}, {}, {}, {}, {}, 0};
  gemms[3] = {"fc2 wgrad", desc(h, f, m, true, false, Epilogue::kBgrad), {dy.ptr, act.ptr, dw2.ptr, nullptr, nullptr, db2.ptr}, {}, {}, {}, {}, 0};
  gemms[4] = {"fc1 dgrad", desc(m, h, f, false, false, Epilogue::kNone), {dact.ptr, w1.ptr, dx.ptr, nullptr, nullptr, nullptr}, {}, {}, {}, {}, 0};
  gemms[5] = {"fc1 wgrad", desc(f, h, m, true, false, Epilogue::kBgrad), {dact.ptr, x.ptr, dw1.ptr, nullptr, nullptr, db1.ptr}, {}, {}, {}, {}, 0};

  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  const size_t sample = size_t{1} << 20;  // D elements compared with the first choice's
  DeviceBuffer ref(sample * 2), ref_bgrad(size_t(std::max(h, f)) * 2);
  std::printf("\n== M=%lld (H=%lld, F=%lld per rank), bf16, sustained %.0f ms per timing, %d rounds\n",
              static_cast<long long>(m), static_cast<long long>(h), static_cast<long long>(f), sustain_ms, rounds);
  for (Gemm& g : gemms) {
    g.plan = std::make_unique<MatmulPlan>(tpext::core::cublaslt_handle(device), g.desc, g.ptrs, ws.bytes, candidates);
    const size_t n = g.plan->candidate_count();
    g.ratios.assign(n, {});
    g.times.assign(n, {});
    g.ok.assign(n, true);
    const size_t d_sample = std::min(sample, size_t(g.desc.m * g.desc.n));
    const size_t bgrad_elems = g.ptrs.bgrad != nullptr ? size_t(g.desc.m) : 0;
    for (size_t i = 0; i < n; ++i) {
      if (g.plan->run_candidate(i, g.ptrs, ws.ptr, ws.bytes, stream) != CUBLAS_STATUS_SUCCESS) {
        g.ok[i] = false;
        continue;
      }
      check_cuda(cudaStreamSynchronize(stream), "check run");
      if (i == 0) {
        check_cuda(cudaMemcpy(ref.ptr, g.ptrs.d, d_sample * 2, cudaMemcpyDeviceToDevice), "ref");
        if (bgrad_elems) check_cuda(cudaMemcpy(ref_bgrad.ptr, g.ptrs.bgrad, bgrad_elems * 2, cudaMemcpyDeviceToDevice), "ref");
        continue;
      }
      double diff = relative_difference(g.ptrs.d, ref.ptr, d_sample);
      if (bgrad_elems) diff = std::max(diff, relative_difference(g.ptrs.bgrad, ref_bgrad.ptr, bgrad_elems));
      if (diff > 2e-2) {
        std::printf("   %s candidate %zu (%s) differs from the first choice by %.3g: not timed\n", g.name.c_str(), i,
                    g.plan->describe_candidate(i).c_str(), diff);
        g.ok[i] = false;
      }
    }
    for (int r = 0; r < rounds; ++r) {
      std::vector<double> us(n, 0);
      for (size_t j = 0; j < n; ++j) {
        const size_t i = (j + static_cast<size_t>(r)) % n;  // rotated order: drift lands on no one candidate
        if (!g.ok[i]) continue;
        us[i] = sustained_us([&] { (void)g.plan->run_candidate(i, g.ptrs, ws.ptr, ws.bytes, stream); }, sustain_ms, stream);
      }
      for (size_t i = 0; i < n; ++i)
        if (g.ok[i]) {
          g.times[i].push_back(us[i]);
          g.ratios[i].push_back(us[i] / us[0]);
        }
    }
    // The best: faster than the first choice in every round, lowest median ratio.
    double best_ratio = 1.0;
    for (size_t i = 1; i < n; ++i) {
      if (!g.ok[i]) continue;
      const bool every_round = std::all_of(g.ratios[i].begin(), g.ratios[i].end(), [](double v) { return v < 1.0; });
      const double med = median(g.ratios[i]);
      if (every_round && med < best_ratio) {
        best_ratio = med;
        g.best = i;
      }
    }
    std::printf("-- %s: m=%lld n=%lld k=%lld, %zu candidates; first choice %.1f us (%s)\n", g.name.c_str(),
                static_cast<long long>(g.desc.m), static_cast<long long>(g.desc.n), static_cast<long long>(g.desc.k), n,
                median(g.times[0]), g.plan->describe_candidate(0).c_str());
    for (size_t i = 1; i < n; ++i) {
      if (!g.ok[i]) continue;
      std::printf("   candidate %2zu %-44s %8.1f us  ratio %.3f  rounds", i, g.plan->describe_candidate(i).c_str(),
                  median(g.times[i]), median(g.ratios[i]));
      for (double v : g.ratios[i]) std::printf(" %.3f", v);
      std::printf("%s\n", i == g.best ? "  <- best" : "");
    }
  }
  // The whole chain, first choices against the bests, alternating.
  auto chain = [&](bool bests) {
    for (Gemm& g : gemms) (void)g.plan->run_candidate(bests ? g.best : 0, g.ptrs, ws.ptr, ws.bytes, stream);
  };
  std::vector<double> first_us, best_us;
  for (int r = 0; r < rounds; ++r) {
    first_us.push_back(sustained_us([&] { chain(false); }, 4 * sustain_ms, stream));
    best_us.push_back(sustained_us([&] { chain(true); }, 4 * sustain_ms, stream));
  }
  std::printf("-- chain of six (fwd+bwd GEMMs): first choices %.1f us, bests %.1f us, ratio %.4f; rounds",
              median(first_us), median(best_us), median(best_us) / median(first_us));
  for (int r = 0; r < rounds; ++r) std::printf(" %.4f", best_us[static_cast<size_t>(r)] / first_us[static_cast<size_t>(r)]);
  std::printf("\n");
}

}  // namespace

int main(int argc, char** argv) {
  int tp = 2, candidates = tpext::core::kMaxAutotuneCandidates, rounds = 3;
  int64_t hidden = 8192, ffn = 28672;
  double sustain_ms = 250;
  std::vector<int64_t> tokens = {4096, 16384};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--tp") tp = std::atoi(argv[i + 1]);
    else if (a == "-M") tokens = parse_list(argv[i + 1]);
    else if (a == "--hidden") hidden = std::atoll(argv[i + 1]);
    else if (a == "--ffn") ffn = std::atoll(argv[i + 1]);
    else if (a == "--candidates") candidates = std::atoi(argv[i + 1]);
    else if (a == "--sustain-ms") sustain_ms = std::atof(argv[i + 1]);
    else if (a == "--rounds") rounds = std::atoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown argument %s (see the header of bench/gemm_sustained_probe.cpp)\n", a.c_str());
      return 2;
    }
  }
  if (tp < 1 || ffn % tp != 0 || candidates < 1 || rounds < 1 || sustain_ms <= 0) {
    std::fprintf(stderr, "expected --tp >= 1 dividing --ffn, --candidates >= 1, --rounds >= 1, --sustain-ms > 0\n");
    return 2;
  }
  cudaDeviceProp prop{};
  check_cuda(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  int runtime = 0;
  check_cuda(cudaRuntimeGetVersion(&runtime), "cudaRuntimeGetVersion");
  std::printf("%s, %d SMs; CUDA runtime %d; cuBLASLt %zu; TP=%d shards of MLP %lld -> %lld\n", prop.name,
              prop.multiProcessorCount, runtime, cublasLtGetVersion(), tp, static_cast<long long>(hidden),
              static_cast<long long>(ffn));
  cudaStream_t stream;
  check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
  DeviceBuffer workspace(tpext::core::matmul_workspace_bytes());
  for (int64_t m : tokens) probe(m, hidden, ffn / tp, candidates, sustain_ms, rounds, {workspace.ptr, workspace.bytes}, stream);
  (void)cudaStreamDestroy(stream);
  return 0;
}
