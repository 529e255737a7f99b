// KV transfer engine across processes: this test binary re-runs itself as a child that hosts the receiving engine
// and publishes its pool descriptor over a pipe. The parent pushes pages, then kills or stops the child and checks
// that every transfer still ends (error callback, deadline) and nothing hangs.
#include <doctest/doctest.h>

#include <fstream>

#include "transport/kv_transfer.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

using namespace petrel::transport;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

namespace {

constexpr const char* child_env = "PETREL_KV_TEST_CHILD_POOL";
constexpr const char* child_tls_env = "PETREL_KV_TEST_CHILD_TLS";
constexpr int child_report_fd = 3;

uint64_t fnv1a(const uint8_t* p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

void write_line(int fd, const std::string& s) {
  std::string line = s + "\n";
  size_t off = 0;
  while (off < line.size()) {
    auto n = ::write(fd, line.data() + off, line.size() - off);
    if (n <= 0) return;
    off += size_t(n);
  }
}

kv_transfer_options loopback(const std::string& tls = "tcp") {
  kv_transfer_options o;
  o.transports = tls;
  o.net_devices = tls == "tcp" ? "lo" : "";
  o.transfer_deadline = 5s;
  return o;
}

/// The child: a receiving engine whose pool starts zeroed. It reports "desc <hex>" once, then
/// "notice <transfer_id> <epoch> <bytes> <fnv of the whole pool>" per notice, until its stdin closes.
class child_receiver {
public:
  explicit child_receiver(size_t pool_bytes, const std::string& tls = "tcp") {
    int to_child[2], from_child[2];
    REQUIRE(::pipe2(to_child, O_CLOEXEC) == 0);
    REQUIRE(::pipe2(from_child, O_CLOEXEC) == 0);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, to_child[0], 0);
    posix_spawn_file_actions_adddup2(&fa, from_child[1], child_report_fd);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    std::vector<std::string> env_store;
    for (char** e = environ; *e; ++e) env_store.emplace_back(*e);
    env_store.push_back(std::string(child_env) + "=" + std::to_string(pool_bytes));
    env_store.push_back(std::string(child_tls_env) + "=" + tls);
    std::vector<char*> envp;
    for (auto& s : env_store) envp.push_back(s.data());
    envp.push_back(nullptr);
    std::string exe = "/proc/self/exe", filter = "--test-case=kv child*";
    char* argv[] = {exe.data(), filter.data(), nullptr};
    int rc = posix_spawn(&pid_, "/proc/self/exe", &fa, nullptr, argv, envp.data());
    posix_spawn_file_actions_destroy(&fa);
    REQUIRE(rc == 0);
    ::close(to_child[0]);
    ::close(from_child[1]);
    stdin_fd_ = to_child[1];
    report_fd_ = from_child[0];
    auto line = read_line(10s);
    REQUIRE_MESSAGE(line.rfind("desc ", 0) == 0, "child said: '" << line << "'");
    auto bytes = from_hex(line.substr(5));
    REQUIRE(bytes.has_value());
    auto d = kv_pool_descriptor::from_bytes(*bytes);
    REQUIRE_MESSAGE(d.has_value(), d.error());
    descriptor = *d;
  }
  ~child_receiver() {
    if (stdin_fd_ >= 0) ::close(stdin_fd_);
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (report_fd_ >= 0) ::close(report_fd_);
  }

  /// One line from the child, or "" after the timeout / EOF.
  std::string read_line(std::chrono::milliseconds limit) {
    auto until = steady::now() + limit;
    while (true) {
      auto nl = buffer_.find('\n');
      if (nl != std::string::npos) {
        auto line = buffer_.substr(0, nl);
        buffer_.erase(0, nl + 1);
        return line;
      }
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - steady::now()).count();
      if (left <= 0) return "";
      pollfd p{report_fd_, POLLIN, 0};
      if (::poll(&p, 1, int(left)) <= 0) continue;
      char chunk[4096];
      auto n = ::read(report_fd_, chunk, sizeof chunk);
      if (n <= 0) return "";
      buffer_.append(chunk, size_t(n));
    }
  }

