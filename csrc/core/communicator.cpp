#include "communicator.h"

#include <algorithm>
#include <thread>

#include "device_guard.h"
#include "error.h"
#include "watchdog.h"

namespace tpext::core {
namespace {

using Clock = std::chrono::steady_clock;

Clock::time_point deadline_after(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

std::string describe_rank(const std::string& name, int rank, int size, int device) {
  return "communicator '" + name + "' (rank " + std::to_string(rank) + " of " + std::to_string(size) +
         ", cuda:" + std::to_string(device) + ")";
}

std::string nccl_message(const char* what, const std::string& where, ncclResult_t result, ncclComm_t comm) {
  std::string msg = std::string("tpext NCCL error in ") + what + " on " + where + ": " +
                    ncclGetErrorString(result) + " (ncclResult_t " + std::to_string(static_cast<int>(result)) + ")";
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && last[0] != '\0') msg += ". NCCL says: " + std::string(last);
  return msg;
}

// NCCL's MAXCHANNELS: a collective runs at most one CTA per channel.
constexpr int kNcclMaxChannels = 64;

// max_ctas > 0 overrides opts.max_ctas (the capped twin for collectives beside a GEMM); min_floor
// > 0 raises minCTAs to at least that (the twin with a symmetric window).
ncclConfig_t make_config(const CommOptions& opts, bool blocking = false, int max_ctas = -1, int min_floor = -1) {
  ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
  cfg.blocking = blocking ? 1 : 0;
  cfg.commName = opts.name.c_str();
  if (max_ctas <= 0) max_ctas = opts.max_ctas;
  if (max_ctas > 0) cfg.maxCTAs = max_ctas;
  // NCCL rejects minCTAs above maxCTAs; the capped twin lowers the floor with the cap.
  const int min_ctas = std::max(opts.min_ctas, min_floor);
  if (min_ctas > 0) {
    // NCCL (2.28.9) compares minCTAs with maxCTAs before it fills in the defaults, so a minCTAs
    // with maxCTAs left undefined fails as an invalid argument: name NCCL's own ceiling then.
    if (max_ctas <= 0) cfg.maxCTAs = kNcclMaxChannels;
    cfg.minCTAs = std::min(min_ctas, cfg.maxCTAs);
  }
  if (opts.cga_cluster_size >= 0) cfg.cgaClusterSize = opts.cga_cluster_size;
  return cfg;
}

void validate_options(const CommOptions& opts) {
  if (!(opts.timeout_s > 0)) throw_invalid_argument("timeout: expected a positive number of seconds, got " + std::to_string(opts.timeout_s));
  if (opts.min_ctas > 0 && opts.max_ctas > 0 && opts.min_ctas > opts.max_ctas)
    throw_invalid_argument("min_ctas: expected <= max_ctas (" + std::to_string(opts.max_ctas) + "), got " + std::to_string(opts.min_ctas));
  if (opts.window_min_ctas < 1)
    throw_invalid_argument("window_min_ctas: expected a positive number of CTAs, got " +
                           std::to_string(opts.window_min_ctas));
  if (opts.overlap_max_ctas == 0 || opts.overlap_max_ctas < -1)
    throw_invalid_argument("overlap_max_ctas: expected a positive number of CTAs or -1 (no capped twin), got " +
                           std::to_string(opts.overlap_max_ctas));
}

// Waits until a freshly created (or split) communicator finished its non-blocking init; on error or
// timeout aborts `comm` (unless the caller aborts it itself) and throws.
void wait_init(ncclComm_t comm, Clock::time_point deadline, const char* what, const std::string& where,
               bool abort_on_failure = true) {
  while (true) {
    ncclResult_t state = ncclSuccess;
    ncclResult_t r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) state = r;
    if (state == ncclSuccess) return;
    if (state != ncclInProgress) {
      std::string msg = nccl_message(what, where, state, comm);
      if (abort_on_failure) ncclCommAbort(comm);
      throw NcclError(msg, state);
    }
    if (Clock::now() > deadline) {
      if (abort_on_failure) ncclCommAbort(comm);
      throw Timeout(std::string("tpext timeout in ") + what + " on " + where +
                    ": not every rank joined before the deadline; is every rank calling it with the same "
                    "unique id and size? The communicator was aborted.");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

void check_device(int device, const char* field) {
  if (device < 0)
    throw_invalid_argument(std::string(field) + ": expected a CUDA device index >= 0, got " + std::to_string(device));
  int count = 0;
  TPEXT_CUDA_CHECK(cudaGetDeviceCount(&count));
  if (device < 0 || device >= count)
    throw_invalid_argument(std::string(field) + ": expected a CUDA device index in [0, " + std::to_string(count) +
                           "), got " + std::to_string(device));
}

}  // namespace

int overlap_twin_max_ctas(const CommOptions& opts) {
  if (opts.overlap_max_ctas <= 0) return -1;
  return opts.max_ctas > 0 ? std::min(opts.overlap_max_ctas, opts.max_ctas) : opts.overlap_max_ctas;
}

UniqueId make_unique_id() {
  ncclUniqueId id;
  ncclResult_t r = ncclGetUniqueId(&id);
  if (r != ncclSuccess) throw NcclError(nccl_message("ncclGetUniqueId", "this process", r, nullptr), r);
  UniqueId out;
  std::copy(id.internal, id.internal + NCCL_UNIQUE_ID_BYTES, out.begin());
  return out;
}

int nccl_runtime_version() {
  int v = 0;
  ncclResult_t r = ncclGetVersion(&v);
  if (r != ncclSuccess) throw NcclError(nccl_message("ncclGetVersion", "this process", r, nullptr), r);
  return v;
}

Communicator::Communicator(ncclComm_t comm, ncclComm_t ctl, ncclComm_t overlap, int rank, int size, int device,
                           const CommOptions& opts)
    : comm_(comm), ctl_(ctl), overlap_(overlap), rank_(rank), size_(size), device_(device), opts_(opts) {
  DeviceGuard guard(device_);
  int least = 0, greatest = 0;
  TPEXT_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  TPEXT_CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking,
                                                opts_.high_priority_stream ? greatest : least));
  TPEXT_CUDA_CHECK(cudaEventCreateWithFlags(&caller_ready_, cudaEventDisableTiming));
  TPEXT_CUDA_CHECK(cudaEventCreateWithFlags(&comm_done_, cudaEventDisableTiming));
  TPEXT_CUDA_CHECK(cudaEventCreateWithFlags(&watch_event_, cudaEventDisableTiming));
  Watchdog::instance().watch(this);
}

std::unique_ptr<Communicator> Communicator::create(const UniqueId& id, int rank, int size, int device,
                                                   const CommOptions& opts) {
  if (size <= 0) throw_invalid_argument("size: expected a positive number of ranks, got " + std::to_string(size));
  if (rank < 0 || rank >= size)
    throw_invalid_argument("rank: expected a rank in [0, " + std::to_string(size) + "), got " + std::to_string(rank));
  validate_options(opts);
  check_device(device, "device");
  DeviceGuard guard(device);
  ncclUniqueId nid;
  std::copy(id.begin(), id.end(), nid.internal);
  ncclConfig_t cfg = make_config(opts);
  ncclComm_t comm = nullptr;
  const std::string where = describe_rank(opts.name, rank, size, device);
  ncclResult_t r = ncclCommInitRankConfig(&comm, size, nid, rank, &cfg);
  if (r != ncclSuccess && r != ncclInProgress) {
    std::string msg = nccl_message("ncclCommInitRankConfig", where, r, comm);
    if (comm != nullptr) ncclCommAbort(comm);
    throw NcclError(msg, r);
  }
  wait_init(comm, deadline_after(opts.timeout_s), "ncclCommInitRankConfig", where);
  return adopt(comm, rank, size, device, opts);
}

std::unique_ptr<Communicator> Communicator::adopt(ncclComm_t comm, int rank, int size, int device,
                                                  const CommOptions& opts) {
  ncclComm_t twin = nullptr, overlap = nullptr;
  // Split from the non-blocking original, the split itself is non-blocking (NCCL takes the
  // group's mode from the parent) and so bounded by the timeout; the twin blocks afterwards.
  auto blocking_twin = [&](const char* which, int max_ctas, int min_floor, ncclComm_t* out) {
    DeviceGuard guard(device);
    const std::string where = std::string(which) + " of " + describe_rank(opts.name, rank, size, device);
    ncclConfig_t cfg = make_config(opts, /*blocking=*/true, max_ctas, min_floor);
    ncclResult_t r = ncclCommSplit(comm, 0, rank, out, &cfg);
    if (r != ncclSuccess && r != ncclInProgress)
      throw NcclError(nccl_message("ncclCommSplit", where, r, comm), r);
    const auto deadline = deadline_after(opts.timeout_s);
    wait_init(comm, deadline, "ncclCommSplit", where, /*abort_on_failure=*/false);
    if (*out == nullptr)
      throw NcclError("tpext: ncclCommSplit returned no communicator for " + where, ncclInternalError);
    wait_init(*out, deadline, "ncclCommSplit", where, /*abort_on_failure=*/false);
  };
  const bool windowed = opts.window_bytes > 0 && opts.blocking_collectives && size > 1;
  std::unique_ptr<Communicator> out;
  try {
    if (opts.blocking_collectives && size > 1) {
      blocking_twin("the blocking twin", -1, windowed ? opts.window_min_ctas : -1, &twin);
      if (opts.overlap_max_ctas > 0)
        blocking_twin("the capped twin for overlapped collectives", overlap_twin_max_ctas(opts), -1, &overlap);
      out.reset(new Communicator(twin, comm, overlap, rank, size, device, opts));
    } else {
      out.reset(new Communicator(comm, nullptr, nullptr, rank, size, device, opts));
    }
  } catch (...) {
    (void)ncclCommAbort(comm);
    if (twin != nullptr) (void)ncclCommAbort(twin);
    if (overlap != nullptr) (void)ncclCommAbort(overlap);
    throw;
  }
  if (windowed) {
    try {
      out->open_window();
    } catch (...) {
      out->abort();
      throw;
    }
  }
  return out;
}

void Communicator::open_window() {
  std::lock_guard<std::recursive_mutex> lock(nccl_mu_);
  DeviceGuard guard(device_);
  if (nccl_runtime_version() < 22700)
    throw_invalid_argument("window_bytes: symmetric windows need NCCL 2.27 or newer, the loaded NCCL is " +
                           std::to_string(nccl_runtime_version()) + "; pass 0");
  ncclResult_t r = ncclMemAlloc(&window_ptr_, opts_.window_bytes);
  if (r != ncclSuccess) {
    window_ptr_ = nullptr;
    fail("ncclMemAlloc (the symmetric window)", r);
  }
  // Collective and blocking on comm_: a rank that never arrives leaves the others inside NCCL,
  // where the watchdog's abort after the timeout ends the call.
  host_call_since_.store(Clock::now().time_since_epoch().count(), std::memory_order_release);
  r = ncclCommWindowRegister(comm_, window_ptr_, opts_.window_bytes, &window_, NCCL_WIN_COLL_SYMMETRIC);
  host_call_since_.store(0, std::memory_order_release);
  if (r != ncclSuccess) {
    window_ = nullptr;
    fail("ncclCommWindowRegister (the symmetric window)", r);
  }
}

void Communicator::free_window_memory() noexcept {
  window_ = nullptr;  // registered on comm_, which is destroyed or aborted by now
  if (window_ptr_ != nullptr) (void)ncclMemFree(window_ptr_);
  window_ptr_ = nullptr;
}

std::vector<std::unique_ptr<Communicator>> Communicator::create_local(const std::vector<int>& devices,
                                                                      const CommOptions& opts) {
  if (devices.empty()) throw_invalid_argument("devices: expected at least one CUDA device index, got none");
  validate_options(opts);
  for (int d : devices) check_device(d, "devices");
  const int n = static_cast<int>(devices.size());
  UniqueId id = make_unique_id();
  ncclUniqueId nid;
  std::copy(id.begin(), id.end(), nid.internal);
  std::vector<ncclComm_t> comms(devices.size(), nullptr);
  ncclConfig_t cfg = make_config(opts);
  {
    DeviceGuard guard(devices[0]);
    ncclResult_t r = ncclGroupStart();
    if (r != ncclSuccess) throw NcclError(nccl_message("ncclGroupStart", "create_local", r, nullptr), r);
    auto abort_started = [&comms] {
      for (ncclComm_t& c : comms)
        if (c != nullptr) (void)ncclCommAbort(c), c = nullptr;
    };
    try {
      for (int i = 0; i < n; ++i) {
        TPEXT_CUDA_CHECK(cudaSetDevice(devices[i]));
        r = ncclCommInitRankConfig(&comms[i], n, nid, i, &cfg);
        if (r != ncclSuccess && r != ncclInProgress)
          throw NcclError(nccl_message("ncclCommInitRankConfig", describe_rank(opts.name, i, n, devices[i]), r, comms[i]), r);
      }
    } catch (...) {
      (void)ncclGroupEnd();  // never leave this thread inside an open NCCL group
      abort_started();
      throw;
    }
    r = ncclGroupEnd();
    if (r != ncclSuccess && r != ncclInProgress) {
      abort_started();
      throw NcclError(nccl_message("ncclGroupEnd", "create_local", r, nullptr), r);
    }
  }
  const auto deadline = deadline_after(opts.timeout_s);
  std::vector<std::unique_ptr<Communicator>> out;
  try {
    for (int i = 0; i < n; ++i) {
      wait_init(comms[i], deadline, "ncclCommInitRankConfig", describe_rank(opts.name, i, n, devices[i]));
      // No blocking twins here: one thread drives every rank, so a blocking launch on one would
      // wait for the others (and these communicators serve tests and single-process tools).
      CommOptions local = opts;
      local.blocking_collectives = false;
      out.emplace_back(new Communicator(comms[i], nullptr, nullptr, i, n, devices[i], local));
      comms[i] = nullptr;
    }
  } catch (...) {
    for (ncclComm_t c : comms)
      if (c != nullptr) ncclCommAbort(c);
    throw;
  }
  return out;
}

Communicator::~Communicator() {
  Watchdog::instance().unwatch(this);
  try {
    destroy();
  } catch (...) {
    abort();
  }
  if (stream_ != nullptr || caller_ready_ != nullptr || comm_done_ != nullptr || watch_event_ != nullptr) {
    int previous = 0;
    bool have_previous = cudaGetDevice(&previous) == cudaSuccess;
    (void)cudaSetDevice(device_);
    if (caller_ready_ != nullptr) (void)cudaEventDestroy(caller_ready_);
    if (comm_done_ != nullptr) (void)cudaEventDestroy(comm_done_);
    if (watch_event_ != nullptr) (void)cudaEventDestroy(watch_event_);
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
    if (have_previous) (void)cudaSetDevice(previous);
    (void)cudaGetLastError();
  }
}

std::string Communicator::describe() const { return describe_rank(opts_.name, rank_, size_, device_); }

void Communicator::require_alive(const char* what) const {
  switch (failure_.load(std::memory_order_acquire)) {
    case Failure::kTimeout: throw Timeout(std::string("tpext: ") + what + ": " + failure_message_);
    case Failure::kNccl: throw NcclError(std::string("tpext: ") + what + ": " + failure_message_, failure_result_);
    case Failure::kNone: break;
  }
  if (comm_ == nullptr)
    throw Destroyed(std::string("tpext: ") + what + " on " + describe() +
                    ": the communicator was destroyed or aborted after an error; create it again");
}

void Communicator::fail(const char* what, ncclResult_t result) {
  std::lock_guard<std::recursive_mutex> lock(nccl_mu_);
  if (failure_.load(std::memory_order_acquire) != Failure::kNone) {
    // The watchdog aborted a call blocked in NCCL: its reason, not NCCL's "aborted", is the cause.
    abort_locked();
    require_alive(what);
  }
  std::string msg = nccl_message(what, describe(), result, comm_);
  abort();
  throw NcclError(msg + ". The communicator was aborted.", result);
}

void Communicator::wait_ready(const char* what, ncclComm_t comm) {
  std::lock_guard<std::recursive_mutex> lock(nccl_mu_);
  const auto deadline = deadline_after(opts_.timeout_s);
  if (comm == nullptr) comm = comm_;
  while (true) {
    ncclResult_t state = ncclSuccess;
    ncclResult_t r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) fail(what, r);
    if (state == ncclSuccess) return;
    if (state != ncclInProgress) fail(what, state);
    if (Clock::now() > deadline) {
      std::string where = describe();
      abort();
      throw Timeout(std::string("tpext timeout in ") + what + " on " + where + " after " +
                    std::to_string(opts_.timeout_s) + " s; the communicator was aborted");
    }
    std::this_thread::yield();
  }
}

