#include "actors/process_signals.hpp"

#include <execinfo.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

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

// -- stack dumps ----------------------------------------------------------------------------------------------

namespace {

std::atomic<int> dump_round{0}; // bumped by the thread that receives the process-directed signal

// Async-signal-safe writes only (write(2), backtrace_symbols_fd, open/read of /proc).
void write_str(const char* s) {
  size_t n = 0;
  while (s[n]) ++n;
  while (n > 0) {
    const ssize_t w = ::write(2, s, n);
    if (w <= 0) return;
    s += w;
    n -= size_t(w);
  }
}

void write_num(long v) {
  char buf[24];
  int i = 23;
  buf[i] = 0;
  if (v == 0) buf[--i] = '0';
  while (v > 0 && i > 0) {
    buf[--i] = char('0' + v % 10);
    v /= 10;
  }
  write_str(buf + i);
}

void dump_self() {
  static std::mutex* serial = new std::mutex; // one thread's frames at a time (try_lock: never block in a handler)
  void* frames[48];
  const int n = backtrace(frames, 48);
  for (int spin = 0; spin < 2000000 && !serial->try_lock(); ++spin) {
  }
  char name[32] = {0};
  pthread_getname_np(pthread_self(), name, sizeof name);
  write_str("--- stack of thread ");
  write_num(long(syscall(SYS_gettid)));
  write_str(" (");
  write_str(name);
  write_str(")\n");
  backtrace_symbols_fd(frames, n, 2);
  serial->unlock();
}

void on_dump_signal(int, siginfo_t* info, void*) {
  // The process-directed signal (from kill) comes with si_pid of the sender; the ones this handler sends to the
  // other threads come from this process.
  const bool from_outside = info && info->si_pid != getpid();
  if (from_outside) {
    dump_round.fetch_add(1);
    const int self = int(syscall(SYS_gettid));
    const int fd = ::open("/proc/self/task", O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
      char buf[4096];
      for (;;) {
        const long got = syscall(SYS_getdents64, fd, buf, sizeof buf);
        if (got <= 0) break;
        for (long at = 0; at < got;) {
          // struct linux_dirent64: u64 ino, s64 off, u16 reclen, u8 type, char name[]
          const unsigned short reclen = *reinterpret_cast<unsigned short*>(buf + at + 16);
          const char* dname = buf + at + 19;
          long tid = 0;
          for (const char* c = dname; *c >= '0' && *c <= '9'; ++c) tid = tid * 10 + (*c - '0');
          if (tid > 0 && tid != self) syscall(SYS_tgkill, getpid(), int(tid), SIGUSR2);
          at += reclen;
        }
      }
      ::close(fd);
    }
  }
  dump_self();
}

} // namespace

void install_stack_dump_signal() {
  struct sigaction sa {};
  sa.sa_sigaction = on_dump_signal;
  sa.sa_flags = SA_SIGINFO | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGUSR2, &sa, nullptr);
  void* warm[1];
  backtrace(warm, 1); // loads libgcc's unwinder now, not inside a handler
}

} // namespace petrel
