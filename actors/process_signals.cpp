#include "actors/process_signals.hpp"

#include <pthread.h>
#include <signal.h>

#include <atomic>
#include <mutex>
#include <thread>

namespace petrel {

struct signal_watcher::impl {
  sigset_t set;
  std::mutex mtx;
  std::function<void(int)> callback;
  std::atomic<bool> done{false};
  std::thread thread;
};

signal_watcher::signal_watcher() : impl_(std::make_unique<impl>()) {
  sigemptyset(&impl_->set);
  sigaddset(&impl_->set, SIGINT);
  sigaddset(&impl_->set, SIGTERM);
  sigaddset(&impl_->set, SIGUSR1); // used to wake the watcher at destruction
  pthread_sigmask(SIG_BLOCK, &impl_->set, nullptr);
  impl_->thread = std::thread([p = impl_.get()] {
    while (!p->done) {
      int sig = 0;
      if (sigwait(&p->set, &sig) != 0 || p->done)
        continue;
      if (sig == SIGUSR1)
        continue;
      std::function<void(int)> f;
      {
        std::lock_guard<std::mutex> guard{p->mtx};
        f = p->callback;
      }
      if (f)
        f(sig);
    }
  });
}

signal_watcher::~signal_watcher() {
  impl_->done = true;
  pthread_kill(impl_->thread.native_handle(), SIGUSR1);
  impl_->thread.join();
}

void signal_watcher::on_signal(std::function<void(int)> f) {
  std::lock_guard<std::mutex> guard{impl_->mtx};
  impl_->callback = std::move(f);
}

} // namespace petrel
