#include "watchdog.h"

#include "communicator.h"

namespace tpext::core {

Watchdog& Watchdog::instance() {
  // Leaked on purpose: its thread must outlive static destruction (detached at exit).
  static Watchdog* w = new Watchdog;
  return *w;
}

void Watchdog::watch(Communicator* comm) {
  std::lock_guard<std::mutex> lock(mu_);
  comms_.insert(comm);
  if (!started_) {
    started_ = true;
    thread_ = std::thread([this] { loop(); });
    thread_.detach();
  }
}

void Watchdog::unwatch(Communicator* comm) {
  std::lock_guard<std::mutex> lock(mu_);  // a poll in flight holds mu_: this waits for it
  comms_.erase(comm);
}

void Watchdog::loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    wake_.wait_for(lock, kPollInterval);
    const auto now = std::chrono::steady_clock::now();
    for (Communicator* c : comms_) c->watchdog_poll(now);
  }
}

}  // namespace tpext::core
