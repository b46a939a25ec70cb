// Tests of the NCCL Communicator (csrc/core/communicator.h).
//
// Host tests run everywhere: the unique id, the version, and every argument that create(),
// create_local() and run_grouped() must reject before NCCL is touched. GPU tests skip with a reason
// where GPUs are missing; they use every visible GPU from one process, in both ways NCCL allows:
// one thread driving all ranks through run_grouped, and one thread per rank. Results are compared
// with host references in double from fresh random inputs; outputs are poisoned first so an
// element never written cannot pass.

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "collective_case.h"
#include "comm_test_util.h"
#include "core/communicator.h"
#include "core/error.h"
#include "gpu_test_util.h"

namespace tpext::core {
namespace {

using tpext::testing::CollectiveCase;
using tpext::testing::DeviceBuffer;
using tpext::testing::PinnedBuffer;
using tpext::testing::RankBuffers;
using tpext::testing::on_every_rank;
using tpext::testing::Stream;
using tpext::testing::visible_gpu_count;

// Element counts: a single element, odd sizes that fit no vector width or chunk, and ~1M so the
// large-message protocols run too.
const size_t kCounts[] = {1, 3, 7, 1023, 4097, (size_t{1} << 20) + 3};
const DataType kFloatTypes[] = {DataType::kFloat32, DataType::kBFloat16, DataType::kFloat16};
const ReduceOp kAllOps[] = {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin, ReduceOp::kProd, ReduceOp::kAvg};

// A hung peer becomes a Timeout in a minute rather than the ten-minute default.
CommOptions test_options(const std::string& name) {
  CommOptions o;
  o.name = name;
  o.timeout_s = 60.0;
  return o;
}

template <typename F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(nothing thrown)";
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// =============================================================================================
// Host tests: no GPU needed
// =============================================================================================

TEST(CommunicatorHost, UniqueIdNeedsNoGpuAndIsFresh) {
  // ncclGetUniqueId only opens the bootstrap socket; rank 0 calls it before any device is chosen.
  const UniqueId a = make_unique_id();
  const UniqueId b = make_unique_id();
  EXPECT_NE(a, b) << "two ids must differ, or two communicators would rendezvous as one";
  EXPECT_NE(a, UniqueId{}) << "the id is all zeros";
}

TEST(CommunicatorHost, RuntimeVersionMatchesTheHeaderWeBuiltWith) {
  // The build links the libnccl.so.2 next to the nccl.h it compiles against; a different library
  // at run time would mean the RPATH picked up another NCCL.
  const int v = nccl_runtime_version();
  EXPECT_GE(v, NCCL_VERSION(2, 28, 0));
  EXPECT_EQ(v / 100, NCCL_VERSION_CODE / 100) << "runtime " << v << ", header " << NCCL_VERSION_CODE;
}

// Every rejection below happens before the device check, so it is an InvalidArgument on machines
// with and without GPUs. A zero id is fine: NCCL must never see it.
TEST(CommunicatorHost, CreateRejectsBadSizeAndRank) {
  const UniqueId id{};
  const CommOptions opts = test_options("bad");
  for (int size : {0, -1, -8}) {
    const std::string msg = message_of([&] { Communicator::create(id, 0, size, 0, opts); });
    EXPECT_THROW(Communicator::create(id, 0, size, 0, opts), InvalidArgument);
    EXPECT_TRUE(contains(msg, "size: expected a positive number of ranks, got " + std::to_string(size))) << msg;
  }
  for (int rank : {-1, 2, 3, 100}) {
    const std::string msg = message_of([&] { Communicator::create(id, rank, 2, 0, opts); });
    EXPECT_THROW(Communicator::create(id, rank, 2, 0, opts), InvalidArgument);
    EXPECT_TRUE(contains(msg, "rank: expected a rank in [0, 2), got " + std::to_string(rank))) << msg;
  }
}

TEST(CommunicatorHost, CreateRejectsBadOptions) {
  const UniqueId id{};
  for (double t : {0.0, -1.0, std::nan("")}) {
    CommOptions opts = test_options("bad");
    opts.timeout_s = t;
    const std::string msg = message_of([&] { Communicator::create(id, 0, 1, 0, opts); });
    EXPECT_THROW(Communicator::create(id, 0, 1, 0, opts), InvalidArgument) << "timeout " << t;
    EXPECT_TRUE(contains(msg, "timeout: expected a positive number of seconds")) << msg;
  }
  CommOptions opts = test_options("bad");
  opts.min_ctas = 8;
  opts.max_ctas = 4;
  const std::string msg = message_of([&] { Communicator::create(id, 0, 1, 0, opts); });
  EXPECT_THROW(Communicator::create(id, 0, 1, 0, opts), InvalidArgument);
  EXPECT_TRUE(contains(msg, "min_ctas: expected <= max_ctas (4), got 8")) << msg;
  for (int bad : {0, -2}) {
    CommOptions capped = test_options("bad");
    capped.overlap_max_ctas = bad;
    const std::string m = message_of([&] { Communicator::create(id, 0, 1, 0, capped); });
    EXPECT_THROW(Communicator::create(id, 0, 1, 0, capped), InvalidArgument) << bad;
    EXPECT_TRUE(contains(m, "overlap_max_ctas: expected a positive number of CTAs or -1")) << m;
  }
}

// The capped twin never gets more CTAs than the cap on every collective allows: with
// nccl_max_ctas=4 and nccl_overlap_ctas=8 a collective beside a GEMM takes at most 4.
TEST(CommunicatorHost, OverlapTwinCapIsTheLowerOfTheTwoCaps) {
  struct Row {
    int overlap, max, expected;
  };
  const Row rows[] = {{-1, -1, -1}, {-1, 4, -1}, {8, -1, 8}, {8, 4, 4}, {4, 8, 4}, {8, 8, 8}, {1, 64, 1}};
  for (const Row& r : rows) {
    CommOptions opts = test_options("caps");
    opts.overlap_max_ctas = r.overlap;
    opts.max_ctas = r.max;
    EXPECT_EQ(overlap_twin_max_ctas(opts), r.expected) << "overlap_max_ctas " << r.overlap << ", max_ctas " << r.max;
  }
}

TEST(CommunicatorHost, CreateRejectsBadDevice) {
  // The device check asks CUDA how many devices there are. With GPUs, an index outside the range
  // is an InvalidArgument naming `device`; without a driver or device CUDA itself fails first and
  // the caller gets a CudaError - either way never NCCL, never a crash.
  const int gpus = visible_gpu_count();
  const UniqueId id{};
  // A negative index is wrong on any machine: rejected before CUDA is asked anything.
  EXPECT_THROW(Communicator::create(id, 0, 1, -1, test_options("bad")), InvalidArgument);
  EXPECT_TRUE(contains(message_of([&] { Communicator::create(id, 0, 1, -1, test_options("bad")); }),
                       "device: expected a CUDA device index >= 0, got -1"));
  for (int device : {gpus, gpus + 5}) {
    const std::string msg = message_of([&] { Communicator::create(id, 0, 1, device, test_options("bad")); });
    if (gpus > 0) {
      EXPECT_THROW(Communicator::create(id, 0, 1, device, test_options("bad")), InvalidArgument);
      EXPECT_TRUE(contains(msg, "device: expected a CUDA device index in [0, " + std::to_string(gpus) + "), got " +
                                    std::to_string(device)))
          << msg;
    } else {
      EXPECT_THROW(Communicator::create(id, 0, 1, device, test_options("bad")), CudaError);
      EXPECT_TRUE(contains(msg, "cudaGetDeviceCount")) << msg;
    }
  }
}

TEST(CommunicatorHost, CreateLocalRejectsBadArguments) {
  EXPECT_THROW(Communicator::create_local({}, test_options("bad")), InvalidArgument);
  EXPECT_TRUE(contains(message_of([] { Communicator::create_local({}, test_options("bad")); }), "devices:"));

  CommOptions bad_timeout = test_options("bad");
  bad_timeout.timeout_s = 0;
  EXPECT_THROW(Communicator::create_local({0}, bad_timeout), InvalidArgument);

  const int gpus = visible_gpu_count();
  const std::vector<int> bad_devices = {0, gpus};  // the second is out of range everywhere
  if (gpus > 0) {
    const std::string msg = message_of([&] { Communicator::create_local(bad_devices, test_options("bad")); });
    EXPECT_THROW(Communicator::create_local(bad_devices, test_options("bad")), InvalidArgument);
    EXPECT_TRUE(contains(msg, "devices: expected a CUDA device index")) << msg;
  } else {
    EXPECT_THROW(Communicator::create_local(bad_devices, test_options("bad")), CudaError);
  }
}

TEST(CommunicatorHost, RunGroupedRejectsMismatchedListsAndNullCommunicators) {
  Collective c;
  const std::string msg = message_of([&] { Communicator::run_grouped({nullptr}, {c, c}, {nullptr}); });
  EXPECT_THROW(Communicator::run_grouped({nullptr}, {c, c}, {nullptr}), InvalidArgument);
  EXPECT_TRUE(contains(msg, "1 communicators, 2 collectives, 1 streams")) << msg;
  EXPECT_THROW(Communicator::run_grouped({nullptr}, {c}, {}), InvalidArgument);
  const std::string null_msg = message_of([&] { Communicator::run_grouped({nullptr}, {c}, {nullptr}); });
  EXPECT_THROW(Communicator::run_grouped({nullptr}, {c}, {nullptr}), InvalidArgument);
  EXPECT_TRUE(contains(null_msg, "comms: entry 0 is null")) << null_msg;
}

// =============================================================================================
// GPU helpers
// =============================================================================================

std::unique_ptr<Communicator> solo(int device, const std::string& name) {
  return Communicator::create(make_unique_id(), 0, 1, device, test_options(name));
}

// Every visible GPU as one communicator, driven from this thread, each rank with a caller stream.
struct LocalGroup {
  std::vector<std::unique_ptr<Communicator>> comms;
  std::vector<Stream> streams;

