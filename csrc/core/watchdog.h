// A process-wide thread that watches every live communicator. A collective that does not
// complete within its communicator's timeout (a peer died, or ranks diverged and wait on
// different collectives), or an asynchronous NCCL error, makes the watchdog abort the
// communicator from its own thread: that releases the NCCL kernels the streams are stuck behind,
// so the process can go on; the next call on the communicator throws the recorded cause. The hot
// path pays one event record per collective call and takes no host synchronisation.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <set>
#include <thread>

namespace tpext::core {

class Communicator;

class Watchdog {
 public:
  static Watchdog& instance();
  void watch(Communicator* comm);
  // After unwatch returns the watchdog no longer touches `comm` (it waits for a poll in flight).
  void unwatch(Communicator* comm);
  static constexpr std::chrono::milliseconds kPollInterval{20};

 private:
  Watchdog() = default;
  void loop();

  std::mutex mu_;
  std::condition_variable wake_;
  std::set<Communicator*> comms_;
  std::thread thread_;
  bool started_ = false;
};

}  // namespace tpext::core
