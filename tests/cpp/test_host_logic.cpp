// Host-side logic of the core that needs neither a GPU nor NCCL communication: element types,
// reduction names, and the validation every collective goes through before anything is enqueued.
// These run on every machine, so a rejection rule that breaks is caught on CPU-only CI.

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "core/collective.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/reduce_op.h"

namespace tpext::core {
namespace {

constexpr DataType kAllDtypes[] = {DataType::kFloat32, DataType::kFloat64, DataType::kFloat16,
                                   DataType::kBFloat16, DataType::kInt8,   DataType::kUInt8,
                                   DataType::kInt32,   DataType::kInt64};
constexpr ReduceOp kAllOps[] = {ReduceOp::kSum, ReduceOp::kProd, ReduceOp::kMax, ReduceOp::kMin,
                                ReduceOp::kAvg};
constexpr CollectiveKind kAllKinds[] = {CollectiveKind::kAllReduce, CollectiveKind::kAllGather,
                                        CollectiveKind::kReduceScatter, CollectiveKind::kBroadcast};

// A value outside the enum, as a corrupted or future value from the adapter would be.
const DataType kBadDtype = static_cast<DataType>(99);

// Runs `f`, expects InvalidArgument, and returns its message so the caller can check that it
// names the argument.
template <typename F>
std::string invalid_argument_message(F&& f) {
  try {
    f();
  } catch (const InvalidArgument& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected InvalidArgument, got another exception: " << e.what();
    return {};
  }
  ADD_FAILURE() << "expected InvalidArgument, nothing was thrown";
  return {};
}

// The communicator description validate() words its failures with.
std::function<std::string()> named(const char* where) {
  return [where] { return std::string(where); };
}

// Plausible device addresses; validation never dereferences them.
const void* fake_send() { return reinterpret_cast<const void*>(uintptr_t{0x7f0000001000}); }
void* fake_recv() { return reinterpret_cast<void*>(uintptr_t{0x7f0000002000}); }

Collective valid(CollectiveKind kind, DataType dt = DataType::kFloat32, size_t count = 16) {
  Collective c;
  c.kind = kind;
  c.send = fake_send();
  c.recv = fake_recv();
  c.count = count;
  c.dtype = dt;
  c.op = ReduceOp::kSum;
  c.root = 0;
  return c;
}

// ---------------------------------------------------------------------------------------------
// dtype
// ---------------------------------------------------------------------------------------------

TEST(DType, ElementSizesMatchTheCTypes) {
  EXPECT_EQ(element_size(DataType::kFloat32), sizeof(float));
  EXPECT_EQ(element_size(DataType::kFloat64), sizeof(double));
  EXPECT_EQ(element_size(DataType::kFloat16), 2u);
  EXPECT_EQ(element_size(DataType::kBFloat16), 2u);
  EXPECT_EQ(element_size(DataType::kInt8), sizeof(int8_t));
  EXPECT_EQ(element_size(DataType::kUInt8), sizeof(uint8_t));
  EXPECT_EQ(element_size(DataType::kInt32), sizeof(int32_t));
  EXPECT_EQ(element_size(DataType::kInt64), sizeof(int64_t));
}

TEST(DType, NamesAreTorchSpellings) {
  // The Python layer prints these next to torch dtypes; they must read the same.
  EXPECT_STREQ(dtype_name(DataType::kFloat32), "float32");
  EXPECT_STREQ(dtype_name(DataType::kFloat64), "float64");
  EXPECT_STREQ(dtype_name(DataType::kFloat16), "float16");
  EXPECT_STREQ(dtype_name(DataType::kBFloat16), "bfloat16");
  EXPECT_STREQ(dtype_name(DataType::kInt8), "int8");
  EXPECT_STREQ(dtype_name(DataType::kUInt8), "uint8");
  EXPECT_STREQ(dtype_name(DataType::kInt32), "int32");
  EXPECT_STREQ(dtype_name(DataType::kInt64), "int64");
}

TEST(DType, NcclTypesMatch) {
  EXPECT_EQ(to_nccl(DataType::kFloat32), ncclFloat32);
  EXPECT_EQ(to_nccl(DataType::kFloat64), ncclFloat64);
  EXPECT_EQ(to_nccl(DataType::kFloat16), ncclFloat16);
  EXPECT_EQ(to_nccl(DataType::kBFloat16), ncclBfloat16);
  EXPECT_EQ(to_nccl(DataType::kInt8), ncclInt8);
  EXPECT_EQ(to_nccl(DataType::kUInt8), ncclUint8);
  EXPECT_EQ(to_nccl(DataType::kInt32), ncclInt32);
  EXPECT_EQ(to_nccl(DataType::kInt64), ncclInt64);
}

TEST(DType, FloatingIsExactlyTheFourFloatTypes) {
  for (DataType dt : kAllDtypes) {
    const bool want = dt == DataType::kFloat32 || dt == DataType::kFloat64 || dt == DataType::kFloat16 ||
                      dt == DataType::kBFloat16;
    EXPECT_EQ(is_floating(dt), want) << dtype_name(dt);
  }
}

TEST(DType, UnknownValueIsRejectedNamingDtype) {
  EXPECT_NE(invalid_argument_message([] { (void)element_size(kBadDtype); }).find("dtype"), std::string::npos);
  EXPECT_NE(invalid_argument_message([] { (void)to_nccl(kBadDtype); }).find("dtype"), std::string::npos);
  EXPECT_STREQ(dtype_name(kBadDtype), "unknown");
  EXPECT_FALSE(is_floating(kBadDtype));
}

// ---------------------------------------------------------------------------------------------
// reduce ops
// ---------------------------------------------------------------------------------------------

TEST(ReduceOpParse, EveryValidSpelling) {
  EXPECT_EQ(parse_reduce_op("sum"), ReduceOp::kSum);
  EXPECT_EQ(parse_reduce_op("prod"), ReduceOp::kProd);
  EXPECT_EQ(parse_reduce_op("product"), ReduceOp::kProd);
  EXPECT_EQ(parse_reduce_op("max"), ReduceOp::kMax);
  EXPECT_EQ(parse_reduce_op("min"), ReduceOp::kMin);
  EXPECT_EQ(parse_reduce_op("avg"), ReduceOp::kAvg);
  EXPECT_EQ(parse_reduce_op("mean"), ReduceOp::kAvg);
}

TEST(ReduceOpParse, NameRoundTrips) {
  for (ReduceOp op : kAllOps) EXPECT_EQ(parse_reduce_op(reduce_op_name(op)), op) << reduce_op_name(op);
}

TEST(ReduceOpParse, UnknownNamesAreRejectedNamingOpAndTheValue) {
  // Case and whitespace are not forgiven: one spelling everywhere.
  for (const std::string bad : {"", "SUM", "Sum", " sum", "sum ", "average", "band", "xor", "premulsum"}) {
    const std::string msg = invalid_argument_message([&] { (void)parse_reduce_op(bad); });
    EXPECT_EQ(msg.rfind("op:", 0), 0u) << "message must start with the argument name: " << msg;
    EXPECT_NE(msg.find("'" + bad + "'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("'sum'"), std::string::npos) << "message should list the valid names: " << msg;
  }
}

TEST(ReduceOpNccl, MapsEveryOpOnFloats) {
  for (DataType dt : {DataType::kFloat32, DataType::kFloat64, DataType::kFloat16, DataType::kBFloat16}) {
    EXPECT_EQ(to_nccl(ReduceOp::kSum, dt), ncclSum);
    EXPECT_EQ(to_nccl(ReduceOp::kProd, dt), ncclProd);
    EXPECT_EQ(to_nccl(ReduceOp::kMax, dt), ncclMax);
    EXPECT_EQ(to_nccl(ReduceOp::kMin, dt), ncclMin);
    EXPECT_EQ(to_nccl(ReduceOp::kAvg, dt), ncclAvg);
  }
}

TEST(ReduceOpNccl, AvgOnIntegersIsRejectedNamingOpAndDtype) {
  for (DataType dt : {DataType::kInt8, DataType::kUInt8, DataType::kInt32, DataType::kInt64}) {
    const std::string msg = invalid_argument_message([&] { (void)to_nccl(ReduceOp::kAvg, dt); });
    EXPECT_NE(msg.find("op"), std::string::npos) << msg;
    EXPECT_NE(msg.find("avg"), std::string::npos) << msg;
    EXPECT_NE(msg.find(dtype_name(dt)), std::string::npos) << msg;
    // Every other op is fine on integers.
    EXPECT_EQ(to_nccl(ReduceOp::kSum, dt), ncclSum);
    EXPECT_EQ(to_nccl(ReduceOp::kProd, dt), ncclProd);
    EXPECT_EQ(to_nccl(ReduceOp::kMax, dt), ncclMax);
    EXPECT_EQ(to_nccl(ReduceOp::kMin, dt), ncclMin);
  }
}

TEST(ReduceOpNccl, UnknownOpValueIsRejected) {
  const std::string msg =
      invalid_argument_message([] { (void)to_nccl(static_cast<ReduceOp>(42), DataType::kFloat32); });
  EXPECT_NE(msg.find("op"), std::string::npos) << msg;
  EXPECT_STREQ(reduce_op_name(static_cast<ReduceOp>(42)), "unknown");
}

// ---------------------------------------------------------------------------------------------
// collective validation
// ---------------------------------------------------------------------------------------------

TEST(CollectiveNames, MatchTheTorchOpNames) {
  EXPECT_STREQ(collective_name(CollectiveKind::kAllReduce), "all_reduce");
  EXPECT_STREQ(collective_name(CollectiveKind::kAllGather), "all_gather");
  EXPECT_STREQ(collective_name(CollectiveKind::kReduceScatter), "reduce_scatter");
  EXPECT_STREQ(collective_name(CollectiveKind::kBroadcast), "broadcast");
}

TEST(CollectiveValidate, AcceptsEveryKindDtypeAndSize) {
  for (CollectiveKind kind : kAllKinds)
    for (DataType dt : kAllDtypes)
      for (int size : {1, 2, 3, 8}) EXPECT_NO_THROW(validate(valid(kind, dt), size, named("test"))) << collective_name(kind);
}

TEST(CollectiveValidate, DescribesTheCommunicatorOnlyOnAFailure) {
  // validate() runs before every collective; formatting the description each time cost host time.
  int described = 0;
  const auto count_calls = [&] {
    ++described;
    return std::string("communicator 'tp'");
  };
  for (CollectiveKind kind : kAllKinds) EXPECT_NO_THROW(validate(valid(kind, DataType::kBFloat16), 2, count_calls));
  EXPECT_EQ(described, 0) << "a valid collective formatted the communicator's description";
  Collective no_send = valid(CollectiveKind::kAllReduce, DataType::kFloat32);
  no_send.send = nullptr;
  EXPECT_NE(invalid_argument_message([&] { validate(no_send, 2, count_calls); }).find("communicator 'tp'"),
            std::string::npos);
  EXPECT_EQ(described, 1);
}

TEST(CollectiveValidate, EmptyCollectiveMayHaveNullPointers) {
  // Zero elements move nothing, so there is nothing to point at (torch hands empty tensors
  // with null data pointers).
  for (CollectiveKind kind : kAllKinds) {
    Collective c = valid(kind, DataType::kFloat32, 0);
    c.send = nullptr;
    c.recv = nullptr;
    EXPECT_NO_THROW(validate(c, 2, named("test"))) << collective_name(kind);
  }
}

TEST(CollectiveValidate, NullPointersAreRejectedNamingTheBufferAndTheCall) {
  for (CollectiveKind kind : kAllKinds) {
    Collective no_send = valid(kind);
    no_send.send = nullptr;
    std::string msg = invalid_argument_message([&] { validate(no_send, 2, named("communicator 'tp'")); });
    EXPECT_NE(msg.find(std::string(collective_name(kind)) + " on communicator 'tp'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("send: expected a device pointer"), std::string::npos) << msg;

    Collective no_recv = valid(kind);
    no_recv.recv = nullptr;
    msg = invalid_argument_message([&] { validate(no_recv, 2, named("communicator 'tp'")); });
    EXPECT_NE(msg.find("recv: expected a device pointer"), std::string::npos) << msg;
  }
}

TEST(CollectiveValidate, BroadcastRootMustBeARank) {
  for (int size : {1, 2, 5}) {
    for (int root = 0; root < size; ++root) {
      Collective c = valid(CollectiveKind::kBroadcast);
      c.root = root;
      EXPECT_NO_THROW(validate(c, size, named("test"))) << "root " << root << " of " << size;
    }
    for (int root : {-1, size, size + 7, std::numeric_limits<int>::min()}) {
      Collective c = valid(CollectiveKind::kBroadcast);
      c.root = root;
      const std::string msg = invalid_argument_message([&] { validate(c, size, named("test")); });
      EXPECT_NE(msg.find("root: expected a rank in [0, " + std::to_string(size) + "), got " + std::to_string(root)),
                std::string::npos)
          << msg;
    }
  }
}

TEST(CollectiveValidate, RootIsIgnoredOutsideBroadcast) {
  for (CollectiveKind kind : {CollectiveKind::kAllReduce, CollectiveKind::kAllGather, CollectiveKind::kReduceScatter}) {
    Collective c = valid(kind);
    c.root = -3;
    EXPECT_NO_THROW(validate(c, 2, named("test"))) << collective_name(kind);
  }
}

TEST(CollectiveValidate, AvgOnIntegersIsRejectedOnlyWhereTheOpIsUsed) {
  for (DataType dt : {DataType::kInt8, DataType::kUInt8, DataType::kInt32, DataType::kInt64}) {
    for (CollectiveKind kind : kAllKinds) {
      Collective c = valid(kind, dt);
      c.op = ReduceOp::kAvg;
      const bool reduces = kind == CollectiveKind::kAllReduce || kind == CollectiveKind::kReduceScatter;
      if (reduces) {
        const std::string msg = invalid_argument_message([&] { validate(c, 2, named("test")); });
        EXPECT_NE(msg.find("avg"), std::string::npos) << msg;
      } else {
        // all_gather and broadcast carry no op; a leftover avg must not reject them.
        EXPECT_NO_THROW(validate(c, 2, named("test"))) << collective_name(kind) << " " << dtype_name(dt);
      }
    }
  }
}

TEST(CollectiveValidate, UnknownDtypeIsRejected) {
  for (CollectiveKind kind : kAllKinds) {
    Collective c = valid(kind);
    c.dtype = kBadDtype;
    EXPECT_NE(invalid_argument_message([&] { validate(c, 2, named("test")); }).find("dtype"), std::string::npos);
  }
}

TEST(CollectiveValidate, GatherAndScatterCountsWhoseTotalOverflowAreRejected) {
  // all_gather receives size * count elements and reduce_scatter sends as many; their byte size
  // must fit size_t or the stats and NCCL's own arithmetic wrap around.
  const size_t max = std::numeric_limits<size_t>::max();
  for (CollectiveKind kind : {CollectiveKind::kAllGather, CollectiveKind::kReduceScatter}) {
    for (DataType dt : {DataType::kInt8, DataType::kFloat16, DataType::kFloat32, DataType::kInt64}) {
      for (int size : {1, 2, 3, 8}) {
        const size_t limit = max / element_size(dt) / static_cast<size_t>(size);
        Collective ok = valid(kind, dt, limit);
        EXPECT_NO_THROW(validate(ok, size, named("test"))) << collective_name(kind) << " " << dtype_name(dt) << " x" << size;
        if (limit == max) continue;  // 1-byte elements on one rank: every size_t count fits
        Collective over = valid(kind, dt, limit + 1);
        const std::string msg = invalid_argument_message([&] { validate(over, size, named("test")); });
        EXPECT_NE(msg.find("count"), std::string::npos) << msg;
        EXPECT_NE(msg.find("overflows"), std::string::npos) << msg;
      }
    }
  }
}

TEST(CollectiveValidate, ReduceAndBroadcastCountsWhoseBytesOverflowAreRejected) {
  const size_t max = std::numeric_limits<size_t>::max();
  for (CollectiveKind kind : {CollectiveKind::kAllReduce, CollectiveKind::kBroadcast}) {
    const size_t limit = max / element_size(DataType::kFloat32);
    EXPECT_NO_THROW(validate(valid(kind, DataType::kFloat32, limit), 2, named("test")));
    const std::string msg = invalid_argument_message([&] { validate(valid(kind, DataType::kFloat32, limit + 1), 2, named("test")); });
    EXPECT_NE(msg.find("overflows"), std::string::npos) << msg;
  }
}

TEST(CollectiveValidate, NonPositiveCommunicatorSizeIsRejected) {
  for (int size : {0, -3}) {
    const std::string msg =
        invalid_argument_message([&] { validate(valid(CollectiveKind::kAllGather, DataType::kFloat32, 4), size, named("test")); });
    EXPECT_NE(msg.find("size"), std::string::npos) << msg;
  }
}

TEST(CollectiveValidate, EmptyBroadcastStillChecksTheRoot) {
  // Null pointers are legal for zero elements, but every rank must still agree on a real root:
  // a bad root is a bug in the caller whatever the size.
  Collective c = valid(CollectiveKind::kBroadcast, DataType::kFloat32, 0);
  c.send = nullptr;
  c.recv = nullptr;
  c.root = 5;
  const std::string msg = invalid_argument_message([&] { validate(c, 2, named("test")); });
  EXPECT_NE(msg.find("root"), std::string::npos) << msg;
}

TEST(CollectiveInputBytes, PerKind) {
  for (DataType dt : kAllDtypes) {
    const size_t e = element_size(dt);
    for (int size : {1, 2, 4}) {
      for (size_t count : {size_t{0}, size_t{1}, size_t{7}, size_t{4097}}) {
        const size_t n = static_cast<size_t>(size);
        EXPECT_EQ(input_bytes(valid(CollectiveKind::kAllReduce, dt, count), size), count * e);
        // all_gather: count is what each rank sends.
        EXPECT_EQ(input_bytes(valid(CollectiveKind::kAllGather, dt, count), size), count * e);
        // reduce_scatter: count is what each rank receives; it sends size times that.
        EXPECT_EQ(input_bytes(valid(CollectiveKind::kReduceScatter, dt, count), size), count * e * n);
        EXPECT_EQ(input_bytes(valid(CollectiveKind::kBroadcast, dt, count), size), count * e);
      }
    }
  }
}

}  // namespace
}  // namespace tpext::core
