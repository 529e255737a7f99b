// petrel bench-kv: KV-page transfer bandwidth and latency between two kv_transfer_engines on this host.
//   petrel bench-kv --pages 64 --page-bytes 73728 --tls tcp            (two processes, UCX over loopback tcp)
//   petrel bench-kv --pages 64 --page-bytes 73728 --tls shm            (two processes, UCX shared memory)
//   petrel bench-kv --mode thread | --mode memcpy                      (two engines in one process)
//   petrel bench-kv --memory cuda [--gpu-path staged]                  (GPU pools: CUDA IPC or staged via host)
// Every transfer moves --pages scattered pages (no two adjacent, so one put per page) unless --contiguous.
// Latency: one transfer at a time (put -> flush -> notify, callback on the sender). Bandwidth: --inflight at once.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "kernels/device_memory.hpp"
#include "tools/command.hpp"
#include "transport/kv_transfer.hpp"

extern char** environ;

namespace {

using namespace petrel::transport;
using steady = std::chrono::steady_clock;

struct bench_kv_options {
  uint64_t pages = 64;
  uint64_t page_bytes = 73728; // 64 tokens x 576 latent dims x bf16: one DeepSeek-V3 MLA page of one layer
  std::string tls = "tcp";
  std::string net_devices = "lo";
  size_t tcp_seg_bytes = 256 * 1024;
  int idle_wakeup_ms = 5;
  std::string mode = "process";
  int transfers = 200;
  int repeat = 3;
  int inflight = 8;
  bool contiguous = false;
  bool busy_poll = false;
  bool json = false;
  std::string memory = "host";  // host | cuda: where both pools live
  std::string gpu_path = "auto"; // auto (CUDA IPC on one host) | staged (pinned host mirrors + UCX)
  int device = 0;
  std::string role;       // "receiver": internal, the child process of --mode process
  uint64_t pool_bytes = 0; // receiver role
};

int bad_input(const std::string& msg) {
  std::fprintf(stderr, "petrel bench-kv: %s\n", msg.c_str());
  return petrel::cli::exit_bad_input;
}

int failure(const std::string& msg) {
  std::fprintf(stderr, "petrel bench-kv: %s\n", msg.c_str());
  return petrel::cli::exit_failure;
}

kv_transfer_options engine_options(const bench_kv_options& o, bool local_copy) {
  kv_transfer_options e;
  e.transports = o.tls;
  e.net_devices = o.tls.find("tcp") != std::string::npos ? o.net_devices : "";
  e.allow_local_copy = local_copy;
  e.allow_cuda_ipc = o.gpu_path != "staged";
  e.gpu_host_mirror = o.gpu_path != "ipc";
  e.busy_poll = o.busy_poll;
  e.tcp_segment_bytes = o.tcp_seg_bytes;
  e.idle_wakeup = std::chrono::milliseconds(o.idle_wakeup_ms);
  e.transfer_deadline = std::chrono::milliseconds(30'000);
  e.name = "petrel-bench-kv";
  return e;
}

/// A pool of the benchmark, in host memory or on a GPU (--memory cuda), zeroed.
class bench_pool {
public:
  bench_pool(size_t bytes, const bench_kv_options& o) : bytes_(bytes) {
    if (o.memory == "cuda")
      dev_ = static_cast<uint8_t*>(petrel::device_memory::alloc_device(bytes, o.device));
    else
      host_.assign(bytes, 0);
  }
  ~bench_pool() { petrel::device_memory::free_device(dev_); }
  bench_pool(const bench_pool&) = delete;
  bench_pool& operator=(const bench_pool&) = delete;
  uint8_t* data() { return dev_ ? dev_ : host_.data(); }
  size_t size() const { return bytes_; }
  void write(const std::vector<uint8_t>& bytes) {
    if (dev_)
      petrel::device_memory::copy(dev_, bytes.data(), bytes.size());
    else
      host_ = bytes;
  }
  std::vector<uint8_t> read() const {
    if (!dev_) return host_;
    std::vector<uint8_t> out(bytes_);
    petrel::device_memory::copy(out.data(), dev_, bytes_);
    return out;
  }

private:
  size_t bytes_;
  std::vector<uint8_t> host_;
  uint8_t* dev_ = nullptr;
};

uint64_t fnv1a(const std::vector<uint8_t>& v) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (uint8_t b : v) h = (h ^ b) * 0x100000001b3ull;
  return h;
}

/// The receiving process: registers a zeroed pool, prints "desc <hex>", answers each 'c' on stdin with
/// "sum <FNV-1a of the pool>", and serves until stdin closes.
int run_receiver(const bench_kv_options& o) {
  if (o.pool_bytes == 0) return bad_input("--role receiver needs --pool-bytes");
  std::unique_ptr<bench_pool> pool;
  try {
    pool = std::make_unique<bench_pool>(o.pool_bytes, o);
  } catch (const std::exception& e) {
    return failure(e.what());
  }
  auto e = kv_transfer_engine::create(engine_options(o, false));
  if (!e) return failure(e.error());
  auto d = (*e)->register_pool(pool->data(), pool->size());
  if (!d) return failure(d.error());
  std::printf("desc %s\n", to_hex(d->to_bytes()).c_str());
  std::fflush(stdout);
  char c;
  while (::read(0, &c, 1) > 0) {
    if (c == 'c') {
      std::printf("sum %016llx\n", (unsigned long long)fnv1a(pool->read()));
      std::fflush(stdout);
    }
  }
  return petrel::cli::exit_ok;
}

struct child_process {
  pid_t pid = -1;
  int to_child = -1, from_child = -1;
  ~child_process() {
    if (to_child >= 0) ::close(to_child);
    if (pid > 0) {
      int status = 0;
      for (int i = 0; i < 200 && ::waitpid(pid, &status, WNOHANG) == 0; ++i) ::usleep(10'000);
      if (::waitpid(pid, &status, WNOHANG) == 0) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, &status, 0);
      }
    }
    if (from_child >= 0) ::close(from_child);
  }
};