  explicit LocalGroup(const std::string& name) {
    std::vector<int> devices(visible_gpu_count());
    std::iota(devices.begin(), devices.end(), 0);
    comms = Communicator::create_local(devices, test_options(name));
    for (int d : devices) streams.emplace_back(d);
  }
  int size() const { return static_cast<int>(comms.size()); }
  std::vector<Communicator*> ptrs() const {
    std::vector<Communicator*> p;
    for (const auto& c : comms) p.push_back(c.get());
    return p;
  }
  std::vector<cudaStream_t> callers() const {
    std::vector<cudaStream_t> s;
    for (const auto& st : streams) s.push_back(st.get());
    return s;
  }
};

// Runs `c` on every rank of `g` in one NCCL group and checks every rank against the reference.
void check_grouped(LocalGroup& g, const CollectiveCase& c, uint32_t seed) {
  const int n = g.size();
  const auto inputs = tpext::testing::make_inputs(c, n, seed);
  std::vector<RankBuffers> buffers;
  std::vector<Collective> collectives;
  buffers.reserve(n);
  for (int r = 0; r < n; ++r) {
    buffers.emplace_back(c, r, n, g.comms[r]->device(), inputs[r], g.streams[r].get());
    collectives.push_back(buffers[r].collective());
  }
  Communicator::run_grouped(g.ptrs(), collectives, g.callers());
  for (int r = 0; r < n; ++r) tpext::testing::expect_rank_result(c, r, inputs, buffers[r], g.streams[r].get());
}

// The same collective through the named per-communicator calls (not run()), on `caller`.
void call_named(Communicator& comm, const Collective& c, cudaStream_t caller) {
  switch (c.kind) {
    case CollectiveKind::kAllReduce: comm.all_reduce(c.send, c.recv, c.count, c.dtype, c.op, caller); break;
    case CollectiveKind::kAllGather: comm.all_gather(c.send, c.recv, c.count, c.dtype, caller); break;
    case CollectiveKind::kReduceScatter: comm.reduce_scatter(c.send, c.recv, c.count, c.dtype, c.op, caller); break;
    case CollectiveKind::kBroadcast: comm.broadcast(c.send, c.recv, c.count, c.dtype, c.root, caller); break;
  }
}


// =============================================================================================
// A communicator of one rank
// =============================================================================================

TEST(CommunicatorSolo, IdentityForEveryCollective) {
  TPEXT_REQUIRE_GPUS(1);
  auto comm = solo(0, "solo");
  EXPECT_TRUE(comm->alive());
  EXPECT_EQ(comm->rank(), 0);
  EXPECT_EQ(comm->size(), 1);
  EXPECT_EQ(comm->device(), 0);
  EXPECT_EQ(comm->name(), "solo");
  EXPECT_EQ(comm->describe(), "communicator 'solo' (rank 0 of 1, cuda:0)");
  Stream s(0);
  uint32_t seed = 1;
  for (CollectiveKind kind : {CollectiveKind::kAllReduce, CollectiveKind::kAllGather, CollectiveKind::kReduceScatter,
                              CollectiveKind::kBroadcast}) {
    for (DataType dt : kFloatTypes) {
      for (size_t count : {size_t{1}, size_t{7}, size_t{4097}}) {
        for (bool in_place : {false, true}) {
          CollectiveCase c{kind, dt, ReduceOp::kSum, 0, count, in_place};
          // avg and prod over one rank are the identity too; the other ops are covered by sum.
          for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kProd}) {
            c.op = op;
            if (!tpext::testing::reduces(c) && op != ReduceOp::kSum) continue;
            const auto inputs = tpext::testing::make_inputs(c, 1, seed++);
            RankBuffers b(c, 0, 1, 0, inputs[0], s.get());
            call_named(*comm, b.collective(), s.get());
            tpext::testing::expect_rank_result(c, 0, inputs, b, s.get());
          }
        }
      }
    }
  }
}

