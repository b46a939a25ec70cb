// The NCCL communicator of one rank: the ncclComm_t, a dedicated communication stream and the
// events that fence it against the caller's stream. Every collective is ordered on the caller's
// stream: it starts after the caller's earlier work and the caller's later work waits for it, with
// no host synchronisation. Communicators are non-blocking (ncclConfig.blocking = 0) so that a
// deadline can abort one that waits on a dead or diverging peer instead of hanging.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include "collective.h"

namespace tpext::core {

using UniqueId = std::array<char, NCCL_UNIQUE_ID_BYTES>;

// Created once by one rank and handed to the others out of band (the Python layer uses a c10d
// Store).
UniqueId make_unique_id();

// NCCL's version of the library loaded at run time, as NCCL_VERSION_CODE encodes it.
int nccl_runtime_version();

struct CommOptions {
  std::string name = "world";  // appears in every error message
  double timeout_s = 600.0;    // deadline for init, split, and any call NCCL reports in progress
  // NCCL defaults when negative. Fewer CTAs leave SMs to GEMMs that overlap the collective.
  int min_ctas = -1;
  int max_ctas = -1;
  int cga_cluster_size = -1;
  bool high_priority_stream = true;  // so the collective's kernels are not queued behind GEMM tiles
  // Collectives through a blocking twin of the communicator. On a non-blocking communicator NCCL
  // (2.19+) hands every launch to a helper thread and returns ncclInProgress, which costs tens of
  // microseconds per call; a blocking twin launches inline. Init and split stay non-blocking (and
  // so bounded by timeout_s) on the original, kept for splitting. A host call blocked on the twin
  // is ended by the watchdog's abort once it outlives timeout_s.
  bool blocking_collectives = false;
  // > 0: collectives marked Collective::beside_gemm go through a second blocking twin whose
  // ncclConfig.maxCTAs is this, so the GEMM they overlap keeps the other SMs (paired with the
  // GEMMs' SM target, overlap_sm_target()). A cap on every collective (max_ctas) would also slow
  // the ones that run alone, whose time is all exposed: on 2 H200s a 4 MiB all-reduce took 67 us
  // at 8 CTAs against 39 us uncapped. Needs blocking_collectives and more than one rank; else the
  // marked collectives share the one communicator.
  int overlap_max_ctas = -1;
  // > 0: a symmetric window of this many bytes per rank: memory from ncclMemAlloc registered with
  // NCCL_WIN_COLL_SYMMETRIC on the (uncapped) communicator that carries the collectives. An
  // all-reduce whose buffers lie in it at the same offset on every rank runs NCCL's symmetric
  // kernels (2.27+): on 2 H200s a 4 MiB bf16 all-reduce took 24 us against 36 us through the
  // plain path (bench/nccl_window_probe.cpp). The row-parallel forward writes its GEMM output
  // there when it fits. Needs blocking_collectives and more than one rank; else there is none.
  size_t window_bytes = 0;
  // While there is a window, that communicator's ncclConfig.minCTAs is at least this: NCCL's model
  // gives its symmetric kernels 7 CTAs, which took 31 us for the 4 MiB above against 24 us at 16.
  int window_min_ctas = 16;
};

// The maxCTAs of the twin that carries the beside_gemm collectives: overlap_max_ctas, or max_ctas
// where that cap on every collective is the lower one (a collective beside a GEMM is one of every
// collective, so it never gets more than max_ctas allows); -1 when there is no such twin
// (overlap_max_ctas <= 0). Host logic only: no NCCL call.
int overlap_twin_max_ctas(const CommOptions& opts);

struct CommStats {
  std::array<uint64_t, kNumCollectiveKinds> calls{};
  std::array<uint64_t, kNumCollectiveKinds> bytes{};
};

class Communicator {
 public:
  static constexpr int kNoColor = NCCL_SPLIT_NOCOLOR;