std::unique_ptr<Communicator> Communicator::split(int color, int key, const CommOptions& opts) {
  std::lock_guard<std::recursive_mutex> lock(nccl_mu_);
  require_alive("split");
  if (color < 0 && color != kNoColor)
    throw_invalid_argument("color: expected a non-negative color or kNoColor, got " + std::to_string(color));
  validate_options(opts);
  DeviceGuard guard(device_);
  ncclConfig_t cfg = make_config(opts);
  ncclComm_t child = nullptr;
  // From the non-blocking original: the split is then bounded by the timeout.
  ncclComm_t parent = ctl_ != nullptr ? ctl_ : comm_;
  ncclResult_t r = ncclCommSplit(parent, color, key, &child, &cfg);
  if (r != ncclSuccess && r != ncclInProgress) fail("ncclCommSplit", r);
  // The split is collective on the parent: wait for the parent to leave the in-progress state,
  // then for the child to finish its own init.
  wait_ready("ncclCommSplit", parent);
  if (color == kNoColor) return nullptr;
  if (child == nullptr)
    throw NcclError("tpext NCCL error in ncclCommSplit on " + describe() + ": color " + std::to_string(color) +
                        " was requested but NCCL returned no communicator",
                    ncclInternalError);
  int child_rank = 0, child_size = 0;
  wait_init(child, deadline_after(opts.timeout_s), "ncclCommSplit",
            "the child '" + opts.name + "' of " + describe());
  if (ncclCommUserRank(child, &child_rank) != ncclSuccess || ncclCommCount(child, &child_size) != ncclSuccess) {
    ncclCommAbort(child);
    throw NcclError("tpext: could not read rank/size of the communicator split from " + describe(), ncclInternalError);
  }
  return adopt(child, child_rank, child_size, device_, opts);
}