// A collective captured into a CUDA graph ties the communicator to that graph: NCCL's destroy
// would wait for the graph forever, so require_no_live_graphs refuses until the graph and its
// executable are gone, and then lets destroy through.
TEST(CommunicatorSolo, CapturedCollectivesHoldTheCommunicatorUntilTheGraphIsGone) {
  TPEXT_REQUIRE_GPUS(1);
  auto comm = solo(0, "graph");
  Stream s(0);
  DeviceBuffer buf(0, 64 * sizeof(float));
  core::DeviceGuard guard(0);
  ASSERT_EQ(comm->captured_in_live_graphs(), 0);
  TPEXT_CUDA_CHECK(cudaStreamBeginCapture(s.get(), cudaStreamCaptureModeGlobal));
  for (int i = 0; i < 2; ++i)
    comm->all_reduce(buf.get(), buf.get(), 64, DataType::kFloat32, ReduceOp::kSum, s.get());
  cudaGraph_t graph = nullptr;
  TPEXT_CUDA_CHECK(cudaStreamEndCapture(s.get(), &graph));
  EXPECT_EQ(comm->captured_in_live_graphs(), 2);
  cudaGraphExec_t exec = nullptr;
  TPEXT_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  TPEXT_CUDA_CHECK(cudaGraphLaunch(exec, s.get()));
  TPEXT_CUDA_CHECK(cudaStreamSynchronize(s.get()));
  EXPECT_THROW(comm->require_no_live_graphs(0.05), Error);
  EXPECT_TRUE(contains(message_of([&] { comm->require_no_live_graphs(0.0); }), "CUDA graphs that still exist"));
  TPEXT_CUDA_CHECK(cudaGraphDestroy(graph));
  EXPECT_THROW(comm->require_no_live_graphs(0.05), Error) << "the executable graph still holds the collectives";
  TPEXT_CUDA_CHECK(cudaGraphExecDestroy(exec));
  EXPECT_NO_THROW(comm->require_no_live_graphs(10.0));
  EXPECT_EQ(comm->captured_in_live_graphs(), 0);
  comm->destroy();
  EXPECT_FALSE(comm->alive());
}

// =============================================================================================
// Every GPU from one thread: run_grouped
// =============================================================================================

TEST(CommunicatorGrouped, CreateLocalRanksAndDevices) {
  TPEXT_REQUIRE_GPUS(1);
  LocalGroup g("local");
  ASSERT_EQ(g.size(), visible_gpu_count());
  for (int r = 0; r < g.size(); ++r) {
    EXPECT_EQ(g.comms[r]->rank(), r);
    EXPECT_EQ(g.comms[r]->size(), g.size());
    EXPECT_EQ(g.comms[r]->device(), r);
    EXPECT_TRUE(g.comms[r]->alive());
  }
}

TEST(CommunicatorGrouped, AllReduceEveryOpDtypeAndCount) {
  TPEXT_REQUIRE_GPUS(1);
  LocalGroup g("ar");
  uint32_t seed = 100;
  for (DataType dt : {DataType::kFloat32, DataType::kBFloat16, DataType::kFloat16, DataType::kInt32})
    for (ReduceOp op : kAllOps) {
      if (op == ReduceOp::kAvg && !is_floating(dt)) continue;  // rejected; see the error tests
      for (size_t count : kCounts)
        for (bool in_place : {false, true})
          check_grouped(g, CollectiveCase{CollectiveKind::kAllReduce, dt, op, 0, count, in_place}, seed++);
    }
}

TEST(CommunicatorGrouped, AllGatherEveryDtypeAndCount) {
  TPEXT_REQUIRE_GPUS(1);
  LocalGroup g("ag");
  uint32_t seed = 200;
  for (DataType dt : kFloatTypes)
    for (size_t count : kCounts)
      for (bool in_place : {false, true})
        check_grouped(g, CollectiveCase{CollectiveKind::kAllGather, dt, ReduceOp::kSum, 0, count, in_place}, seed++);
}

TEST(CommunicatorGrouped, ReduceScatterEveryOpDtypeAndCount) {
  TPEXT_REQUIRE_GPUS(1);
  LocalGroup g("rs");
  uint32_t seed = 300;
  for (DataType dt : kFloatTypes)
    for (ReduceOp op : kAllOps)
      for (size_t count : kCounts)
        for (bool in_place : {false, true})
          check_grouped(g, CollectiveCase{CollectiveKind::kReduceScatter, dt, op, 0, count, in_place}, seed++);
}

TEST(CommunicatorGrouped, BroadcastFromEveryRoot) {
  TPEXT_REQUIRE_GPUS(1);
  LocalGroup g("bc");
  uint32_t seed = 400;
  for (int root = 0; root < g.size(); ++root)
    for (DataType dt : kFloatTypes)
      for (size_t count : kCounts)
        for (bool in_place : {false, true})
          check_grouped(g, CollectiveCase{CollectiveKind::kBroadcast, dt, ReduceOp::kSum, root, count, in_place},
                        seed++);
}

