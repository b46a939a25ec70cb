#include "registry.h"

#include <mutex>
#include <string>
#include <unordered_map>

#include "core/error.h"

namespace tpext::adapter {
namespace {

struct Table {
  std::mutex mu;
  int64_t next = 1;  // 0 and negatives never name a communicator
  std::unordered_map<int64_t, std::shared_ptr<core::Communicator>> comms;
};

Table& table() {
  // Leaked on purpose: destroying communicators during static destruction would call into a CUDA
  // runtime and NCCL that may already be unloaded.
  static Table* t = new Table;
  return *t;
}

}  // namespace

int64_t register_communicator(std::unique_ptr<core::Communicator> comm) {
  Table& t = table();
  std::lock_guard<std::mutex> lock(t.mu);
  const int64_t handle = t.next++;
  t.comms.emplace(handle, std::shared_ptr<core::Communicator>(std::move(comm)));
  return handle;
}

std::shared_ptr<core::Communicator> lookup_communicator(int64_t handle, const char* what) {
  Table& t = table();
  std::lock_guard<std::mutex> lock(t.mu);
  auto it = t.comms.find(handle);
  if (it == t.comms.end())
    core::throw_invalid_argument(std::string(what) + ": comm: no live communicator has handle " +
                                 std::to_string(handle) +
                                 " (destroyed by tpext.destroy(), or never created); call tpext.init() first");
  return it->second;
}

std::shared_ptr<core::Communicator> release_communicator(int64_t handle) {
  Table& t = table();
  std::lock_guard<std::mutex> lock(t.mu);
  auto it = t.comms.find(handle);
  if (it == t.comms.end()) return nullptr;
  auto comm = it->second;
  t.comms.erase(it);
  return comm;
}

std::vector<int64_t> live_handles() {
  Table& t = table();
  std::lock_guard<std::mutex> lock(t.mu);
  std::vector<int64_t> out;
  for (const auto& kv : t.comms) out.push_back(kv.first);
  return out;
}

}  // namespace tpext::adapter