void Communicator::fence_in(cudaStream_t caller) {
  if (caller == stream_) return;
  TPEXT_CUDA_CHECK_CTX(cudaEventRecord(caller_ready_, caller), describe());
  TPEXT_CUDA_CHECK_CTX(cudaStreamWaitEvent(stream_, caller_ready_, 0), describe());
}

void Communicator::fence_out(cudaStream_t caller) {
  track(caller);
  if (caller == stream_) return;
  TPEXT_CUDA_CHECK_CTX(cudaEventRecord(comm_done_, stream_), describe());
  TPEXT_CUDA_CHECK_CTX(cudaStreamWaitEvent(caller, comm_done_, 0), describe());
}

void Communicator::track(cudaStream_t caller) {
  (void)caller;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  unsigned long long capture_id = 0;
  cudaGraph_t graph = nullptr;
  TPEXT_CUDA_CHECK_CTX(cudaStreamGetCaptureInfo(stream_, &capture, &capture_id, &graph), describe());
  // A captured collective runs at replay, outside anything the watchdog could time here.
  if (capture != cudaStreamCaptureStatusNone) {
    if (capture == cudaStreamCaptureStatusActive && graph != nullptr) retain_in_graph(graph);
    return;
  }
  std::lock_guard<std::mutex> lock(watch_mu_);
  TPEXT_CUDA_CHECK_CTX(cudaEventRecord(watch_event_, stream_), describe());
  if (!pending_) {
    pending_ = true;
    pending_since_ = std::chrono::steady_clock::now();
    pending_what_ = last_what_;
  }
}