TEST(CommunicatorGrouped, StatsCountCallsAndInputBytesPerKind) {
  TPEXT_REQUIRE_GPUS(1);
  LocalGroup g("stats");
  const int n = g.size();
  for (auto& c : g.comms) c->reset_stats();
  const CollectiveCase cases[] = {
      {CollectiveKind::kAllReduce, DataType::kFloat32, ReduceOp::kSum, 0, 100, false},
      {CollectiveKind::kAllGather, DataType::kBFloat16, ReduceOp::kSum, 0, 10, false},
      {CollectiveKind::kReduceScatter, DataType::kFloat16, ReduceOp::kMax, 0, 10, false},
      {CollectiveKind::kBroadcast, DataType::kInt32, ReduceOp::kSum, n - 1, 5, false},
  };
  for (const auto& c : cases) check_grouped(g, c, 7);
  check_grouped(g, cases[0], 8);  // a second all_reduce
  for (int r = 0; r < n; ++r) {
    const CommStats s = g.comms[r]->stats();
    EXPECT_EQ(s.calls[0], 2u);
    EXPECT_EQ(s.calls[1], 1u);
    EXPECT_EQ(s.calls[2], 1u);
    EXPECT_EQ(s.calls[3], 1u);
    EXPECT_EQ(s.bytes[0], 2u * 100 * 4);
    EXPECT_EQ(s.bytes[1], 10u * 2);
    EXPECT_EQ(s.bytes[2], 10u * 2 * n) << "reduce_scatter sends size * count elements";
    EXPECT_EQ(s.bytes[3], 5u * 4);
    g.comms[r]->reset_stats();
    const CommStats zero = g.comms[r]->stats();
    for (int k = 0; k < kNumCollectiveKinds; ++k) {
      EXPECT_EQ(zero.calls[k], 0u);
      EXPECT_EQ(zero.bytes[k], 0u);
    }
  }
}

// =============================================================================================
// One thread per rank
// =============================================================================================

// Every named collective on communicators created one per thread; with `blocking`, through the
// blocking twin (CommOptions::blocking_collectives), and then again on a split of it. With
// overlap_ctas > 0 (CommOptions::overlap_max_ctas) every other collective is marked beside_gemm,
// so the capped twin carries half of them, interleaved on one stream with the uncapped twin's.
void every_named_collective_per_thread(bool blocking, int overlap_ctas = -1) {
  const int n = visible_gpu_count();
  const UniqueId id = make_unique_id();
  std::vector<CollectiveCase> cases;
  for (size_t count : {size_t{1}, size_t{4097}, kCounts[5]}) {
    cases.push_back({CollectiveKind::kAllReduce, DataType::kFloat32, ReduceOp::kSum, 0, count, false});
    cases.push_back({CollectiveKind::kAllReduce, DataType::kBFloat16, ReduceOp::kSum, 0, count, true});
    cases.push_back({CollectiveKind::kAllReduce, DataType::kFloat16, ReduceOp::kAvg, 0, count, false});
    cases.push_back({CollectiveKind::kAllGather, DataType::kBFloat16, ReduceOp::kSum, 0, count, false});
    cases.push_back({CollectiveKind::kReduceScatter, DataType::kFloat32, ReduceOp::kSum, 0, count, true});
    cases.push_back({CollectiveKind::kReduceScatter, DataType::kBFloat16, ReduceOp::kMax, 0, count, false});
    cases.push_back({CollectiveKind::kBroadcast, DataType::kFloat16, ReduceOp::kSum, n - 1, count, false});
  }
  on_every_rank(n, [&](int r) {
    // Each thread creates its own rank: create() blocks until all ranks joined, so this only
    // completes because the other threads run it concurrently.
    CommOptions opts = test_options(blocking ? "threads-blocking" : "threads");
    opts.blocking_collectives = blocking;
    opts.overlap_max_ctas = overlap_ctas;
    auto comm = Communicator::create(id, r, n, r, opts);
    EXPECT_EQ(comm->rank(), r);
    EXPECT_EQ(comm->size(), n);
    // The capped twin exists only where collectives have a blocking twin to sit beside.
    EXPECT_EQ(comm->overlap_max_ctas(), blocking && n > 1 && overlap_ctas > 0 ? overlap_ctas : -1);
    Stream s(r);
    uint32_t seed = 500;
    bool beside = false;
    // Every rank walks the same list in the same order, as NCCL requires.
    for (const auto& c : cases) {
      const auto inputs = tpext::testing::make_inputs(c, n, seed++);
      RankBuffers b(c, r, n, r, inputs[r], s.get());
      if (overlap_ctas > 0) {
        Collective col = b.collective();
        col.beside_gemm = beside = !beside;
        comm->run(col, s.get());
      } else {
        call_named(*comm, b.collective(), s.get());
      }
      tpext::testing::expect_rank_result(c, r, inputs, b, s.get());
    }
    const CommStats st = comm->stats();
    EXPECT_EQ(st.calls[0], 9u);
    EXPECT_EQ(st.calls[1], 3u);
    EXPECT_EQ(st.calls[2], 6u);
    EXPECT_EQ(st.calls[3], 3u);
    // A split (same color everywhere, reversed keys) works through its own twin too.
    CommOptions child_opts = opts;
    child_opts.name = "threads-child";
    auto child = comm->split(0, n - 1 - r, child_opts);
    ASSERT_NE(child, nullptr);
    EXPECT_EQ(child->rank(), n - 1 - r);
    EXPECT_EQ(child->overlap_max_ctas(), comm->overlap_max_ctas());
    const CollectiveCase c{CollectiveKind::kAllReduce, DataType::kFloat32, ReduceOp::kSum, 0, 4097, false};
    const auto inputs = tpext::testing::make_inputs(c, n, 900);
    RankBuffers b(c, child->rank(), n, r, inputs[child->rank()], s.get());
    Collective col = b.collective();
    col.beside_gemm = overlap_ctas > 0;
    child->run(col, s.get());
    tpext::testing::expect_rank_result(c, child->rank(), inputs, b, s.get());
    child->destroy();
    comm->destroy();
    EXPECT_FALSE(comm->alive());
  });
}

TEST(CommunicatorThreads, CreatePerRankAndEveryNamedCollective) {
  TPEXT_REQUIRE_GPUS(1);
  every_named_collective_per_thread(false);
}

TEST(CommunicatorThreads, BlockingTwinCarriesEveryNamedCollectiveAndSplits) {
  TPEXT_REQUIRE_GPUS(1);
  every_named_collective_per_thread(true);
}

TEST(CommunicatorThreads, CappedTwinCarriesTheCollectivesBesideAGemm) {
  TPEXT_REQUIRE_GPUS(1);
  every_named_collective_per_thread(true, 2);
}

// =============================================================================================
// split
// =============================================================================================

