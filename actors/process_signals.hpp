// SIGINT/SIGTERM handling for processes that run an actor system: the signals are blocked in every
// thread (construct this before the actor system starts its threads) and a dedicated thread waits
// for them and runs the callback, which typically sends a stop message.
#pragma once

#include <functional>
#include <memory>

namespace petrel {

class signal_watcher {
public:
  signal_watcher();
  ~signal_watcher();
  signal_watcher(const signal_watcher&) = delete;
  signal_watcher& operator=(const signal_watcher&) = delete;

  /// Runs `f(signal)` on the watcher thread for each SIGINT/SIGTERM from now on.
  void on_signal(std::function<void(int)> f);

private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

/// `kill -USR2 <pid>` makes every thread of this process write its stack to stderr (a node's log): the frames as
/// backtrace_symbols_fd prints them (binary(+offset); `addr2line -f -C -e <petrel binary> <offset>` names them) and
/// the thread's name. For a process that hangs: which call each thread is held in. Call once, early.
void install_stack_dump_signal();

} // namespace petrel