namespace {
// Sets this thread's stream-capture interaction mode for a scope and restores it after.
class CaptureModeScope {
 public:
  explicit CaptureModeScope(cudaStreamCaptureMode mode) : mode_(mode) { (void)cudaThreadExchangeStreamCaptureMode(&mode_); }
  ~CaptureModeScope() { (void)cudaThreadExchangeStreamCaptureMode(&mode_); }
  CaptureModeScope(const CaptureModeScope&) = delete;
  CaptureModeScope& operator=(const CaptureModeScope&) = delete;

 private:
  cudaStreamCaptureMode mode_;
};
}  // namespace

namespace {
using GraphRefs = std::shared_ptr<std::atomic<int64_t>>;
// Runs on a CUDA-internal thread once a graph holding the reference is destroyed (and its
// launches are done): no CUDA calls allowed here, only the count.
void release_graph_ref(void* p) {
  auto* refs = static_cast<GraphRefs*>(p);
  (*refs)->fetch_sub(1, std::memory_order_acq_rel);
  delete refs;
}
}  // namespace

void Communicator::retain_in_graph(cudaGraph_t graph) {
  auto* ref = new GraphRefs(graph_refs_);
  graph_refs_->fetch_add(1, std::memory_order_acq_rel);
  cudaUserObject_t object = nullptr;
  cudaError_t e = cudaUserObjectCreate(&object, ref, release_graph_ref, 1, cudaUserObjectNoDestructorSync);
  if (e != cudaSuccess) {
    graph_refs_->fetch_sub(1, std::memory_order_acq_rel);
    delete ref;
    TPEXT_CUDA_CHECK_CTX(e, describe());
  }
  // The graph takes over our one reference: the object dies with the graph.
  e = cudaGraphRetainUserObject(graph, object, 1, cudaGraphUserObjectMove);
  if (e != cudaSuccess) {
    (void)cudaUserObjectRelease(object, 1);  // its destructor gives the count back
    TPEXT_CUDA_CHECK_CTX(e, describe());
  }
}