TEST(CommunicatorSplit, OwnColorGivesSingletons) {
  TPEXT_REQUIRE_GPUS(2);
  LocalGroup g("parent");
  const int n = g.size();
  std::vector<std::unique_ptr<Communicator>> children(n);
  on_every_rank(n, [&](int r) {
    // Two colors at least: even and odd ranks would also do, but one color per rank gives
    // children of one rank each, whatever the GPU count.
    children[r] = g.comms[r]->split(/*color=*/r, /*key=*/0, test_options("child"));
  });
  for (int r = 0; r < n; ++r) {
    ASSERT_NE(children[r], nullptr) << "rank " << r;
    EXPECT_EQ(children[r]->rank(), 0);
    EXPECT_EQ(children[r]->size(), 1);
    EXPECT_EQ(children[r]->device(), r);
    EXPECT_EQ(children[r]->name(), "child");
    // A child of one rank reduces nothing: all_reduce is the identity on its own data.
    const CollectiveCase c{CollectiveKind::kAllReduce, DataType::kFloat32, ReduceOp::kSum, 0, 4097, false};
    const auto inputs = tpext::testing::make_inputs(c, 1, 600 + r);
    RankBuffers b(c, 0, 1, r, inputs[0], g.streams[r].get());
    children[r]->all_reduce(b.collective().send, b.collective().recv, c.count, c.dtype, c.op, g.streams[r].get());
    tpext::testing::expect_rank_result(c, 0, inputs, b, g.streams[r].get());
  }
  // The parent still works after the split.
  check_grouped(g, {CollectiveKind::kAllReduce, DataType::kFloat32, ReduceOp::kSum, 0, 1023, false}, 601);
}

TEST(CommunicatorSplit, ReversedKeysReorderRanks) {
  TPEXT_REQUIRE_GPUS(2);
  LocalGroup g("parent");
  const int n = g.size();
  const size_t count = 4097;
  const CollectiveCase gather{CollectiveKind::kAllGather, DataType::kFloat32, ReduceOp::kSum, 0, count, false};
  // inputs[p] is what parent rank p sends.
  const auto inputs = tpext::testing::make_inputs(gather, n, 700);
  on_every_rank(n, [&](int p) {
    auto child = g.comms[p]->split(/*color=*/3, /*key=*/n - 1 - p, test_options("reversed"));
    ASSERT_NE(child, nullptr);
    EXPECT_EQ(child->rank(), n - 1 - p);
    EXPECT_EQ(child->size(), n);
    cudaStream_t s = g.streams[p].get();

    // all_gather orders blocks by child rank: block q comes from parent rank n-1-q. A child that
    // only reported the reversed rank but kept the parent's order in NCCL would fail here.
    std::vector<std::vector<double>> by_child_rank(n);
    for (int q = 0; q < n; ++q) by_child_rank[q] = inputs[n - 1 - q];
    RankBuffers ag(gather, child->rank(), n, p, inputs[p], s);
    child->all_gather(ag.collective().send, ag.collective().recv, count, gather.dtype, s);
    tpext::testing::expect_rank_result(gather, child->rank(), by_child_rank, ag, s);

    // broadcast from child root 0 delivers parent rank n-1's data.
    const CollectiveCase bcast{CollectiveKind::kBroadcast, DataType::kFloat32, ReduceOp::kSum, 0, count, false};
    RankBuffers bc(bcast, child->rank(), n, p, inputs[p], s);
    child->broadcast(bc.collective().send, bc.collective().recv, count, bcast.dtype, 0, s);
    tpext::testing::expect_rank_result(bcast, child->rank(), by_child_rank, bc, s);
    child->destroy();
  });
}

TEST(CommunicatorSplit, NoColorGivesNullAndTheOthersAGroupWithoutIt) {
  TPEXT_REQUIRE_GPUS(1);
  LocalGroup g("parent");
  const int n = g.size();
  std::vector<std::unique_ptr<Communicator>> children(n);
  on_every_rank(n, [&](int r) {
    const int color = r == 0 ? Communicator::kNoColor : 5;
    children[r] = g.comms[r]->split(color, r, test_options("rest"));
  });
  EXPECT_EQ(children[0], nullptr) << "kNoColor must give no communicator";
  for (int r = 1; r < n; ++r) {
    ASSERT_NE(children[r], nullptr);
    EXPECT_EQ(children[r]->rank(), r - 1);
    EXPECT_EQ(children[r]->size(), n - 1);
  }
  if (n >= 2) {
    // The remaining ranks form a working communicator of n - 1.
    const CollectiveCase c{CollectiveKind::kAllReduce, DataType::kFloat32, ReduceOp::kSum, 0, 1023, false};
    const auto inputs = tpext::testing::make_inputs(c, n - 1, 800);
    on_every_rank(n - 1, [&](int i) {
      const int r = i + 1;
      RankBuffers b(c, i, n - 1, r, inputs[i], g.streams[r].get());
      children[r]->all_reduce(b.collective().send, b.collective().recv, c.count, c.dtype, c.op, g.streams[r].get());
      tpext::testing::expect_rank_result(c, i, inputs, b, g.streams[r].get());
    });
  }
}

TEST(CommunicatorSplit, BadArgumentsAreRejectedAndTheParentStaysUsable) {
  TPEXT_REQUIRE_GPUS(1);
  auto comm = solo(0, "parent");
  const std::string color_msg = message_of([&] { comm->split(-2, 0, test_options("child")); });
  EXPECT_THROW(comm->split(-2, 0, test_options("child")), InvalidArgument);
  EXPECT_TRUE(contains(color_msg, "color: expected a non-negative color or kNoColor, got -2")) << color_msg;
  CommOptions bad = test_options("child");
  bad.timeout_s = -1;
  EXPECT_THROW(comm->split(0, 0, bad), InvalidArgument);
  bad = test_options("child");
  bad.min_ctas = 4;
  bad.max_ctas = 2;
  EXPECT_THROW(comm->split(0, 0, bad), InvalidArgument);
  EXPECT_TRUE(comm->alive());
  // A valid split of a one-rank communicator needs no other thread.
  auto child = comm->split(0, 0, test_options("child"));
  ASSERT_NE(child, nullptr);
  EXPECT_EQ(child->size(), 1);
  EXPECT_EQ(child->rank(), 0);
  EXPECT_EQ(comm->split(Communicator::kNoColor, 0, test_options("none")), nullptr);
}

// =============================================================================================
// Stream ordering: the collective starts after the caller's earlier work and the caller's later
// work sees its result, with no host synchronisation in between.
// =============================================================================================

struct HostSleep {
  std::chrono::milliseconds duration{200};
  std::atomic<bool> done{false};
  static void CUDART_CB run(void* arg) {
    auto* self = static_cast<HostSleep*>(arg);
    std::this_thread::sleep_for(self->duration);
    self->done.store(true);
  }
};