  void signal(int sig) {
    ::kill(pid_, sig);
    if (sig != SIGSTOP)
      return;
    // kill() returns before the child is stopped: wait until /proc says so, or the test races it.
    for (int i = 0; i < 200; ++i) {
      std::ifstream stat("/proc/" + std::to_string(pid_) + "/stat");
      std::string line;
      std::getline(stat, line);
      auto close = line.rfind(')');
      if (close != std::string::npos && close + 2 < line.size() && line[close + 2] == 'T')
        return;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  void reap() {
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

  kv_pool_descriptor descriptor;

private:
  pid_t pid_ = -1;
  int stdin_fd_ = -1;
  int report_fd_ = -1;
  std::string buffer_;
};

template <class T>
class inbox {
public:
  void push(const T& v) {
    std::lock_guard<std::mutex> lock(mutex_);
    items_.push_back(v);
    cv_.notify_all();
  }
  template <class Pred>
  bool wait_until(Pred pred, std::chrono::milliseconds limit) {
    std::unique_lock<std::mutex> lock(mutex_);
    return cv_.wait_for(lock, limit, [&] { return pred(items_); });
  }
  std::vector<T> items() {
    std::lock_guard<std::mutex> lock(mutex_);
    return items_;
  }

private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<T> items_;
};

struct sender_side {
  std::unique_ptr<kv_transfer_engine> engine;
  std::vector<uint8_t> pool;
  kv_pool_descriptor desc;
  kv_peer_id peer = 0;
  inbox<std::pair<kv_peer_id, std::string>> lost;

  sender_side(size_t bytes, const kv_pool_descriptor& remote, kv_transfer_options options = loopback())
      : pool(bytes) {
    for (size_t i = 0; i < pool.size(); ++i) pool[i] = uint8_t((i * 2654435761u) >> 9);
    auto e = kv_transfer_engine::create(std::move(options));
    REQUIRE_MESSAGE(e.has_value(), e.error());
    engine = std::move(*e);
    auto d = engine->register_pool(pool.data(), pool.size());
    REQUIRE(d.has_value());
    desc = *d;
    engine->on_peer_lost([this](kv_peer_id p, const std::string& why) { lost.push({p, why}); });
    auto p = engine->connect(remote.worker_address);
    REQUIRE_MESSAGE(p.has_value(), p.error());
    peer = *p;
  }
};

} // namespace

// -- the child's side ------------------------------------------------------------------------------------------

TEST_CASE("kv child: receiving engine (does nothing unless spawned by the tests below)") {
  const char* pool_env = std::getenv(child_env);
  if (!pool_env) return;
  size_t bytes = std::strtoull(pool_env, nullptr, 10);
  std::vector<uint8_t> pool(bytes, 0);
  const char* tls = std::getenv(child_tls_env);
  auto e = kv_transfer_engine::create(loopback(tls ? tls : "tcp"));
  if (!e) {
    write_line(child_report_fd, "error " + e.error());
    std::_Exit(1);
  }
  auto& engine = *e;
  auto d = engine->register_pool(pool.data(), pool.size());
  if (!d) {
    write_line(child_report_fd, "error " + d.error());
    std::_Exit(1);
  }
  engine->on_notify([&](const kv_transfer_notice& n) {
    std::ostringstream s;
    s << "notice " << n.transfer_id << ' ' << n.epoch << ' ' << n.bytes << ' ' << fnv1a(pool.data(), pool.size());
    write_line(child_report_fd, s.str());
  });
  write_line(child_report_fd, "desc " + to_hex(d->to_bytes()));
  char c;
  while (::read(0, &c, 1) > 0) {
  }
  std::_Exit(0); // the parent closed our stdin: done
}

// -- the parent's side ------------------------------------------------------------------------------------------

TEST_CASE("kv transfer across processes: scattered pages land exactly and the notice follows the data") {
  constexpr uint64_t page = 64 * 1024;
  inbox<kv_transfer_result> results; // outlives the engine, whose callbacks push here
  child_receiver child(64 * page);
  sender_side sender(64 * page, child.descriptor);
  std::vector<kv_page_range> ranges;
  for (uint64_t i = 0; i < 24; ++i) ranges.push_back({(i * 7 % 64) * page, (63 - i * 2 % 64) * page, page});
  ranges.push_back({40 * page, 1 * page, page}); // with the next one: adjacent on both sides, one put
  ranges.push_back({41 * page, 2 * page, page});
  sender.engine->transfer(sender.peer, sender.desc.pool_id, child.descriptor, ranges, 77, 5,
                          [&](const kv_transfer_result& r) { results.push(r); });
  REQUIRE(results.wait_until([](auto& v) { return !v.empty(); }, 10s));
  auto r = results.items()[0];
  REQUIRE_MESSAGE(r.ok(), r.error);
  CHECK(r.puts == ranges.size() - 1);

  auto line = child.read_line(5s);
  std::istringstream in(line);
  std::string word;
  uint64_t id = 0, epoch = 0, bytes = 0, hash = 0;
  in >> word >> id >> epoch >> bytes >> hash;
  REQUIRE_MESSAGE(word == "notice", "child said: '" << line << "'");
  CHECK(id == 77);
  CHECK(epoch == 5);
  CHECK(bytes == ranges.size() * page);
  // The child hashed its pool inside the notice callback: the data was already there.
  std::vector<uint8_t> expect(64 * page, 0);
  for (auto& x : ranges) std::memcpy(expect.data() + x.dst_offset, sender.pool.data() + x.src_offset, x.length);
  CHECK(hash == fnv1a(expect.data(), expect.size()));
}

TEST_CASE("kv transfer: receiver SIGKILLed mid-stream -> every in-flight transfer fails within 2 s, no hang") {
  constexpr uint64_t page = 64 * 1024, pages = 1024; // 64 MiB pools
  // A stream that keeps `window` transfers of 16 scattered pages (1 MiB) in flight, resubmitting from the callback.
  // (Declared before the engine, which must go first.)
  constexpr int window = 32;
  std::atomic<bool> keep_going{true};
  std::atomic<uint64_t> submitted{0};
  std::mutex m;
  std::map<uint64_t, int> callbacks_per_id;
  inbox<kv_transfer_result> results, after;
  std::function<void()> submit_one;
  child_receiver child(pages * page);
  sender_side sender(pages * page, child.descriptor);

  submit_one = [&] {
    uint64_t id = submitted.fetch_add(1);
    std::vector<kv_page_range> ranges;
    for (uint64_t i = 0; i < 16; ++i) {
      uint64_t src = (id * 16 + i * 37) % pages, dst = (id * 16 + i * 61 + 5) % pages;
      ranges.push_back({src * page, dst * page, page});
    }
    auto merged = coalesce_page_ranges(ranges);
    if (!merged) { // a rare overlap of destinations: use one page instead
      ranges.resize(1);
    }
    sender.engine->transfer(sender.peer, sender.desc.pool_id, child.descriptor, ranges, id, 1,
                            [&](const kv_transfer_result& r) {
                              {
                                std::lock_guard<std::mutex> lock(m);
                                callbacks_per_id[r.transfer_id]++;
                              }
                              results.push(r);
                              if (r.ok() && keep_going.load()) submit_one();
                            });
  };
  for (int i = 0; i < window; ++i) submit_one();
  REQUIRE(results.wait_until([](auto& v) { return v.size() >= 20; }, 10s));
  auto killed_at = steady::now();
  size_t ended_before_kill = results.items().size();
  child.signal(SIGKILL);
  child.reap();

  // Every callback arrives, and the last one within 2 s of the kill.
  bool all_done = results.wait_until(
      [&](auto& v) {
        bool failed = false;
        for (auto& r : v) failed |= !r.ok();
        if (failed) keep_going.store(false);
        return failed && v.size() == submitted.load();
      },
      5s);
  auto took = steady::now() - killed_at;
  keep_going.store(false);
  REQUIRE_MESSAGE(all_done, "only " << results.items().size() << " of " << submitted.load() << " callbacks came");
  CHECK(took < 2s);
  MESSAGE("all " << submitted.load() << " transfers ended (" << results.items().size() - ended_before_kill << " after the kill), the last "
                 << std::chrono::duration_cast<std::chrono::milliseconds>(took).count() << " ms after SIGKILL");
  size_t lost = 0, ok = 0;
  for (auto& r : results.items()) {
    if (r.ok()) ++ok;
    if (r.status == kv_transfer_status::peer_lost) {
      ++lost;
      CHECK(r.error.find("lost") != std::string::npos);
    } else {
      CHECK_MESSAGE(r.ok(), to_string(r.status) << ": " << r.error);
    }
  }
  CHECK(ok >= 20);
  CHECK(lost >= 1);
  for (auto& [id, n] : callbacks_per_id) CHECK_MESSAGE(n == 1, "transfer " << id << " got " << n << " callbacks");
  REQUIRE(sender.lost.wait_until([](auto& v) { return !v.empty(); }, 2s));
  CHECK(sender.lost.items()[0].first == sender.peer);
  CHECK(sender.engine->in_flight() == 0);
  CHECK(sender.engine->counters().peers_lost == 1);
  CHECK(sender.engine->counters().failed_peer_lost == lost);

  // Later transfers to the dead peer fail at once.
  sender.engine->transfer(sender.peer, sender.desc.pool_id, child.descriptor, {{0, 0, page}}, 9999, 1,
                          [&](const kv_transfer_result& r) { after.push(r); });
  REQUIRE(after.wait_until([](auto& v) { return !v.empty(); }, 1s));
  CHECK(after.items()[0].status == kv_transfer_status::peer_lost);
}

TEST_CASE("kv transfer: a peer that stops progressing (SIGSTOP) -> the transfer times out at its deadline") {
  constexpr uint64_t page = 4096;
  inbox<kv_transfer_result> results;
  child_receiver child(256 * page);
  sender_side sender(256 * page, child.descriptor);
  // One transfer while the child runs, so the endpoint is wired up.
  sender.engine->transfer(sender.peer, sender.desc.pool_id, child.descriptor, {{0, 0, 4 * page}}, 1, 1,
                          [&](const kv_transfer_result& r) { results.push(r); });
  REQUIRE(results.wait_until([](auto& v) { return !v.empty(); }, 5s));
  REQUIRE_MESSAGE(results.items()[0].ok(), results.items()[0].error);

  child.signal(SIGSTOP);
  kv_transfer_request req;
  req.peer = sender.peer;
  req.local_pool = sender.desc.pool_id;
  req.remote = child.descriptor;
  req.ranges = {{0, 8 * page, 4 * page}};
  req.transfer_id = 2;
  req.epoch = 1;
  req.deadline = 1000ms;
  auto start = steady::now();
  sender.engine->transfer(req, [&](const kv_transfer_result& r) { results.push(r); });
  REQUIRE(results.wait_until([](auto& v) { return v.size() >= 2; }, 5s));
  auto took = steady::now() - start;
  auto r = results.items()[1];
  CHECK(r.transfer_id == 2);
  CHECK(r.status == kv_transfer_status::timeout);
  CHECK(r.error.find("1000 ms") != std::string::npos);
  CHECK(took >= 950ms);
  CHECK(took < 1600ms);
  MESSAGE("timed out after " << std::chrono::duration_cast<std::chrono::milliseconds>(took).count() << " ms: "
                             << r.error);

  // Killing the stopped child is then seen as a lost peer, and the timed-out transfer is not reported again.
  child.signal(SIGKILL);
  child.reap();
  REQUIRE(sender.lost.wait_until([](auto& v) { return !v.empty(); }, 2s));
  std::this_thread::sleep_for(100ms);
  CHECK(results.items().size() == 2);
  CHECK(sender.engine->counters().failed_timeout == 1);
}

TEST_CASE("kv transfer over shm (no failure detection): a killed receiver is caught by the deadline, not a hang") {
  constexpr uint64_t page = 64 * 1024, pages = 256;
  inbox<kv_transfer_result> results;
  child_receiver child(pages * page, "shm");
  auto options = loopback("shm");
  options.transfer_deadline = 1000ms;
  sender_side sender(pages * page, child.descriptor, options);
  auto request = [&](uint64_t id, std::chrono::milliseconds deadline) {
    kv_transfer_request req;
    req.peer = sender.peer;
    req.local_pool = sender.desc.pool_id;
    req.remote = child.descriptor;
    for (uint64_t i = 0; i < 8; ++i) req.ranges.push_back({((id + i * 3) % pages) * page, ((id * 8 + i * 5) % pages) * page, page});
    req.transfer_id = id;
    req.deadline = deadline;
    return req;
  };
  // Wire-up while the child lives (generous deadline: shm is slow when this host is loaded).
  sender.engine->transfer(request(0, 10'000ms), [&](const kv_transfer_result& r) { results.push(r); });
  REQUIRE(results.wait_until([](auto& v) { return !v.empty(); }, 15s));
  REQUIRE_MESSAGE(results.items()[0].ok(), results.items()[0].error);

  for (uint64_t id = 1; id <= 8; ++id)
    sender.engine->transfer(request(id, 1000ms), [&](const kv_transfer_result& r) { results.push(r); });
  auto killed_at = steady::now();
  child.signal(SIGKILL);
  child.reap();
  bool all_done = results.wait_until([](auto& v) { return v.size() == 9; }, 5s);
  auto took = steady::now() - killed_at;
  REQUIRE_MESSAGE(all_done, "only " << results.items().size() - 1 << " of 8 callbacks came");
  std::map<std::string, int> by_status;
  auto all = results.items();
  for (size_t i = 1; i < all.size(); ++i) by_status[to_string(all[i].status)]++;
  std::ostringstream summary;
  for (auto& [k, n] : by_status) summary << k << "=" << n << " ";
  MESSAGE("shm: the 8 transfers around the kill ended within "
          << std::chrono::duration_cast<std::chrono::milliseconds>(took).count() << " ms: " << summary.str()
          << "(ok = finished before the kill, or written into the dead peer's orphaned FIFO)");
  CHECK(took < 2500ms);
  CHECK(by_status["peer_lost"] == 0);   // error mode NONE: nothing reports the death...
  CHECK(sender.lost.items().empty());    // ...and no peer-lost callback, by design
}

TEST_CASE("kv transfer: a stale descriptor (its process already dead) is an error, never a hang") {
  constexpr uint64_t page = 4096;
  inbox<kv_transfer_result> results;
  inbox<std::string> lost;
  child_receiver child(64 * page);
  kv_pool_descriptor stale = child.descriptor;
  child.signal(SIGKILL);
  child.reap();
  auto e = kv_transfer_engine::create(loopback());
  REQUIRE(e.has_value());
  auto& engine = *e;
  std::vector<uint8_t> pool(64 * page, 1);
  auto local = engine->register_pool(pool.data(), pool.size());
  REQUIRE(local.has_value());
  engine->on_peer_lost([&](kv_peer_id, const std::string& why) { lost.push(why); });
  auto start = steady::now();
  auto peer = engine->connect(stale.worker_address);
  if (!peer) {
    // tcp refuses at once: the listening socket is gone.
    MESSAGE("stale peer refused by connect(): " << peer.error());
    CHECK(peer.error().find("unreachable") != std::string::npos);
  } else {
    engine->transfer(*peer, local->pool_id, stale, {{0, 0, page}}, 5, 2,
                     [&](const kv_transfer_result& r) { results.push(r); });
    REQUIRE(results.wait_until([](auto& v) { return !v.empty(); }, 5s));
    CHECK(results.items()[0].status == kv_transfer_status::peer_lost);
    MESSAGE("stale peer: " << results.items()[0].error);
  }
  CHECK(steady::now() - start < 2s);
}