  // One rank of a communicator of `size` ranks on `device`. Blocks until every rank has joined or
  // opts.timeout_s has passed (then the half-built communicator is aborted and Timeout thrown).
  static std::unique_ptr<Communicator> create(const UniqueId& id, int rank, int size, int device,
                                              const CommOptions& opts = {});

  // One communicator per device in `devices`, all driven by this process and thread (rank i on
  // devices[i]). Collectives on them must then go through run_grouped.
  static std::vector<std::unique_ptr<Communicator>> create_local(const std::vector<int>& devices,
                                                                 const CommOptions& opts = {});

  ~Communicator();  // destroys if still alive; never throws
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  // Collective over this communicator: ranks with the same color form a new communicator, ordered
  // by key. Returns nullptr for kNoColor.
  std::unique_ptr<Communicator> split(int color, int key, const CommOptions& opts);

  void all_reduce(const void* send, void* recv, size_t count, DataType dtype, ReduceOp op,
                  cudaStream_t caller);
  void all_gather(const void* send, void* recv, size_t send_count, DataType dtype, cudaStream_t caller);
  void reduce_scatter(const void* send, void* recv, size_t recv_count, DataType dtype, ReduceOp op,
                      cudaStream_t caller);
  void broadcast(const void* send, void* recv, size_t count, DataType dtype, int root, cudaStream_t caller);
  void run(const Collective& c, cudaStream_t caller);

  // Several communicators of this process (one per GPU) in one NCCL group; collectives[i] runs on
  // comms[i], ordered on callers[i].
  static void run_grouped(const std::vector<Communicator*>& comms, const std::vector<Collective>& collectives,
                          const std::vector<cudaStream_t>& callers);

  // The building blocks of run(), public for the fused ops that interleave their own GEMMs with
  // collectives: fence_in makes the comm stream wait for the caller's work so far; enqueue puts a
  // collective on the comm stream (validated, counted, no fences); fence_out makes the caller wait
  // for everything enqueued so far on the comm stream.
  void fence_in(cudaStream_t caller);
  void enqueue(const Collective& c);
  void fence_out(cudaStream_t caller);
  cudaStream_t stream() const { return stream_; }

  // Finalize (flushes outstanding work) then destroy. Idempotent. If finalizing does not complete
  // within the timeout the communicator is aborted and Timeout thrown.
  void destroy();
  // Abort without waiting for peers; for error paths. Idempotent, never throws.
  void abort() noexcept;
  // Collectives of this communicator captured into CUDA graphs that still exist. NCCL's destroy
  // waits until every graph holding its work is gone, so destroying with such a graph alive
  // would hang: require_no_live_graphs waits up to `wait_s` for the count to reach zero (graph
  // destruction reaches us asynchronously) and throws Error naming the way out otherwise.
  int64_t captured_in_live_graphs() const { return graph_refs_->load(std::memory_order_acquire); }
  void require_no_live_graphs(double wait_s) const;
  bool alive() const { return comm_ != nullptr; }

  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_; }
  const std::string& name() const { return opts_.name; }
  const CommOptions& options() const { return opts_; }
  // The CTA cap of the twin carrying beside_gemm collectives, -1 when they share comm_.
  int overlap_max_ctas() const { return overlap_ != nullptr ? overlap_twin_max_ctas(opts_) : -1; }
  // The symmetric window (CommOptions::window_bytes): null and 0 when there is none. The comm
  // stream reads and writes it; a caller that writes into it on its own stream must first wait
  // for the comm stream (fence_out) so that no earlier collective still uses it.
  void* window() const { return window_ptr_; }
  size_t window_bytes() const { return window_ptr_ != nullptr ? opts_.window_bytes : 0; }
  std::string describe() const;  // "communicator 'tp' (rank 1 of 2, cuda:1)"

  CommStats stats() const;
  void reset_stats();

  // Called by the watchdog thread every poll: aborts the communicator when the oldest unfinished
  // collective is older than the timeout or NCCL reports an asynchronous error. Never blocks on
  // a caller's NCCL call in progress (tries again next poll).
  void watchdog_poll(std::chrono::steady_clock::time_point now);