constexpr size_t kOrderCount = size_t{1} << 22;  // 16 MiB of fp32: copies take measurable time
constexpr size_t kOrderBytes = kOrderCount * sizeof(float);

void fill_pinned(PinnedBuffer& p, uint32_t seed) {
  const std::vector<float> v = tpext::testing::random_floats(kOrderCount, seed);
  std::memcpy(p.get(), v.data(), kOrderBytes);
}

// Any of the four collectives on a one-rank communicator copies `in` to `out`.
void copy_through(Communicator& comm, CollectiveKind kind, const void* in, void* out, cudaStream_t s) {
  Collective c;
  c.kind = kind;
  c.send = in;
  c.recv = out;
  c.count = kOrderCount;
  call_named(comm, c, s);
}

TEST(CommunicatorStreamOrder, CollectiveWaitsForTheCallersEarlierWork) {
  TPEXT_REQUIRE_GPUS(1);
  auto comm = solo(0, "order");
  Stream s(0);
  DeviceBuffer in(0, kOrderBytes), out(0, kOrderBytes);
  PinnedBuffer fresh(kOrderBytes), got(kOrderBytes);
  for (CollectiveKind kind : {CollectiveKind::kAllReduce, CollectiveKind::kAllGather, CollectiveKind::kReduceScatter,
                              CollectiveKind::kBroadcast}) {
    SCOPED_TRACE(collective_name(kind));
    // Stale input and poisoned output, both surely on the device before the test starts.
    const std::vector<float> stale(kOrderCount, 1000.0f);
    TPEXT_CUDA_CHECK(cudaMemcpy(in.get(), stale.data(), kOrderBytes, cudaMemcpyHostToDevice));
    TPEXT_CUDA_CHECK(cudaMemset(out.get(), 0xFF, kOrderBytes));
    TPEXT_CUDA_CHECK(cudaDeviceSynchronize());
    // Warm up the kind so first-launch costs do not blur the host-side check below.
    copy_through(*comm, kind, in.get(), out.get(), s.get());
    s.sync();
    TPEXT_CUDA_CHECK(cudaMemset(out.get(), 0xFF, kOrderBytes));
    TPEXT_CUDA_CHECK(cudaDeviceSynchronize());
    fill_pinned(fresh, 900 + static_cast<uint32_t>(kind));
    std::memset(got.get(), 0, kOrderBytes);

    // The caller's stream is busy for 200 ms, then uploads the fresh input. A collective that
    // did not wait for the caller's stream would read the stale input.
    HostSleep sleep;
    TPEXT_CUDA_CHECK(cudaLaunchHostFunc(s.get(), &HostSleep::run, &sleep));
    TPEXT_CUDA_CHECK(cudaMemcpyAsync(in.get(), fresh.get(), kOrderBytes, cudaMemcpyHostToDevice, s.get()));
    copy_through(*comm, kind, in.get(), out.get(), s.get());
    EXPECT_FALSE(sleep.done.load()) << "the call blocked the host until the caller's stream drained";
    TPEXT_CUDA_CHECK(cudaMemcpyAsync(got.get(), out.get(), kOrderBytes, cudaMemcpyDeviceToHost, s.get()));
    s.sync();
    EXPECT_TRUE(tpext::testing::same_bytes(got.get(), fresh.get(), kOrderBytes));
  }
}

TEST(CommunicatorStreamOrder, CallerSeesTheResultOnlyAfterTheCollective) {
  TPEXT_REQUIRE_GPUS(1);
  auto comm = solo(0, "order");
  Stream s(0);
  DeviceBuffer in(0, kOrderBytes), out(0, kOrderBytes);
  PinnedBuffer fresh(kOrderBytes), got(kOrderBytes);
  for (CollectiveKind kind : {CollectiveKind::kAllReduce, CollectiveKind::kAllGather, CollectiveKind::kReduceScatter,
                              CollectiveKind::kBroadcast}) {
    SCOPED_TRACE(collective_name(kind));
    fill_pinned(fresh, 950 + static_cast<uint32_t>(kind));
    TPEXT_CUDA_CHECK(cudaMemcpy(in.get(), fresh.get(), kOrderBytes, cudaMemcpyHostToDevice));
    copy_through(*comm, kind, in.get(), out.get(), s.get());  // warm-up
    s.sync();
    TPEXT_CUDA_CHECK(cudaMemset(out.get(), 0xFF, kOrderBytes));
    TPEXT_CUDA_CHECK(cudaDeviceSynchronize());
    std::memset(got.get(), 0, kOrderBytes);

    // The communicator's stream is busy for 200 ms, so the collective finishes late. A read-back
    // enqueued on the caller's stream right after the call must still see its result, not the
    // poison: the caller's stream has to wait for the comm stream.
    HostSleep sleep;
    TPEXT_CUDA_CHECK(cudaLaunchHostFunc(comm->stream(), &HostSleep::run, &sleep));
    copy_through(*comm, kind, in.get(), out.get(), s.get());
    EXPECT_FALSE(sleep.done.load()) << "the call blocked the host until the comm stream drained";
    TPEXT_CUDA_CHECK(cudaMemcpyAsync(got.get(), out.get(), kOrderBytes, cudaMemcpyDeviceToHost, s.get()));
    s.sync();
    EXPECT_TRUE(sleep.done.load()) << "the caller's stream finished before the comm stream's earlier work";
    EXPECT_TRUE(tpext::testing::same_bytes(got.get(), fresh.get(), kOrderBytes));
    // `sleep` must outlive its host function even when the fence under test is missing.
    TPEXT_CUDA_CHECK(cudaStreamSynchronize(comm->stream()));
  }
}