kv_expected<kv_pool_descriptor> spawn_receiver(const bench_kv_options& o, uint64_t pool_bytes, child_process& child) {
  using R = kv_expected<kv_pool_descriptor>;
  int in[2], out[2];
  if (::pipe2(in, O_CLOEXEC) || ::pipe2(out, O_CLOEXEC)) return R::failure("pipe failed");
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, in[0], 0);
  posix_spawn_file_actions_adddup2(&fa, out[1], 1);
  std::vector<std::string> args = {"petrel",        "bench-kv",     "--role",          "receiver",
                                   "--pool-bytes",  std::to_string(pool_bytes), "--tls", o.tls,
                                   "--net-devices", o.net_devices, "--tcp-seg-bytes",
                                   std::to_string(o.tcp_seg_bytes), "--idle-wakeup-ms",
                                   std::to_string(o.idle_wakeup_ms), "--memory", o.memory, "--gpu-path",
                                   o.gpu_path, "--device", std::to_string(o.device)};
  if (o.busy_poll) args.push_back("--busy-poll");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int rc = posix_spawn(&child.pid, "/proc/self/exe", &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  ::close(in[0]);
  ::close(out[1]);
  child.to_child = in[1];
  child.from_child = out[0];
  if (rc != 0) return R::failure(std::string("posix_spawn: ") + std::strerror(rc));
  // UCX may log to the child's stdout too: skip lines until the descriptor.
  std::string buffer, line;
  auto until = steady::now() + std::chrono::seconds(20);
  while (true) {
    auto nl = buffer.find('\n');
    if (nl != std::string::npos) {
      line = buffer.substr(0, nl);
      buffer.erase(0, nl + 1);
      if (line.rfind("desc ", 0) == 0) break;
      std::fprintf(stderr, "receiver: %s\n", line.c_str());
      continue;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - steady::now()).count();
    if (left <= 0) return R::failure("receiver process did not publish its descriptor within 20 s");
    pollfd p{child.from_child, POLLIN, 0};
    if (::poll(&p, 1, int(left)) <= 0) continue;
    char buf[4096];
    auto n = ::read(child.from_child, buf, sizeof buf);
    if (n <= 0) return R::failure("receiver process exited before publishing its descriptor");
    buffer.append(buf, size_t(n));
  }
  auto bytes = from_hex(line.substr(5));
  if (!bytes) return R::failure(bytes.error());
  return kv_pool_descriptor::from_bytes(*bytes);
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t i = size_t(std::min<double>(double(v.size() - 1), p * double(v.size() - 1) + 0.5));
  return v[i];
}