 private:
  Communicator(ncclComm_t comm, ncclComm_t ctl, ncclComm_t overlap, int rank, int size, int device,
               const CommOptions& opts);
  // Wraps a freshly initialised non-blocking `comm` (rank `rank` of `size`): with
  // opts.blocking_collectives and size > 1 collectives go to a blocking twin split from it (and
  // with opts.overlap_max_ctas > 0 the beside_gemm ones to a second, capped twin).
  static std::unique_ptr<Communicator> adopt(ncclComm_t comm, int rank, int size, int device, const CommOptions& opts);
  void require_alive(const char* what) const;
  // Polls ncclCommGetAsyncError on `comm` (comm_ when null) until it leaves ncclInProgress;
  // aborts and throws on error or when the deadline passes.
  void wait_ready(const char* what, ncclComm_t comm = nullptr);
  [[noreturn]] void fail(const char* what, ncclResult_t result);
  // Marks everything enqueued so far on the comm stream for the watchdog (outside graph capture);
  // under capture, ties a reference to the graph being captured instead (retain_in_graph).
  void track(cudaStream_t caller);
  void retain_in_graph(cudaGraph_t graph);  // the graph being captured on stream_
  void abort_locked() noexcept;
  // Allocates and registers the window on comm_ (collective: every rank, right after creation).
  void open_window();
  void free_window_memory() noexcept;  // after comm_ is gone; never throws
  // ncclCommAbort on the communicators that carry collectives (comm_, overlap_), once.
  void abort_data_comms() noexcept;

  // Shared with the CUDA user objects that captured graphs hold, which may outlive this object.
  std::shared_ptr<std::atomic<int64_t>> graph_refs_ = std::make_shared<std::atomic<int64_t>>(0);
  ncclComm_t comm_ = nullptr;  // collectives
  ncclComm_t ctl_ = nullptr;   // the non-blocking original, for split; null when comm_ is it
  ncclComm_t overlap_ = nullptr;  // the capped twin for beside_gemm collectives; null when none
  void* window_ptr_ = nullptr;      // ncclMemAlloc'd, registered on comm_ as window_
  ncclWindow_t window_ = nullptr;
  // Set once ncclCommAbort ran on comm_ and overlap_ (by the caller, or by the watchdog, which may abort a host
  // call blocked inside NCCL without holding nccl_mu_), so it is never aborted twice.
  std::atomic<bool> data_aborted_{false};
  // When a blocking NCCL call on comm_ or overlap_ began (steady_clock ticks), 0 when none is in progress.
  std::atomic<int64_t> host_call_since_{0};
  int rank_;
  int size_;
  int device_;
  CommOptions opts_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t caller_ready_ = nullptr;  // recorded on the caller's stream by fence_in
  cudaEvent_t comm_done_ = nullptr;     // recorded on the comm stream by fence_out
  // Every NCCL call on comm_ holds nccl_mu_, so the watchdog's abort never races one.
  mutable std::recursive_mutex nccl_mu_;
  // Watchdog state, under watch_mu_: watch_event_ is recorded after each tracked collective; the
  // oldest unfinished one was enqueued at pending_since_.
  std::mutex watch_mu_;
  cudaEvent_t watch_event_ = nullptr;
  bool pending_ = false;
  std::chrono::steady_clock::time_point pending_since_{};
  std::string pending_what_;
  // Set once by the watchdog; require_alive then throws it.
  enum class Failure { kNone, kTimeout, kNccl };
  std::atomic<Failure> failure_{Failure::kNone};
  std::string failure_message_;
  ncclResult_t failure_result_ = ncclSuccess;
  const char* last_what_ = "collective";
  std::array<std::atomic<uint64_t>, kNumCollectiveKinds> calls_{};
  std::array<std::atomic<uint64_t>, kNumCollectiveKinds> bytes_{};
};

}  // namespace tpext::core