TEST(CommunicatorStreamOrder, GroupedCollectiveWaitsForEveryCallerStream) {
  TPEXT_REQUIRE_GPUS(1);
  LocalGroup g("order");
  const int n = g.size();
  const size_t count = kOrderCount;
  std::vector<DeviceBuffer> in, out;
  std::vector<std::unique_ptr<PinnedBuffer>> fresh, got;
  std::vector<float> want(count, 0.0f);
  std::vector<Collective> colls(n);
  for (int r = 0; r < n; ++r) {
    in.emplace_back(r, kOrderBytes);
    out.emplace_back(r, kOrderBytes);
    fresh.push_back(std::make_unique<PinnedBuffer>(kOrderBytes));
    got.push_back(std::make_unique<PinnedBuffer>(kOrderBytes));
    // Small integers: the sum is exact in fp32 whatever order NCCL adds in.
    const std::vector<double> v = tpext::testing::small_integers(count, 8, 990 + r);
    for (size_t i = 0; i < count; ++i) {
      fresh[r]->as<float>()[i] = static_cast<float>(v[i]);
      want[i] += static_cast<float>(v[i]);
    }
    colls[r].kind = CollectiveKind::kAllReduce;
    colls[r].send = in[r].get();
    colls[r].recv = out[r].get();
    colls[r].count = count;
  }
  // Warm-up, then stale inputs and poisoned outputs, synchronised before the test starts.
  Communicator::run_grouped(g.ptrs(), colls, g.callers());
  const std::vector<float> stale(count, 1000.0f);
  for (int r = 0; r < n; ++r) {
    DeviceGuard guard(r);
    g.streams[r].sync();
    TPEXT_CUDA_CHECK(cudaMemcpy(in[r].get(), stale.data(), kOrderBytes, cudaMemcpyHostToDevice));
    TPEXT_CUDA_CHECK(cudaMemset(out[r].get(), 0xFF, kOrderBytes));
    TPEXT_CUDA_CHECK(cudaDeviceSynchronize());
  }
  std::vector<std::unique_ptr<HostSleep>> sleeps;
  for (int r = 0; r < n; ++r) {
    DeviceGuard guard(r);
    sleeps.push_back(std::make_unique<HostSleep>());
    TPEXT_CUDA_CHECK(cudaLaunchHostFunc(g.streams[r].get(), &HostSleep::run, sleeps[r].get()));
    TPEXT_CUDA_CHECK(
        cudaMemcpyAsync(in[r].get(), fresh[r]->get(), kOrderBytes, cudaMemcpyHostToDevice, g.streams[r].get()));
  }
  Communicator::run_grouped(g.ptrs(), colls, g.callers());
  EXPECT_FALSE(sleeps[0]->done.load()) << "run_grouped blocked the host until a caller's stream drained";
  for (int r = 0; r < n; ++r) {
    DeviceGuard guard(r);
    TPEXT_CUDA_CHECK(
        cudaMemcpyAsync(got[r]->get(), out[r].get(), kOrderBytes, cudaMemcpyDeviceToHost, g.streams[r].get()));
  }
  for (int r = 0; r < n; ++r) {
    g.streams[r].sync();
    // Compared as floats, not bytes: the exact sum may be +0 or -0 depending on NCCL's order.
    const float* out_r = got[r]->as<float>();
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < count; ++i)
      if (!(out_r[i] == want[i]) && bad++ == 0) first = i;
    EXPECT_EQ(bad, 0u) << "rank " << r << ": first wrong element " << first << " is " << out_r[first] << ", expected "
                       << want[first] << " (1000 * ranks means the stale input was reduced)";
  }
}

// =============================================================================================
// Errors
// =============================================================================================

struct SmallBuffers {
  DeviceBuffer in{0, 64 * sizeof(double)};
  DeviceBuffer out{0, 64 * sizeof(double)};
};

TEST(CommunicatorErrors, DestroyedCommunicatorThrowsDestroyedForEveryCall) {
  TPEXT_REQUIRE_GPUS(1);
  auto comm = solo(0, "gone");
  Stream s(0);
  SmallBuffers b;
  comm->destroy();
  EXPECT_FALSE(comm->alive());
  const std::string msg =
      message_of([&] { comm->all_reduce(b.in.get(), b.out.get(), 8, DataType::kFloat32, ReduceOp::kSum, s.get()); });
  EXPECT_TRUE(contains(msg, "all_reduce on communicator 'gone'")) << msg;
  EXPECT_TRUE(contains(msg, "destroyed or aborted")) << msg;
  EXPECT_THROW(comm->all_reduce(b.in.get(), b.out.get(), 8, DataType::kFloat32, ReduceOp::kSum, s.get()), Destroyed);
  EXPECT_THROW(comm->all_gather(b.in.get(), b.out.get(), 8, DataType::kFloat32, s.get()), Destroyed);
  EXPECT_THROW(comm->reduce_scatter(b.in.get(), b.out.get(), 8, DataType::kFloat32, ReduceOp::kSum, s.get()),
               Destroyed);
  EXPECT_THROW(comm->broadcast(b.in.get(), b.out.get(), 8, DataType::kFloat32, 0, s.get()), Destroyed);
  EXPECT_THROW(comm->split(0, 0, test_options("child")), Destroyed);
  Collective c;
  c.send = b.in.get();
  c.recv = b.out.get();
  c.count = 8;
  EXPECT_THROW(comm->enqueue(c), Destroyed);
  EXPECT_THROW(Communicator::run_grouped({comm.get()}, {c}, {s.get()}), Destroyed);
  // Destroyed is checked before the arguments: a destroyed communicator says so first.
  EXPECT_THROW(comm->all_reduce(nullptr, nullptr, 8, DataType::kFloat32, ReduceOp::kSum, s.get()), Destroyed);
  // Idempotent teardown.
  EXPECT_NO_THROW(comm->destroy());
  EXPECT_NO_THROW(comm->abort());
  EXPECT_FALSE(comm->alive());
}

TEST(CommunicatorErrors, AbortedCommunicatorThrowsDestroyed) {
  TPEXT_REQUIRE_GPUS(1);
  auto comm = solo(0, "aborted");
  Stream s(0);
  SmallBuffers b;
  comm->abort();
  comm->abort();
  EXPECT_FALSE(comm->alive());
  EXPECT_THROW(comm->all_reduce(b.in.get(), b.out.get(), 8, DataType::kFloat32, ReduceOp::kSum, s.get()), Destroyed);
  EXPECT_THROW(comm->broadcast(b.in.get(), b.out.get(), 8, DataType::kFloat32, 0, s.get()), Destroyed);
  EXPECT_THROW(comm->split(0, 0, test_options("child")), Destroyed);
  EXPECT_NO_THROW(comm->destroy());
}