void Communicator::require_no_live_graphs(double wait_s) const {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(wait_s);
  while (captured_in_live_graphs() > 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  const int64_t live = captured_in_live_graphs();
  if (live > 0)
    throw Error("tpext: cannot destroy " + describe() + ": " + std::to_string(live) +
                " of its collectives are captured in CUDA graphs that still exist, and NCCL would wait for those "
                "graphs forever. Release them first (drop every reference to the torch.cuda.CUDAGraph, or call "
                "its reset(); graphs of torch.compile(mode='reduce-overhead') go with torch.compiler.reset()), "
                "then destroy.");
}

void Communicator::watchdog_poll(std::chrono::steady_clock::time_point now) {
  if (failure_.load(std::memory_order_acquire) != Failure::kNone) return;
  int previous = -1;
  (void)cudaGetDevice(&previous);
  if (previous != device_) (void)cudaSetDevice(device_);  // never make a context on another GPU
  // torch.cuda.graph captures in global mode by default, which forbids potentially unsafe CUDA
  // calls (an event query among them) from *every* thread while a capture runs, and invalidates
  // that capture: the other rank then waits forever in the collective it captured. Nothing this
  // poll touches (the event, NCCL's error state, an abort) belongs to a capture, so it runs in
  // thread-local mode, as PyTorch's NCCL watchdog does.
  CaptureModeScope capture_mode(cudaStreamCaptureModeThreadLocal);
  const int64_t since = host_call_since_.load(std::memory_order_acquire);
  if (since != 0) {
    // A caller is blocked inside NCCL on the blocking twin (holding nccl_mu_). ncclCommAbort from
    // another thread is NCCL's way to end such a call; the caller then throws this reason.
    const double age_s = std::chrono::duration<double>(now.time_since_epoch() - Clock::duration(since)).count();
    if (age_s > opts_.timeout_s) {
      failure_message_ = std::string("tpext timeout: a ") + last_what_ + " call on " + describe() +
                         " stayed blocked in NCCL for " + std::to_string(age_s) + " s (timeout " +
                         std::to_string(opts_.timeout_s) + " s): a peer rank may have died. The watchdog aborted the "
                         "communicator.";
      failure_.store(Failure::kTimeout, std::memory_order_release);
      abort_data_comms();
    }
    return;
  }
  std::unique_lock<std::recursive_mutex> nccl_lock(nccl_mu_, std::try_to_lock);
  if (!nccl_lock.owns_lock() || comm_ == nullptr) return;
  for (ncclComm_t c : {comm_, overlap_}) {
    ncclResult_t state = ncclSuccess;
    if (c == nullptr || ncclCommGetAsyncError(c, &state) != ncclSuccess || state == ncclSuccess ||
        state == ncclInProgress)
      continue;
    failure_message_ = nccl_message("an earlier collective", describe(), state, c) +
                       ". The watchdog aborted the communicator.";
    failure_result_ = state;
    failure_.store(Failure::kNccl, std::memory_order_release);
    abort_locked();
    return;
  }
  bool expired = false;
  double age_s = 0;
  std::string what;
  {
    std::lock_guard<std::mutex> lock(watch_mu_);
    if (!pending_) return;
    const cudaError_t q = cudaEventQuery(watch_event_);
    if (q == cudaSuccess) {
      pending_ = false;
    } else if (q == cudaErrorNotReady) {
      age_s = std::chrono::duration<double>(now - pending_since_).count();
      expired = age_s > opts_.timeout_s;
      what = pending_what_;
    } else {
      (void)cudaGetLastError();
    }
  }
  if (!expired) return;
  failure_message_ = std::string("tpext timeout: ") + what + " on " + describe() + " did not complete within the " +
                     std::to_string(opts_.timeout_s) + " s timeout (enqueued " + std::to_string(age_s) +
                     " s ago): a peer rank may have died, or the ranks called different collectives. The watchdog "
                     "aborted the communicator.";
  failure_.store(Failure::kTimeout, std::memory_order_release);
  abort_locked();
}

void Communicator::enqueue(const Collective& c) {
  const char* what = collective_name(c.kind);
  std::lock_guard<std::recursive_mutex> lock(nccl_mu_);
  require_alive(what);
  last_what_ = what;  // validated by the caller (run, run_grouped) before any fence
  const int k = static_cast<int>(c.kind);
  calls_[k].fetch_add(1, std::memory_order_relaxed);
  bytes_[k].fetch_add(input_bytes(c, size_), std::memory_order_relaxed);
  if (c.count == 0) return;
  if (size_ == 1) {
    // Every collective over one rank is a copy (or nothing, in place). NCCL 2.28.9's single-rank
    // path left the tail of an out-of-place avg unwritten (seen on an H100: the last 1-3 elements
    // past a multiple of 4096 came back as NaN), and a copy is cheaper than a kernel launch anyway.
    if (c.send != c.recv)
      TPEXT_CUDA_CHECK_CTX(cudaMemcpyAsync(c.recv, c.send, c.count * element_size(c.dtype), cudaMemcpyDeviceToDevice, stream_),
                           describe());
    return;
  }
  ncclResult_t r = ncclSuccess;
  const ncclDataType_t dt = to_nccl(c.dtype);
  ncclComm_t comm = c.beside_gemm && overlap_ != nullptr ? overlap_ : comm_;
  if (ctl_ != nullptr) host_call_since_.store(Clock::now().time_since_epoch().count(), std::memory_order_release);
  switch (c.kind) {
    case CollectiveKind::kAllReduce:
      r = ncclAllReduce(c.send, c.recv, c.count, dt, to_nccl(c.op, c.dtype), comm, stream_);
      break;
    case CollectiveKind::kAllGather:
      r = ncclAllGather(c.send, c.recv, c.count, dt, comm, stream_);
      break;
    case CollectiveKind::kReduceScatter:
      r = ncclReduceScatter(c.send, c.recv, c.count, dt, to_nccl(c.op, c.dtype), comm, stream_);
      break;
    case CollectiveKind::kBroadcast:
      r = ncclBroadcast(c.send, c.recv, c.count, dt, c.root, comm, stream_);
      break;
  }
  host_call_since_.store(0, std::memory_order_release);
  if (r == ncclInProgress) {
    wait_ready(what, comm);
  } else if (r != ncclSuccess) {
    fail(what, r);
  }
}

void Communicator::run(const Collective& c, cudaStream_t caller) {
  require_alive(collective_name(c.kind));
  validate(c, size_, [this] { return describe(); });  // before the fence, so bad input enqueues nothing
  DeviceGuard guard(device_);
  fence_in(caller);
  enqueue(c);
  fence_out(caller);
}

void Communicator::all_reduce(const void* send, void* recv, size_t count, DataType dtype, ReduceOp op,
                              cudaStream_t caller) {
  run(Collective{CollectiveKind::kAllReduce, send, recv, count, dtype, op, 0}, caller);
}

void Communicator::all_gather(const void* send, void* recv, size_t send_count, DataType dtype, cudaStream_t caller) {
  run(Collective{CollectiveKind::kAllGather, send, recv, send_count, dtype, ReduceOp::kSum, 0}, caller);
}

void Communicator::reduce_scatter(const void* send, void* recv, size_t recv_count, DataType dtype, ReduceOp op,
                                  cudaStream_t caller) {
  run(Collective{CollectiveKind::kReduceScatter, send, recv, recv_count, dtype, op, 0}, caller);
}

void Communicator::broadcast(const void* send, void* recv, size_t count, DataType dtype, int root,
                             cudaStream_t caller) {
  run(Collective{CollectiveKind::kBroadcast, send, recv, count, dtype, ReduceOp::kSum, root}, caller);
}

void Communicator::run_grouped(const std::vector<Communicator*>& comms, const std::vector<Collective>& collectives,
                               const std::vector<cudaStream_t>& callers) {
  if (comms.size() != collectives.size() || comms.size() != callers.size())
    throw_invalid_argument("collectives: expected one collective and one stream per communicator, got " +
                           std::to_string(comms.size()) + " communicators, " + std::to_string(collectives.size()) +
                           " collectives, " + std::to_string(callers.size()) + " streams");
  for (size_t i = 0; i < comms.size(); ++i) {
    if (comms[i] == nullptr) throw_invalid_argument("comms: entry " + std::to_string(i) + " is null");
    comms[i]->require_alive(collective_name(collectives[i].kind));
    validate(collectives[i], comms[i]->size_, [&] { return comms[i]->describe(); });
  }
  for (size_t i = 0; i < comms.size(); ++i) {
    DeviceGuard guard(comms[i]->device_);
    comms[i]->fence_in(callers[i]);
  }
  // On any failure every communicator of the group is aborted: their peers are in this very
  // group, so none of them can make progress alone.
  auto abort_all = [&comms] {
    for (Communicator* c : comms) c->abort();
  };
  ncclResult_t r = ncclGroupStart();
  if (r != ncclSuccess) comms[0]->fail("ncclGroupStart", r);
  try {
    for (size_t i = 0; i < comms.size(); ++i) {
      DeviceGuard guard(comms[i]->device_);
      comms[i]->enqueue(collectives[i]);
    }
  } catch (...) {
    (void)ncclGroupEnd();
    abort_all();
    throw;
  }
  r = ncclGroupEnd();
  if (r != ncclSuccess && r != ncclInProgress) {
    std::string msg = nccl_message("ncclGroupEnd", comms[0]->describe(), r, comms[0]->comm_);
    abort_all();
    throw NcclError(msg + ". Every communicator of the group was aborted.", r);
  }
  try {
    for (Communicator* c : comms) c->wait_ready("ncclGroupEnd");
  } catch (...) {
    abort_all();
    throw;
  }
  for (size_t i = 0; i < comms.size(); ++i) {
    DeviceGuard guard(comms[i]->device_);
    comms[i]->fence_out(callers[i]);
  }
}

void Communicator::destroy() {
  std::lock_guard<std::recursive_mutex> lock(nccl_mu_);
  if (comm_ == nullptr) return;
  DeviceGuard guard(device_);
  if (window_ != nullptr) {
    // Collective, as destroy is: every rank deregisters before its communicator goes.
    ncclResult_t r = ncclCommWindowDeregister(comm_, window_);
    window_ = nullptr;
    if (r != ncclSuccess) fail("ncclCommWindowDeregister", r);
  }
  // The capped twin first (its collectives share comm_'s stream and finalize flushes them), comm_
  // last: abort_locked() keys on comm_ for whatever is left after a failed destroy.
  for (ncclComm_t* slot : {&overlap_, &comm_}) {
    if (*slot == nullptr) continue;
    ncclResult_t r = ncclCommFinalize(*slot);
    if (r != ncclSuccess && r != ncclInProgress) fail("ncclCommFinalize", r);
    wait_ready("ncclCommFinalize", *slot);
    r = ncclCommDestroy(*slot);
    *slot = nullptr;
    if (r != ncclSuccess) {
      std::string msg = nccl_message("ncclCommDestroy", describe(), r, nullptr);
      if (ctl_ != nullptr) (void)ncclCommAbort(ctl_), ctl_ = nullptr;
      abort_locked();  // frees the window's memory too
      throw NcclError(msg, r);
    }
  }
  free_window_memory();
  if (ctl_ != nullptr) {
    // The original was only ever split from: nothing outstanding, finalize is immediate.
    ncclComm_t ctl = ctl_;
    ncclResult_t r = ncclCommFinalize(ctl);
    if (r == ncclSuccess || r == ncclInProgress) {
      try {
        wait_init(ctl, deadline_after(opts_.timeout_s), "ncclCommFinalize", describe());
      } catch (...) {
        ctl_ = nullptr;  // wait_init aborted it
        throw;
      }
      r = ncclCommDestroy(ctl);
    } else {
      (void)ncclCommAbort(ctl);
    }
    ctl_ = nullptr;
  }
}

void Communicator::abort() noexcept {
  std::lock_guard<std::recursive_mutex> lock(nccl_mu_);
  abort_locked();
}

void Communicator::abort_locked() noexcept {
  if (comm_ == nullptr) return;
  int previous = 0;
  bool have_previous = cudaGetDevice(&previous) == cudaSuccess;
  (void)cudaSetDevice(device_);
  abort_data_comms();
  if (ctl_ != nullptr) (void)ncclCommAbort(ctl_);
  comm_ = nullptr;
  ctl_ = nullptr;
  overlap_ = nullptr;
  free_window_memory();
  if (have_previous) (void)cudaSetDevice(previous);
}

void Communicator::abort_data_comms() noexcept {
  if (data_aborted_.exchange(true)) return;
  if (comm_ != nullptr) (void)ncclCommAbort(comm_);
  if (overlap_ != nullptr) (void)ncclCommAbort(overlap_);
}

CommStats Communicator::stats() const {
  CommStats s;
  for (int k = 0; k < kNumCollectiveKinds; ++k) {
    s.calls[k] = calls_[k].load(std::memory_order_relaxed);
    s.bytes[k] = bytes_[k].load(std::memory_order_relaxed);
  }
  return s;
}

void Communicator::reset_stats() {
  for (int k = 0; k < kNumCollectiveKinds; ++k) {
    calls_[k].store(0, std::memory_order_relaxed);
    bytes_[k].store(0, std::memory_order_relaxed);
  }
}

}  // namespace tpext::core