int run_sender(const bench_kv_options& o) {
  if (o.pages == 0 || o.page_bytes == 0) return bad_input("--pages and --page-bytes must be > 0");
  if (o.transfers <= 0 || o.inflight <= 0 || o.repeat <= 0)
    return bad_input("--transfers, --inflight and --repeat must be > 0");
  if (o.mode != "process" && o.mode != "thread" && o.mode != "memcpy")
    return bad_input("--mode must be process, thread or memcpy (got '" + o.mode + "')");
  if (o.memory != "host" && o.memory != "cuda")
    return bad_input("--memory must be host or cuda (got '" + o.memory + "')");
  if (o.gpu_path != "auto" && o.gpu_path != "staged" && o.gpu_path != "ipc")
    return bad_input("--gpu-path must be auto, staged or ipc (got '" + o.gpu_path + "')");
  if (o.memory == "cuda" && !petrel::device_memory::built_with_cuda())
    return bad_input("--memory cuda: this build has no CUDA");
  // Pools hold 2x the pages so that the scattered layout never puts two pages side by side.
  const uint64_t slots = o.contiguous ? o.pages : 2 * o.pages;
  const uint64_t pool_bytes = slots * o.page_bytes;
  const uint64_t transfer_bytes = o.pages * o.page_bytes;

  std::vector<kv_page_range> ranges;
  for (uint64_t i = 0; i < o.pages; ++i) {
    uint64_t src = o.contiguous ? i : 2 * i;
    uint64_t dst = o.contiguous ? i : (2 * o.pages - 1 - 2 * i); // reversed, every other slot
    ranges.push_back({src * o.page_bytes, dst * o.page_bytes, o.page_bytes});
  }

  std::vector<uint8_t> src_bytes(pool_bytes), expected(pool_bytes, 0);
  for (size_t i = 0; i < src_bytes.size(); ++i) src_bytes[i] = uint8_t(i * 131 + 7);
  for (auto& r : ranges) std::memcpy(expected.data() + r.dst_offset, src_bytes.data() + r.src_offset, r.length);
  std::unique_ptr<bench_pool> src_pool, local_dst;
  try {
    src_pool = std::make_unique<bench_pool>(pool_bytes, o);
    src_pool->write(src_bytes);
  } catch (const std::exception& e) {
    return failure(e.what());
  }

  child_process child;
  std::unique_ptr<kv_transfer_engine> receiver;
  kv_pool_descriptor remote;
  bool local_copy = o.mode == "memcpy";
  if (o.mode == "process") {
    auto d = spawn_receiver(o, pool_bytes, child);
    if (!d) return failure(d.error());
    remote = *d;
  } else {
    auto e = kv_transfer_engine::create(engine_options(o, local_copy));
    if (!e) return failure(e.error());
    receiver = std::move(*e);
    local_dst = std::make_unique<bench_pool>(pool_bytes, o);
    auto d = receiver->register_pool(local_dst->data(), local_dst->size());
    if (!d) return failure(d.error());
    remote = *d;
  }
  auto e = kv_transfer_engine::create(engine_options(o, local_copy));
  if (!e) return failure(e.error());
  auto& sender = *e;
  auto sd = sender->register_pool(src_pool->data(), src_pool->size());
  if (!sd) return failure(sd.error());
  auto peer = sender->connect(remote.worker_address);
  if (!peer) return failure(peer.error());

  std::mutex m;
  std::condition_variable cv;
  std::vector<kv_transfer_result> done;
  auto submit = [&](uint64_t id) {
    sender->transfer(*peer, sd->pool_id, remote, ranges, id, 1, [&](const kv_transfer_result& r) {
      std::lock_guard<std::mutex> lock(m);
      done.push_back(r);
      cv.notify_all();
    });
  };
  auto wait_for = [&](size_t n) {
    std::unique_lock<std::mutex> lock(m);
    cv.wait(lock, [&] { return done.size() >= n; });
  };

  // Warm-up (endpoint wire-up, rkey unpack, page faults in both pools).
  for (uint64_t i = 0; i < 5; ++i) {
    submit(i);
    wait_for(i + 1);
  }
  for (auto& r : done)
    if (!r.ok()) return failure(std::string("warm-up transfer failed: ") + r.error);
  done.clear();

  // Latency: one at a time.
  std::vector<double> total_us, queue_us, issue_us, flush_us, notify_us;
  for (int i = 0; i < o.transfers; ++i) {
    submit(uint64_t(100 + i));
    wait_for(size_t(i + 1));
  }
  for (auto& r : done) {
    if (!r.ok()) return failure(std::string("transfer failed: ") + r.error);
    total_us.push_back(double(r.timing.total().count()) / 1e3);
    queue_us.push_back(double(r.timing.queue_wait.count()) / 1e3);
    issue_us.push_back(double(r.timing.issue.count()) / 1e3);
    flush_us.push_back(double(r.timing.flush.count()) / 1e3);
    notify_us.push_back(double(r.timing.notify.count()) / 1e3);
  }
  done.clear();

  // Bandwidth: keep --inflight transfers going; --repeat rounds, best and median reported (this host is shared).
  std::vector<double> rounds;
  for (int round = 0; round < o.repeat; ++round) {
    done.clear();
    auto t0 = steady::now();
    int submitted = 0;
    for (; submitted < std::min(o.inflight, o.transfers); ++submitted) submit(uint64_t(1'000'000 + submitted));
    while (submitted < o.transfers) {
      wait_for(size_t(submitted - o.inflight + 1));
      submit(uint64_t(1'000'000 + submitted));
      ++submitted;
    }
    wait_for(size_t(o.transfers));
    double seconds = std::chrono::duration<double>(steady::now() - t0).count();
    for (auto& r : done)
      if (!r.ok()) return failure(std::string("transfer failed: ") + r.error);
    rounds.push_back(double(transfer_bytes) * o.transfers / seconds / 1e9);
  }
  double gbps = *std::max_element(rounds.begin(), rounds.end());
  double gbps_median = percentile(rounds, 0.5);

  // Reference on this machine: a copy of the same pages, same layout, in one process (memcpy for host pools; the
  // same device-to-device copies on the GPU for cuda pools).
  int reps = std::max(1, int(2e9 / double(std::max<uint64_t>(transfer_bytes, 1))));
  reps = std::min(reps, 200);
  double memcpy_gbps = 0;
  if (o.memory == "cuda") {
    bench_pool ref_dst(pool_bytes, o);
    std::vector<petrel::device_memory::copy_range> copies;
    for (auto& r : ranges) copies.push_back({r.src_offset, r.dst_offset, r.length});
    petrel::device_memory::copy_ranges(ref_dst.data(), src_pool->data(), copies);
    auto m0 = steady::now();
    for (int k = 0; k < reps; ++k) petrel::device_memory::copy_ranges(ref_dst.data(), src_pool->data(), copies);
    memcpy_gbps = double(transfer_bytes) * reps / std::chrono::duration<double>(steady::now() - m0).count() / 1e9;
  } else {
    std::vector<uint8_t> ref_dst(pool_bytes);
    for (auto& r : ranges) std::memcpy(ref_dst.data() + r.dst_offset, src_bytes.data() + r.src_offset, r.length);
    auto m0 = steady::now();
    for (int k = 0; k < reps; ++k)
      for (auto& r : ranges) std::memcpy(ref_dst.data() + r.dst_offset, src_bytes.data() + r.src_offset, r.length);
    memcpy_gbps = double(transfer_bytes) * reps / std::chrono::duration<double>(steady::now() - m0).count() / 1e9;
  }

  // Every byte of the destination pool: the pages moved, the rest still zero (asked of the receiving process
  // in --mode process).
  uint64_t want = fnv1a(expected), got = 0;
  if (local_dst) {
    got = fnv1a(local_dst->read());
  } else {
    if (::write(child.to_child, "c", 1) != 1) return failure("cannot ask the receiver for its pool's checksum");
    std::string line;
    char ch;
    auto until = steady::now() + std::chrono::seconds(30);
    while (steady::now() < until) {
      pollfd p{child.from_child, POLLIN, 100};
      if (::poll(&p, 1, 100) <= 0) continue;
      if (::read(child.from_child, &ch, 1) != 1) break;
      if (ch != '\n') {
        line += ch;
        continue;
      }
      if (line.rfind("sum ", 0) == 0) break;
      line.clear();
    }
    if (line.rfind("sum ", 0) != 0) return failure("the receiver did not report its pool's checksum");
    got = std::stoull(line.substr(4), nullptr, 16);
  }
  if (got != want)
    return failure("destination pool differs from the expected bytes after the benchmark (FNV-1a " +
                   std::to_string(got) + ", want " + std::to_string(want) + ")");
  const bool verified = true;

  auto c = sender->counters();
  std::string path = o.mode == "process" ? "two processes" : (o.mode == "thread" ? "two engines, one process" : "memcpy path");
  if (o.memory == "cuda")
    path += c.cuda_ipc_copies ? ", GPU pools via CUDA IPC" : (c.staged_bytes ? ", GPU pools staged via host" : ", GPU pools");
  if (o.json) {
    nlohmann::ordered_json j = {
        {"mode", o.mode}, {"tls", o.tls}, {"memory", o.memory}, {"gpu_path", o.gpu_path},
        {"pages", o.pages}, {"page_bytes", o.page_bytes}, {"verified", verified},
        {"cuda_ipc_copies", c.cuda_ipc_copies}, {"staged_bytes", c.staged_bytes},
        {"local_copies", c.local_copies},
        {"transfer_bytes", transfer_bytes}, {"puts_per_transfer", done.empty() ? 0 : done[0].puts},
        {"transfers", o.transfers}, {"inflight", o.inflight}, {"gbps", gbps}, {"gbps_median", gbps_median}, {"rounds", o.repeat},
        {"latency_us", {{"p50", percentile(total_us, 0.5)}, {"p99", percentile(total_us, 0.99)},
                        {"queue_p50", percentile(queue_us, 0.5)}, {"issue_p50", percentile(issue_us, 0.5)},
                        {"flush_p50", percentile(flush_us, 0.5)}, {"notify_p50", percentile(notify_us, 0.5)}}},
        {"memcpy_gbps", memcpy_gbps}, {"ratio_to_memcpy", gbps / memcpy_gbps},
        {"bytes_sent", c.bytes_sent}, {"transfers_ok", c.transfers_ok}, {"transfers_failed", c.transfers_failed},
        {"anchor", "none: SGLang's PD deployment moves KV over RDMA (InfiniBand); no per-transfer figure is published"}};
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("bench-kv: %s, TLS=%s, %llu pages x %llu B = %.2f MiB per transfer, %u puts each%s\n", path.c_str(),
                o.tls.c_str(), (unsigned long long)o.pages, (unsigned long long)o.page_bytes,
                double(transfer_bytes) / (1 << 20), done.empty() ? 0u : done[0].puts,
                verified ? ", bytes verified" : "");
    std::printf("  latency (1 in flight, %d transfers): p50 %.1f us  p99 %.1f us\n", o.transfers,
                percentile(total_us, 0.5), percentile(total_us, 0.99));
    std::printf("    split p50: queue %.1f us | puts issued %.1f us | flush %.1f us | notify %.1f us\n",
                percentile(queue_us, 0.5), percentile(issue_us, 0.5), percentile(flush_us, 0.5),
                percentile(notify_us, 0.5));
    std::printf("  bandwidth (%d in flight): best %.3f GB/s, median %.3f GB/s of %d rounds\n", o.inflight, gbps,
                gbps_median, o.repeat);
    std::printf("  this machine's copy of the same pages in one process (memcpy, or device copies for GPU pools): %.3f GB/s -> ratio %.3f\n", memcpy_gbps, gbps / memcpy_gbps);
    std::printf("  anchor: none directly (SGLang moves KV over RDMA on InfiniBand; no per-transfer figure published)\n");
    std::printf("  counters: %llu ok, %llu failed, %.1f MiB sent, %llu CUDA IPC copies, %.1f MiB staged\n",
                (unsigned long long)c.transfers_ok, (unsigned long long)c.transfers_failed,
                double(c.bytes_sent) / (1 << 20), (unsigned long long)c.cuda_ipc_copies,
                double(c.staged_bytes) / (1 << 20));
  }
  return petrel::cli::exit_ok;
}