TEST(CommunicatorErrors, BadCallsAreRejectedBeforeAnythingIsEnqueued) {
  TPEXT_REQUIRE_GPUS(1);
  auto comm = solo(0, "strict");
  Stream s(0);
  SmallBuffers b;
  const auto f32 = DataType::kFloat32;
  auto expect_invalid = [&](const std::function<void()>& call, const std::string& needle) {
    const std::string msg = message_of(call);
    EXPECT_THROW(call(), InvalidArgument) << needle;
    EXPECT_TRUE(contains(msg, needle)) << msg;
    EXPECT_TRUE(contains(msg, "communicator 'strict'")) << msg;
  };
  expect_invalid([&] { comm->all_reduce(nullptr, b.out.get(), 8, f32, ReduceOp::kSum, s.get()); }, "send:");
  expect_invalid([&] { comm->all_reduce(b.in.get(), nullptr, 8, f32, ReduceOp::kSum, s.get()); }, "recv:");
  expect_invalid([&] { comm->all_gather(nullptr, b.out.get(), 8, f32, s.get()); }, "send:");
  expect_invalid([&] { comm->all_gather(b.in.get(), nullptr, 8, f32, s.get()); }, "recv:");
  expect_invalid([&] { comm->reduce_scatter(nullptr, b.out.get(), 8, f32, ReduceOp::kSum, s.get()); }, "send:");
  expect_invalid([&] { comm->reduce_scatter(b.in.get(), nullptr, 8, f32, ReduceOp::kSum, s.get()); }, "recv:");
  expect_invalid([&] { comm->broadcast(nullptr, b.out.get(), 8, f32, 0, s.get()); }, "send:");
  expect_invalid([&] { comm->broadcast(b.in.get(), nullptr, 8, f32, 0, s.get()); }, "recv:");
  expect_invalid([&] { comm->broadcast(b.in.get(), b.out.get(), 8, f32, 1, s.get()); }, "root: expected a rank in [0, 1), got 1");
  expect_invalid([&] { comm->broadcast(b.in.get(), b.out.get(), 8, f32, -1, s.get()); }, "root:");
  expect_invalid([&] { comm->all_reduce(b.in.get(), b.out.get(), 8, DataType::kInt32, ReduceOp::kAvg, s.get()); },
                 "avg");
  expect_invalid(
      [&] { comm->reduce_scatter(b.in.get(), b.out.get(), 8, DataType::kInt64, ReduceOp::kAvg, s.get()); }, "avg");

  // Nothing was counted, the comm stream has nothing pending, and the communicator still works.
  const CommStats st = comm->stats();
  for (int k = 0; k < kNumCollectiveKinds; ++k) EXPECT_EQ(st.calls[k], 0u) << collective_name(CollectiveKind(k));
  EXPECT_EQ(cudaStreamQuery(comm->stream()), cudaSuccess);
  EXPECT_TRUE(comm->alive());
  const CollectiveCase c{CollectiveKind::kAllReduce, DataType::kFloat32, ReduceOp::kSum, 0, 33, false};
  const auto inputs = tpext::testing::make_inputs(c, 1, 1000);
  RankBuffers rb(c, 0, 1, 0, inputs[0], s.get());
  call_named(*comm, rb.collective(), s.get());
  tpext::testing::expect_rank_result(c, 0, inputs, rb, s.get());
  EXPECT_EQ(comm->stats().calls[0], 1u);

  // Zero elements with null pointers is a legal no-op.
  EXPECT_NO_THROW(comm->all_reduce(nullptr, nullptr, 0, f32, ReduceOp::kSum, s.get()));
  EXPECT_NO_THROW(comm->all_gather(nullptr, nullptr, 0, f32, s.get()));
  s.sync();
}

TEST(CommunicatorErrors, SoloStatsCountCallsAndBytesPerKind) {
  TPEXT_REQUIRE_GPUS(1);
  auto comm = solo(0, "stats");
  Stream s(0);
  DeviceBuffer in(0, 8000), out(0, 8000);
  comm->all_reduce(in.get(), out.get(), 1000, DataType::kFloat32, ReduceOp::kSum, s.get());
  comm->all_reduce(in.get(), out.get(), 1000, DataType::kFloat32, ReduceOp::kMax, s.get());
  comm->all_gather(in.get(), out.get(), 10, DataType::kBFloat16, s.get());
  comm->reduce_scatter(in.get(), out.get(), 10, DataType::kFloat16, ReduceOp::kSum, s.get());
  comm->broadcast(in.get(), out.get(), 3, DataType::kInt64, 0, s.get());
  s.sync();
  const CommStats st = comm->stats();
  EXPECT_EQ(st.calls[static_cast<int>(CollectiveKind::kAllReduce)], 2u);
  EXPECT_EQ(st.calls[static_cast<int>(CollectiveKind::kAllGather)], 1u);
  EXPECT_EQ(st.calls[static_cast<int>(CollectiveKind::kReduceScatter)], 1u);
  EXPECT_EQ(st.calls[static_cast<int>(CollectiveKind::kBroadcast)], 1u);
  EXPECT_EQ(st.bytes[static_cast<int>(CollectiveKind::kAllReduce)], 8000u);
  EXPECT_EQ(st.bytes[static_cast<int>(CollectiveKind::kAllGather)], 20u);
  EXPECT_EQ(st.bytes[static_cast<int>(CollectiveKind::kReduceScatter)], 20u);
  EXPECT_EQ(st.bytes[static_cast<int>(CollectiveKind::kBroadcast)], 24u);
  comm->reset_stats();
  comm->broadcast(in.get(), out.get(), 3, DataType::kInt64, 0, s.get());
  s.sync();
  const CommStats after = comm->stats();
  EXPECT_EQ(after.calls[0], 0u);
  EXPECT_EQ(after.bytes[0], 0u);
  EXPECT_EQ(after.calls[3], 1u);
  EXPECT_EQ(after.bytes[3], 24u);
}

TEST(CommunicatorErrors, InitWhosePeerNeverJoinsTimesOut) {
  TPEXT_REQUIRE_GPUS(1);
  // Rank 0 of 2 with no rank 1: non-blocking init plus the deadline must turn the wait into a
  // Timeout (and abort the half-built communicator) instead of a hang.
  CommOptions opts = test_options("lonely");
  opts.timeout_s = 2.0;
  const auto start = std::chrono::steady_clock::now();
  const std::string msg = message_of([&] { Communicator::create(make_unique_id(), 0, 2, 0, opts); });
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_TRUE(contains(msg, "tpext timeout in ncclCommInitRankConfig")) << msg;
  EXPECT_TRUE(contains(msg, "communicator 'lonely' (rank 0 of 2, cuda:0)")) << msg;
  EXPECT_GE(waited, 2.0);
  EXPECT_LT(waited, 60.0) << "the abort after the deadline took too long";
  EXPECT_THROW(Communicator::create(make_unique_id(), 0, 2, 0, opts), Timeout);
  // The process is still healthy: a fresh communicator on the same device works.
  auto comm = solo(0, "after");
  EXPECT_TRUE(comm->alive());
}

}  // namespace
}  // namespace tpext::core
