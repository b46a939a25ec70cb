// MatmulPlan's autotuning (set_matmul_autotune): which of the heuristic's candidates run() keeps.
// Every candidate's outputs are first checked against the first choice's (gemm_verify.h); then the
// usable ones are timed, either the short way (a few runs each, for problems whose shapes come and
// go) or under sustained load (set_matmul_autotune_sustain_ms), which is how a training step runs
// its GEMMs: back to back until the GPU sits at its power limit. There the order of the algorithms
// can differ from the short bursts' (bench/NOTES.md attempt 11: on one H200 at 700 W, the weight-
// gradient GEMMs of the MLP ran 3-6 % faster on a lower-ranked tile than on the first choice).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cublas_error.h"
#include "error.h"
#include "gemm_plan.h"
#include "gemm_verify.h"

namespace tpext::core {
namespace {

// CUDA events for timing, destroyed on every path out of the tuner.
struct TimingEvents {
  cudaEvent_t start = nullptr, stop = nullptr;
  TimingEvents() {
    TPEXT_CUDA_CHECK(cudaEventCreate(&start));
    const cudaError_t made = cudaEventCreate(&stop);
    if (made != cudaSuccess) {
      (void)cudaEventDestroy(start);
      TPEXT_CUDA_CHECK(made);
    }
  }
  ~TimingEvents() {
    (void)cudaEventDestroy(start);
    (void)cudaEventDestroy(stop);
  }
  float elapsed_ms() const {
    TPEXT_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    TPEXT_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    return ms;
  }
};

// While tuning waits on the host, another thread may be capturing a CUDA graph in global mode,
// which forbids such waits process-wide; relaxed mode for this thread, restored on the way out.
struct RelaxedCaptureMode {
  cudaStreamCaptureMode previous = cudaStreamCaptureModeRelaxed;
  RelaxedCaptureMode() { (void)cudaThreadExchangeStreamCaptureMode(&previous); }
  ~RelaxedCaptureMode() { (void)cudaThreadExchangeStreamCaptureMode(&previous); }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

constexpr int kRounds = 3;
// The short timing: runs per round. The sustained timing: the most calls of one timing (a tiny GEMM
// would otherwise be enqueued hundreds of thousands of times to fill the time).
constexpr int kShortRuns = 2;
constexpr int kMaxSustainedCalls = 20000;

}  // namespace

size_t MatmulPlan::rejected() const {
  std::lock_guard<std::mutex> lock(mu_);
  return rejected_;
}

void MatmulPlan::tune_locked(const MatmulPointers& ptrs, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream) {
  // Accumulating GEMMs keep the heuristic's first choice untimed: every run would add into D.
  if (desc_.accumulate) {
    tuned_ = true;
    return;
  }
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  TPEXT_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return;  // no timing inside a graph; the next eager call tunes
  RelaxedCaptureMode relaxed;
  const std::vector<bool> usable = checked_candidates_locked(ptrs, workspace, workspace_bytes, stream);
  if (usable[0]) {  // a first choice that cannot run sets no bar; run() then reports its error
    chosen_ = sustain_ms_ > 0 ? fastest_sustained_locked(usable, ptrs, workspace, workspace_bytes, stream)
                              : fastest_short_locked(usable, ptrs, workspace, workspace_bytes, stream);
  }
  tuned_ = true;
}

std::vector<bool> MatmulPlan::checked_candidates_locked(const MatmulPointers& ptrs, void* workspace,
                                                        size_t workspace_bytes, cudaStream_t stream) {
  std::vector<bool> usable(candidates_.size(), false);
  if (enqueue(candidates_[0], ptrs, workspace, workspace_bytes, stream) != CUBLAS_STATUS_SUCCESS) return usable;
  usable[0] = true;
  const OutputSample reference = sample_outputs(desc_, ptrs, stream);
  const double tolerance = agreement_tolerance(desc_);
  for (size_t i = 1; i < candidates_.size(); ++i) {
    poison_outputs(desc_, ptrs, stream);  // an element the candidate leaves unwritten stays NaN
    if (enqueue(candidates_[i], ptrs, workspace, workspace_bytes, stream) != CUBLAS_STATUS_SUCCESS)
      continue;  // refused by cuBLASLt: passed over
    usable[i] = samples_agree(sample_outputs(desc_, ptrs, stream), reference, tolerance);
    rejected_ += !usable[i];
  }
  return usable;
}

size_t MatmulPlan::fastest_short_locked(const std::vector<bool>& usable_in, const MatmulPointers& ptrs,
                                        void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  // Rounds over all candidates, each candidate's best round kept: a single short timing is at the
  // mercy of clocks and of whatever ran just before (a first tuner on H100 that timed each
  // candidate once, three runs, kept slower algorithms as often as faster ones).
  std::vector<bool> usable = usable_in;
  TimingEvents events;
  // Untimed candidates stay at +inf, which no bar passes.
  std::vector<float> best_ms(candidates_.size(), std::numeric_limits<float>::infinity());
  for (int round = 0; round < kRounds; ++round) {
    for (size_t i = 0; i < candidates_.size(); ++i) {
      if (!usable[i]) continue;
      TPEXT_CUDA_CHECK(cudaEventRecord(events.start, stream));
      for (int r = 0; r < kShortRuns && usable[i]; ++r)
        usable[i] = enqueue(candidates_[i], ptrs, workspace, workspace_bytes, stream) == CUBLAS_STATUS_SUCCESS;
      TPEXT_CUDA_CHECK(cudaEventRecord(events.stop, stream));
      const float ms = events.elapsed_ms();
      best_ms[i] = usable[i] ? std::min(best_ms[i], ms) : std::numeric_limits<float>::infinity();
    }
  }
  // The heuristic's first choice stays unless another is clearly faster: differences of a few
  // percent are within what these short timings can tell apart.
  constexpr float kMargin = 0.97f;
  size_t best = 0;
  float bar = best_ms[0] * kMargin;
  for (size_t i = 1; i < candidates_.size(); ++i) {
    if (best_ms[i] < bar) {
      best = i;
      bar = best_ms[i];
    }
  }
  return best;
}

size_t MatmulPlan::fastest_sustained_locked(const std::vector<bool>& usable_in, const MatmulPointers& ptrs,
                                            void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  std::vector<bool> usable = usable_in;
  TimingEvents events;
  // Milliseconds per call of candidate i: as many calls as fill sustain_ms back to back (the GPU's
  // clocks and power settle), then as many again between two events.
  auto per_call_ms = [&](size_t i) -> double {
    auto run_calls = [&](int calls) {
      for (int c = 0; c < calls; ++c)
        if (enqueue(candidates_[i], ptrs, workspace, workspace_bytes, stream) != CUBLAS_STATUS_SUCCESS) return false;
      return true;
    };
    TPEXT_CUDA_CHECK(cudaEventRecord(events.start, stream));
    if (!run_calls(1)) return -1.0;
    TPEXT_CUDA_CHECK(cudaEventRecord(events.stop, stream));
    const double once = std::max(1e-3, static_cast<double>(events.elapsed_ms()));
    const int calls = static_cast<int>(std::clamp(std::ceil(sustain_ms_ / once), 2.0, double(kMaxSustainedCalls)));
    if (!run_calls(calls)) return -1.0;
    TPEXT_CUDA_CHECK(cudaEventRecord(events.start, stream));
    if (!run_calls(calls)) return -1.0;
    TPEXT_CUDA_CHECK(cudaEventRecord(events.stop, stream));
    return events.elapsed_ms() / calls;
  };
  // Each round times every candidate in a rotated order, so slow drift (temperature, a neighbour
  // on the host) lands on no one candidate; a candidate's ratio to the first choice is taken within
  // the round.
  const size_t n = candidates_.size();
  std::vector<std::vector<double>> ratios(n);
  for (int round = 0; round < kRounds; ++round) {
    std::vector<double> ms(n, -1.0);
    for (size_t j = 0; j < n; ++j) {
      const size_t i = (j + static_cast<size_t>(round)) % n;
      if (!usable[i]) continue;
      ms[i] = per_call_ms(i);
      usable[i] = ms[i] > 0;
    }
    if (!usable[0]) return 0;  // the first choice stopped running: keep it, run() reports why
    for (size_t i = 1; i < n; ++i)
      if (usable[i]) ratios[i].push_back(ms[i] / ms[0]);
  }
  // Kept: faster than the first choice in every round, and by at least 1 % at the median; of
  // those, the lowest median. A lower-ranked algorithm that only ties stays out.
  constexpr double kMargin = 0.99;
  size_t best = 0;
  double best_ratio = kMargin;
  for (size_t i = 1; i < n; ++i) {
    if (!usable[i]) continue;  // still usable: timed in every round
    const bool every_round = std::all_of(ratios[i].begin(), ratios[i].end(), [](double r) { return r < 1.0; });
    const double med = median(ratios[i]);
    if (every_round && med < best_ratio) {
      best = i;
      best_ratio = med;
    }
  }
  return best;
}

}  // namespace tpext::core