const bool registered = petrel::cli::register_command(
    "bench-kv", "measure KV-page transfer bandwidth and latency between two engines on this host",
    [](CLI::App& sub) -> petrel::cli::command_fn {
      auto o = std::make_shared<bench_kv_options>();
      sub.add_option("--pages", o->pages, "pages per transfer (default 64)");
      sub.add_option("--page-bytes", o->page_bytes, "bytes per page (default 73728: 64 tokens x 576 x bf16)");
      sub.add_option("--tls", o->tls, "UCX transports: tcp (detects dead peers) or shm (faster, no detection)");
      sub.add_option("--net-devices", o->net_devices, "UCX_NET_DEVICES for tcp (default lo)");
      sub.add_option("--tcp-seg-bytes", o->tcp_seg_bytes, "UCX tcp segment size (default 262144; 0 = UCX's 8 KiB)");
      sub.add_option("--mode", o->mode, "process (default), thread (two engines in one process), memcpy");
      sub.add_option("--memory", o->memory, "host (default) or cuda: where both pools live");
      sub.add_option("--gpu-path", o->gpu_path,
                     "with --memory cuda: auto (CUDA IPC between processes, else staged), staged, or ipc (no host "
                     "mirrors)");
      sub.add_option("--device", o->device, "with --memory cuda: the GPU (default 0)");
      sub.add_option("--transfers", o->transfers, "timed transfers per phase (default 200)");
      sub.add_option("--inflight", o->inflight, "transfers in flight in the bandwidth phase (default 8)");
      sub.add_option("--repeat", o->repeat, "bandwidth rounds; best and median are reported (default 3)");
      sub.add_flag("--contiguous", o->contiguous, "adjacent pages (one put per transfer) instead of scattered");
      sub.add_option("--idle-wakeup-ms", o->idle_wakeup_ms, "progress-thread safety-net wake-up when idle (default 5)");
      sub.add_flag("--busy-poll", o->busy_poll, "progress threads spin instead of sleeping on the event fd");
      sub.add_flag("--json", o->json, "print one JSON object");
      sub.add_option("--role", o->role, "internal: 'receiver' runs the receiving process")->group("");
      sub.add_option("--pool-bytes", o->pool_bytes, "internal: receiver pool size")->group("");
      return [o] {
        if (o->role == "receiver") return run_receiver(*o);
        if (!o->role.empty()) return bad_input("--role must be 'receiver' (got '" + o->role + "')");
        return run_sender(*o);
      };
    });

} // namespace
