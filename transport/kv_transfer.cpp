// KV transfer engine over UCX (see kv_transfer.hpp for the contract, docs/kv-transfer.md for the protocol).
//
// Everything that touches the ucp worker runs on the engine's progress thread. Public calls post closures to a
// mutex-protected queue and wake the thread through an eventfd, which it polls next to the worker's own event fd.
// User callbacks are never run from inside a UCX callback: UCX callbacks only record what happened, and the loop
// runs the user's callbacks after ucp_worker_progress returns, so a callback may call back into the engine.
#include "transport/kv_transfer.hpp"

#include "kernels/device_memory.hpp"

#include <ucp/api/ucp.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <future>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <shared_mutex>
#include <thread>
#include <unordered_map>

#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

namespace petrel::transport {

namespace {

using clock_type = std::chrono::steady_clock;

// -- wire formats ---------------------------------------------------------------------------------------------------

constexpr uint32_t address_magic = 0x41564B50;    // "PKVA"
constexpr uint32_t descriptor_magic = 0x44564B50; // "PKVD"
constexpr uint32_t notice_magic = 0x4E564B50;     // "PKVN"
constexpr uint16_t wire_version = 2; // 2: GPU pool fields in descriptors, staged ranges in notices
/// Active-message id of the transfer notice. Petrel owns the worker, so any fixed id works.
constexpr unsigned notice_am_id = 0x4b56;
constexpr unsigned ack_am_id = 0x4b57; // stage-in done: the receiver's answer to a staged notice

uint64_t fnv1a(const uint8_t* p, size_t n, uint64_t h = 0xcbf29ce484222325ull) {
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

class byte_writer {
public:
  template <class T>
  void put(T v) {
    uint8_t b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T)); // little endian on every platform Petrel targets (x86-64, aarch64)
    out.insert(out.end(), b, b + sizeof(T));
  }
  void put_bytes(const std::vector<uint8_t>& v) {
    put<uint32_t>(static_cast<uint32_t>(v.size()));
    out.insert(out.end(), v.begin(), v.end());
  }
  std::vector<uint8_t> out;
};

class byte_reader {
public:
  byte_reader(const uint8_t* p, size_t n) : p_(p), n_(n) {}
  template <class T>
  bool get(T& v) {
    if (n_ - pos_ < sizeof(T)) return false;
    std::memcpy(&v, p_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }
  bool get_bytes(std::vector<uint8_t>& v, size_t max_len) {
    uint32_t len = 0;
    if (!get(len) || len > max_len || n_ - pos_ < len) return false;
    v.assign(p_ + pos_, p_ + pos_ + len);
    pos_ += len;
    return true;
  }
  size_t pos() const { return pos_; }
  size_t remaining() const { return n_ - pos_; }

private:
  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
};

constexpr size_t max_blob = 1u << 20; // addresses and rkeys are a few hundred bytes; anything near 1 MiB is garbage

/// The published worker address: magic, version, engine id, process token, raw UCX address, checksum.
struct parsed_address {
  uint64_t engine_id = 0;
  uint64_t process_token = 0;
  std::vector<uint8_t> raw;
};

std::vector<uint8_t> wrap_address(uint64_t engine_id, uint64_t token, const void* raw, size_t len) {
  byte_writer w;
  w.put<uint32_t>(address_magic);
  w.put<uint16_t>(wire_version);
  w.put<uint16_t>(0);
  w.put<uint64_t>(engine_id);
  w.put<uint64_t>(token);
  auto* b = static_cast<const uint8_t*>(raw);
  w.put_bytes(std::vector<uint8_t>(b, b + len));
  w.put<uint64_t>(fnv1a(w.out.data(), w.out.size()));
  return std::move(w.out);
}

kv_expected<parsed_address> parse_address(const std::vector<uint8_t>& bytes) {
  using R = kv_expected<parsed_address>;
  byte_reader r(bytes.data(), bytes.size());
  uint32_t magic = 0;
  uint16_t version = 0, reserved = 0;
  parsed_address a;
  if (!r.get(magic) || magic != address_magic)
    return R::failure("worker address: bad magic (not a petrel kv engine address, " + std::to_string(bytes.size()) +
                      " bytes)");
  if (!r.get(version) || version != wire_version || !r.get(reserved))
    return R::failure("worker address: unsupported version " + std::to_string(version));
  if (!r.get(a.engine_id) || !r.get(a.process_token) || !r.get_bytes(a.raw, max_blob))
    return R::failure("worker address: truncated");
  size_t covered = r.pos();
  uint64_t sum = 0;
  if (!r.get(sum)) return R::failure("worker address: truncated (no checksum)");
  if (r.remaining() != 0) return R::failure("worker address: trailing bytes");
  if (sum != fnv1a(bytes.data(), covered)) return R::failure("worker address: checksum mismatch (corrupted)");
  if (a.raw.empty()) return R::failure("worker address: empty UCX address");
  return a;
}

std::vector<uint8_t> descriptor_fields(const kv_pool_descriptor& d) {
  byte_writer w;
  w.put<uint64_t>(d.engine_id);
  w.put<uint64_t>(d.pool_id);
  w.put<uint64_t>(d.process_token);
  w.put<uint64_t>(d.remote_base);
  w.put<uint64_t>(d.size);
  w.put_bytes(d.worker_address);
  w.put_bytes(d.rkey);
  w.put<uint8_t>(d.memory);
  w.put<uint64_t>(d.device_base);
  w.put<int32_t>(d.device);
  w.put_bytes(d.ipc_handle);
  w.put<uint64_t>(d.host_id);
  w.put<uint8_t>(d.staging);
  return std::move(w.out);
}

/// notice_wire.flags: the payload lists (dst_offset, length) pairs that landed in the target's host mirror and
/// must be copied into its GPU pool before the notice is reported.
constexpr uint16_t notice_flag_stage_in = 1;

struct notice_wire {
  uint32_t magic;
  uint16_t version;
  uint16_t flags;
  uint64_t transfer_id;
  uint64_t epoch;
  uint64_t bytes;
  uint64_t pool_id;
  uint64_t sender_engine_id;
  uint64_t sender_seq; // echoed in the ack of a staged notice
};

/// The receiver's answer to a notice with notice_flag_stage_in: the pages are (ok = 1) or are not in its GPU pool.
struct ack_wire {
  uint32_t magic;
  uint16_t version;
  uint16_t ok;
  uint64_t sender_seq;
  uint64_t receiver_engine_id;
};

uint64_t random_u64() {
  std::random_device rd;
  uint64_t v = (uint64_t(rd()) << 32) ^ rd() ^ uint64_t(clock_type::now().time_since_epoch().count());
  return v == 0 ? 1 : v;
}

uint64_t process_token() {
  static const uint64_t token = random_u64() ^ (uint64_t(::getpid()) << 17);
  return token;
}

bool range_fits(uint64_t offset, uint64_t length, uint64_t size) { return length <= size && offset <= size - length; }

/// `ranges` as device copies; `to_mirror`: each range to its own source offset (a GPU pool into its host mirror).
std::vector<device_memory::copy_range> device_copies(const std::vector<kv_page_range>& ranges, bool to_mirror = false) {
  std::vector<device_memory::copy_range> out;
  out.reserve(ranges.size());
  for (const auto& r : ranges) out.push_back({r.src_offset, to_mirror ? r.src_offset : r.dst_offset, r.length});
  return out;
}

std::string ucs_error(const char* what, ucs_status_t s) {
  return std::string(what) + ": " + ucs_status_string(s);
}

// -- in-process registry (memcpy path) -------------------------------------------------------------------------------

struct local_registry {
  std::shared_mutex mutex;
  std::unordered_map<uint64_t, kv_transfer_engine::impl*> engines;
  std::map<std::pair<uint64_t, uint64_t>, std::pair<uint8_t*, uint64_t>> pools; // (engine, pool) -> (base, size)
  static local_registry& get() {
    static local_registry r;
    return r;
  }
};

/// Issue 4: say once per process which memory UCX can handle and which path KV pages take. UCX only ever sees host
/// memory (GPU pools register a pinned host mirror), whatever it reports.
void log_kv_memory_path_once(ucp_context_h context) {
  static std::once_flag once;
  std::call_once(once, [context] {
    ucp_context_attr_t attr{};
    attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
    std::string types;
    if (ucp_context_query(context, &attr) == UCS_OK) {
      static const char* const names[] = {"host", "cuda", "cuda-managed", "rocm", "rocm-managed"};
      for (int t = 0; t < int(sizeof(names) / sizeof(names[0])); ++t)
        if (attr.memory_types & (uint64_t(1) << t)) types += (types.empty() ? "" : ", ") + std::string(names[t]);
    }
    std::fprintf(stderr, "KV path: host pools through UCX; GPU pools through CUDA IPC on one host, else staged "
                         "through pinned host mirrors (UCX memory types: %s)\n",
                 types.empty() ? "unknown" : types.c_str());
  });
}

} // namespace

// -- descriptor ---------------------------------------------------------------------------------------------------

void kv_pool_descriptor::seal() {
  auto f = descriptor_fields(*this);
  checksum = fnv1a(f.data(), f.size());
}

kv_expected<bool> kv_pool_descriptor::validate() const {
  using R = kv_expected<bool>;
  if (worker_address.empty()) return R::failure("kv pool descriptor: empty worker_address");
  if (rkey.empty()) return R::failure("kv pool descriptor: empty rkey");
  if (size == 0) return R::failure("kv pool descriptor: size is 0");
  if (remote_base + size < remote_base) return R::failure("kv pool descriptor: remote_base + size overflows");
  if (memory > 1) return R::failure("kv pool descriptor: unknown memory kind " + std::to_string(memory));
  if (memory == 1 && device_base == 0) return R::failure("kv pool descriptor: a GPU pool without its device address");
  auto f = descriptor_fields(*this);
  if (checksum != fnv1a(f.data(), f.size()))
    return R::failure("kv pool descriptor: checksum mismatch (corrupted or hand-built; call seal())");
  auto a = parse_address(worker_address);
  if (!a) return R::failure("kv pool descriptor: " + a.error());
  if (a->engine_id != engine_id)
    return R::failure("kv pool descriptor: worker_address belongs to engine " + std::to_string(a->engine_id) +
                      ", descriptor says " + std::to_string(engine_id));
  return true;
}

std::vector<uint8_t> kv_pool_descriptor::to_bytes() const {
  byte_writer w;
  w.put<uint32_t>(descriptor_magic);
  w.put<uint16_t>(wire_version);
  w.put<uint16_t>(0);
  auto f = descriptor_fields(*this);
  w.out.insert(w.out.end(), f.begin(), f.end());
  w.put<uint64_t>(checksum);
  return std::move(w.out);
}

kv_expected<kv_pool_descriptor> kv_pool_descriptor::from_bytes(const std::vector<uint8_t>& bytes) {
  using R = kv_expected<kv_pool_descriptor>;
  byte_reader r(bytes.data(), bytes.size());
  uint32_t magic = 0;
  uint16_t version = 0, reserved = 0;
  if (!r.get(magic) || magic != descriptor_magic) return R::failure("kv pool descriptor: bad magic");
  if (!r.get(version) || version != wire_version || !r.get(reserved))
    return R::failure("kv pool descriptor: unsupported version " + std::to_string(version));
  kv_pool_descriptor d;
  if (!r.get(d.engine_id) || !r.get(d.pool_id) || !r.get(d.process_token) || !r.get(d.remote_base) ||
      !r.get(d.size) || !r.get_bytes(d.worker_address, max_blob) || !r.get_bytes(d.rkey, max_blob) ||
      !r.get(d.memory) || !r.get(d.device_base) || !r.get(d.device) || !r.get_bytes(d.ipc_handle, max_blob) ||
      !r.get(d.host_id) || !r.get(d.staging) || !r.get(d.checksum))
    return R::failure("kv pool descriptor: truncated (" + std::to_string(bytes.size()) + " bytes)");
  if (r.remaining() != 0) return R::failure("kv pool descriptor: trailing bytes");
  auto v = d.validate();
  if (!v) return R::failure(v.error());
  return d;
}

std::string to_hex(const std::vector<uint8_t>& bytes) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  s.reserve(bytes.size() * 2);
  for (uint8_t b : bytes) {
    s.push_back(digits[b >> 4]);
    s.push_back(digits[b & 15]);
  }
  return s;
}

kv_expected<std::vector<uint8_t>> from_hex(const std::string& text) {
  using R = kv_expected<std::vector<uint8_t>>;
  if (text.size() % 2) return R::failure("hex: odd length " + std::to_string(text.size()));
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  std::vector<uint8_t> out(text.size() / 2);
  for (size_t i = 0; i < out.size(); ++i) {
    int hi = nibble(text[2 * i]), lo = nibble(text[2 * i + 1]);
    if (hi < 0 || lo < 0) return R::failure("hex: bad character at offset " + std::to_string(2 * i));
    out[i] = uint8_t(hi << 4 | lo);
  }
  return out;
}

kv_expected<std::vector<kv_page_range>> coalesce_page_ranges(std::vector<kv_page_range> ranges) {
  using R = kv_expected<std::vector<kv_page_range>>;
  for (size_t i = 0; i < ranges.size(); ++i) {
    if (ranges[i].length == 0) return R::failure("page range " + std::to_string(i) + " has length 0");
    if (ranges[i].src_offset + ranges[i].length < ranges[i].src_offset || ranges[i].dst_offset + ranges[i].length < ranges[i].dst_offset)
      return R::failure("page range " + std::to_string(i) + " runs past 2^64"); // else merged lengths could wrap to 0
  }
  std::stable_sort(ranges.begin(), ranges.end(),
                   [](const kv_page_range& a, const kv_page_range& b) { return a.dst_offset < b.dst_offset; });
  std::vector<kv_page_range> out;
  out.reserve(ranges.size());
  for (const auto& r : ranges) {
    if (!out.empty()) {
      auto& last = out.back();
      uint64_t last_end = last.dst_offset + last.length;
      if (last_end < last.dst_offset || r.dst_offset < last_end)
        return R::failure("page ranges overlap at destination offset " + std::to_string(r.dst_offset));
      if (r.dst_offset == last_end && r.src_offset == last.src_offset + last.length) {
        last.length += r.length;
        continue;
      }
    }
    out.push_back(r);
  }
  return out;
}

const char* to_string(kv_transfer_status status) {
  switch (status) {
    case kv_transfer_status::ok: return "ok";
    case kv_transfer_status::peer_lost: return "peer_lost";
    case kv_transfer_status::timeout: return "timeout";
    case kv_transfer_status::bad_descriptor: return "bad_descriptor";
    case kv_transfer_status::out_of_bounds: return "out_of_bounds";
    case kv_transfer_status::unknown_peer: return "unknown_peer";
    case kv_transfer_status::transport_error: return "transport_error";
    case kv_transfer_status::shutting_down: return "shutting_down";
  }
  return "unknown";
}

// -- the engine's state -------------------------------------------------------------------------------------------

class kv_transfer_engine::impl {
public:
  // -- member types --

  struct pool_record {
    uint64_t id = 0;
    uint8_t* base = nullptr;        // what UCX reads and writes: the pool, or a GPU pool's pinned host mirror
    uint64_t size = 0;
    ucp_mem_h memh = nullptr;
    uint8_t* device_base = nullptr; // a GPU pool's device memory (null for host pools)
    bool mirror = false;            // a GPU pool whose `base` is a full host mirror (else one registered page)
    uint8_t* data() const { return device_base ? device_base : base; }
  };

  struct peer_record {
    impl* owner = nullptr;
    kv_peer_id id = 0;
    uint64_t engine_id = 0;
    uint64_t process_token = 0;
    ucp_ep_h ep = nullptr;
    bool lost = false;          // set by the UCX error callback; the rest is handled after progress returns
    bool lost_handled = false;
    std::string lost_reason;
    std::map<std::pair<uint64_t, uint64_t>, ucp_rkey_h> rkeys; // (pool_id, descriptor checksum) -> unpacked rkey
    std::map<std::pair<uint64_t, uint64_t>, void*> ipc_maps;    // (pool_id, descriptor checksum) -> mapped GPU pool
  };

  enum class stage { flush, notify, ack };

  struct transfer_record {
    kv_transfer_request request;
    kv_transfer_done_fn done;
    kv_transfer_result result;
    clock_type::time_point submitted, started, issued, flushed;
    clock_type::time_point deadline;
    stage at = stage::flush;
    std::vector<kv_page_range> stage_in; // ranges the receiver copies from its host mirror into its GPU pool
  };

  /// What a UCX request callback needs: which engine, which transfer, which stage. Freed by the callback.
  struct op_context {
    impl* self;
    uint64_t seq;
    stage kind;
    notice_wire notice;            // the AM header must live until the send completes
    std::vector<uint64_t> payload; // likewise the staged ranges: (dst_offset, length) pairs
  };

  // -- construction --

  explicit impl(kv_transfer_options o) : opts(std::move(o)) {
    engine_id = opts.engine_id ? opts.engine_id : random_u64();
    error_mode_peer = opts.error_mode == kv_error_mode::peer ||
                      (opts.error_mode == kv_error_mode::automatic && opts.transports.find("tcp") != std::string::npos);
  }

  kv_expected<bool> init_ucx() {
    using R = kv_expected<bool>;
    wake_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wake_fd < 0) return R::failure(std::string("eventfd: ") + std::strerror(errno));
    ucp_config_t* config = nullptr;
    ucs_status_t s = ucp_config_read(nullptr, nullptr, &config);
    if (s != UCS_OK) return R::failure(ucs_error("ucp_config_read", s));
    s = ucp_config_modify(config, "TLS", opts.transports.c_str());
    std::vector<std::pair<std::string, std::string>> settings;
    if (!opts.net_devices.empty()) settings.emplace_back("NET_DEVICES", opts.net_devices);
    if (opts.tcp_segment_bytes > 0 && opts.transports.find("tcp") != std::string::npos) {
      settings.emplace_back("TX_SEG_SIZE", std::to_string(opts.tcp_segment_bytes));
      settings.emplace_back("RX_SEG_SIZE", std::to_string(opts.tcp_segment_bytes));
    }
    settings.insert(settings.end(), opts.ucx_config.begin(), opts.ucx_config.end());
    if (s != UCS_OK) {
      ucp_config_release(config);
      return R::failure(ucs_error(("ucp_config_modify TLS=" + opts.transports).c_str(), s));
    }
    for (auto& [name, value] : settings) {
      s = ucp_config_modify(config, name.c_str(), value.c_str());
      if (s != UCS_OK) {
        ucp_config_release(config);
        return R::failure(ucs_error(("ucp_config_modify " + name + "=" + value).c_str(), s));
      }
    }
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_NAME;
    params.features = UCP_FEATURE_RMA | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
    params.name = opts.name.c_str();
    s = ucp_init(&params, config, &context);
    ucp_config_release(config);
    if (s != UCS_OK)
      return R::failure(ucs_error(("ucp_init (TLS=" + opts.transports + ", NET_DEVICES=" +
                                   (opts.net_devices.empty() ? "default" : opts.net_devices) + ")")
                                      .c_str(),
                                  s));
    log_kv_memory_path_once(context);
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE | UCP_WORKER_PARAM_FIELD_NAME;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE; // only the progress thread touches the worker
    wp.name = opts.name.c_str();
    s = ucp_worker_create(context, &wp, &worker);
    if (s != UCS_OK) return R::failure(ucs_error("ucp_worker_create", s));
    s = ucp_worker_get_efd(worker, &worker_fd);
    if (s != UCS_OK) return R::failure(ucs_error("ucp_worker_get_efd", s));
    ucp_am_handler_param_t am{};
    am.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS | UCP_AM_HANDLER_PARAM_FIELD_CB |
                    UCP_AM_HANDLER_PARAM_FIELD_ARG;
    am.id = notice_am_id;
    am.flags = UCP_AM_FLAG_WHOLE_MSG;
    am.cb = &impl::on_notice_am;
    am.arg = this;
    s = ucp_worker_set_am_recv_handler(worker, &am);
    if (s != UCS_OK) return R::failure(ucs_error("ucp_worker_set_am_recv_handler", s));
    am.id = ack_am_id;
    am.cb = &impl::on_ack_am;
    s = ucp_worker_set_am_recv_handler(worker, &am);
    if (s != UCS_OK) return R::failure(ucs_error("ucp_worker_set_am_recv_handler(ack)", s));
    ucp_address_t* addr = nullptr;
    size_t addr_len = 0;
    s = ucp_worker_get_address(worker, &addr, &addr_len);
    if (s != UCS_OK) return R::failure(ucs_error("ucp_worker_get_address", s));
    published_address = wrap_address(engine_id, process_token(), addr, addr_len);
    ucp_worker_release_address(worker, addr);
    return true;
  }

  void teardown_ucx() {
    for (auto& [id, p] : peers) close_peer_endpoint(*p);
    auto until = clock_type::now() + std::chrono::milliseconds(500); // only a dead shm peer takes this long
    while (!close_requests.empty() && clock_type::now() < until) {
      ucp_worker_progress(worker);
      reap_close_requests();
    }
    for (void* r : close_requests) ucp_request_free(r); // a force close that never finished: let UCX reclaim it
    close_requests.clear();
    peers.clear();
    for (auto& [id, pool] : pools) ucp_mem_unmap(context, pool.memh);
    pools.clear();
    if (worker) ucp_worker_destroy(worker);
    if (context) ucp_cleanup(context);
    worker = nullptr;
    context = nullptr;
    if (wake_fd >= 0) ::close(wake_fd);
    wake_fd = -1;
  }

  // -- commands from other threads --

  void post(std::function<void()> fn) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      commands.push_back(std::move(fn));
      commands_pending.store(true, std::memory_order_release);
    }
    uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_fd, &one, sizeof one);
  }

  bool on_progress_thread() const { return std::this_thread::get_id() == thread_id; }

  /// Runs fn on the progress thread and waits for its value (inline when already there).
  template <class T>
  T call(std::function<T()> fn) {
    if (on_progress_thread()) return fn();
    auto task = std::make_shared<std::packaged_task<T()>>(std::move(fn));
    auto fut = task->get_future();
    post([task] { (*task)(); });
    return fut.get();
  }

  void run_commands() {
    std::vector<std::function<void()>> batch;
    {
      std::lock_guard<std::mutex> lock(mutex);
      batch.swap(commands);
      commands_pending.store(false, std::memory_order_release);
    }
    for (auto& fn : batch) fn();
  }

  // -- the progress loop --

  void loop() {
    while (true) {
      run_commands();
      if (stop_requested.load(std::memory_order_acquire)) break;
      for (int i = 0; i < 256 && ucp_worker_progress(worker) != 0; ++i) {
      }
      handle_lost_peers();
      reap_close_requests();
      expire_deadlines();
      run_deferred();
      if (opts.busy_poll || commands_pending.load(std::memory_order_acquire)) continue;
      ucs_status_t s = ucp_worker_arm(worker);
      if (s == UCS_ERR_BUSY) continue; // events arrived meanwhile: progress again
      // Real wake-ups come from the fds; the timeout is a safety net for a missed transport event (seen with shm),
      // short while our own transfers are in flight, longer when idle.
      int timeout_ms = int(opts.idle_wakeup.count());
      if (!close_requests.empty() || !inflight.empty()) timeout_ms = std::min(timeout_ms, 1);
      if (!deadlines.empty()) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadlines.begin()->first - clock_type::now());
        timeout_ms = std::clamp<int>(int(left.count()) + 1, 0, timeout_ms);
      }
      pollfd fds[2] = {{worker_fd, POLLIN, 0}, {wake_fd, POLLIN, 0}};
      ::poll(fds, 2, timeout_ms);
      if (fds[1].revents & POLLIN) {
        uint64_t v;
        [[maybe_unused]] auto n = ::read(wake_fd, &v, sizeof v);
      }
    }
    shutting_down = true;
    run_commands(); // late commands: transfers fail with shutting_down, sync calls still get an answer
    std::vector<uint64_t> seqs;
    for (auto& [seq, t] : inflight) seqs.push_back(seq);
    for (auto seq : seqs)
      finish(seq, kv_transfer_status::shutting_down, "kv transfer engine " + std::to_string(engine_id) + " is shutting down");
    run_deferred();
    teardown_ucx();
  }

  void run_deferred() {
    while (!deferred.empty()) {
      std::vector<std::function<void()>> batch;
      batch.swap(deferred);
      for (auto& fn : batch) {
        try {
          fn();
        } catch (const std::exception& e) {
          std::fprintf(stderr, "petrel kv engine %llu: a callback threw: %s\n", (unsigned long long)engine_id, e.what());
        } catch (...) {
          std::fprintf(stderr, "petrel kv engine %llu: a callback threw\n", (unsigned long long)engine_id);
        }
      }
    }
  }

  // -- pools --

  kv_expected<kv_pool_descriptor> do_register_pool(void* base, size_t bytes) {
    using R = kv_expected<kv_pool_descriptor>;
    if (base == nullptr || bytes == 0) return R::failure("register_pool: null base or zero size");
    kv_pool_descriptor d;
    uint8_t* device_base = nullptr;
    if (device_memory::is_device(base)) {
      // UCX (Debian's) cannot touch GPU memory: it maps a pinned host mirror instead (the staged path); peers on
      // this host copy straight into the GPU pool through its IPC handle.
      try {
        auto exported = device_memory::export_ipc(base);
        d.ipc_handle = std::move(exported.handle);
        d.device = exported.device;
        device_base = static_cast<uint8_t*>(base);
        // Without a mirror UCX still needs a registered region for the descriptor's rkey: one pinned page.
        base = device_memory::alloc_pinned(opts.gpu_host_mirror ? bytes : 4096);
        d.staging = opts.gpu_host_mirror ? 1 : 0;
      } catch (const std::exception& e) {
        return R::failure(std::string("register_pool: GPU pool: ") + e.what());
      }
      d.memory = 1;
      d.device_base = reinterpret_cast<uint64_t>(device_base);
    }
    d.host_id = device_memory::host_id();
    auto undo_mirror = [&] {
      if (device_base) device_memory::free_pinned(base);
    };
    ucp_mem_map_params_t mp{};
    mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    mp.address = base;
    mp.length = device_base && !opts.gpu_host_mirror ? 4096 : bytes;
    ucp_mem_h memh = nullptr;
    ucs_status_t s = ucp_mem_map(context, &mp, &memh);
    if (s != UCS_OK) {
      undo_mirror();
      return R::failure(ucs_error("register_pool: ucp_mem_map", s));
    }
    void* rkey_buf = nullptr;
    size_t rkey_len = 0;
    s = ucp_rkey_pack(context, memh, &rkey_buf, &rkey_len);
    if (s != UCS_OK) {
      ucp_mem_unmap(context, memh);
      undo_mirror();
      return R::failure(ucs_error("register_pool: ucp_rkey_pack", s));
    }
    d.worker_address = published_address;
    d.remote_base = reinterpret_cast<uint64_t>(base);
    d.size = bytes;
    d.rkey.assign(static_cast<uint8_t*>(rkey_buf), static_cast<uint8_t*>(rkey_buf) + rkey_len);
    ucp_rkey_buffer_release(rkey_buf);
    d.engine_id = engine_id;
    d.pool_id = next_pool_id++;
    d.process_token = process_token();
    d.seal();
    pools[d.pool_id] =
        pool_record{d.pool_id, static_cast<uint8_t*>(base), bytes, memh, device_base, device_base && d.staging};
    {
      auto& reg = local_registry::get();
      std::unique_lock lock(reg.mutex);
      reg.pools[{engine_id, d.pool_id}] = {pools[d.pool_id].data(), bytes};
    }
    return d;
  }

  kv_expected<bool> do_deregister_pool(uint64_t pool_id) {
    auto it = pools.find(pool_id);
    if (it == pools.end()) return kv_expected<bool>::failure("deregister_pool: no pool " + std::to_string(pool_id));
    {
      auto& reg = local_registry::get();
      std::unique_lock lock(reg.mutex); // waits for any memcpy into this pool to finish
      reg.pools.erase({engine_id, pool_id});
    }
    ucp_mem_unmap(context, it->second.memh);
    if (it->second.device_base) device_memory::free_pinned(it->second.base);
    pools.erase(it);
    return true;
  }

  // -- peers --

  kv_expected<kv_peer_id> do_connect(const std::vector<uint8_t>& address) {
    using R = kv_expected<kv_peer_id>;
    auto a = parse_address(address);
    if (!a) return R::failure("connect: " + a.error());
    for (auto& [id, p] : peers)
      if (p->engine_id == a->engine_id && !p->lost) return id;
    auto rec = std::make_unique<peer_record>();
    rec->owner = this;
    rec->id = next_peer_id++;
    rec->engine_id = a->engine_id;
    rec->process_token = a->process_token;
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    ep.address = reinterpret_cast<const ucp_address_t*>(a->raw.data());
    ep.err_mode = error_mode_peer ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
    if (error_mode_peer) {
      ep.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER;
      ep.err_handler.cb = &impl::on_endpoint_error;
      ep.err_handler.arg = rec.get();
    }
    ucs_status_t s = ucp_ep_create(worker, &ep, &rec->ep);
    if (s != UCS_OK)
      return R::failure(ucs_error(("connect to engine " + std::to_string(a->engine_id) +
                                   " (TLS=" + opts.transports + ")")
                                      .c_str(),
                                  s));
    kv_peer_id id = rec->id;
    peers[id] = std::move(rec);
    return id;
  }

  static void on_endpoint_error(void* arg, ucp_ep_h, ucs_status_t status) {
    auto* p = static_cast<peer_record*>(arg);
    if (p->lost) return;
    p->lost = true;
    p->lost_reason = ucs_status_string(status);
    p->owner->lost_pending.push_back(p->id);
  }

  void close_peer_endpoint(peer_record& p) {
    for (auto& [key, rkey] : p.rkeys) ucp_rkey_destroy(rkey); // rkeys go before their endpoint
    p.rkeys.clear();
    for (auto& [key, mapped] : p.ipc_maps) device_memory::close_ipc(mapped);
    p.ipc_maps.clear();
    if (!p.ep) return;
    // FORCE needs error mode PEER on both sides (UCX: undefined behaviour otherwise); without it, close by flushing.
    // A flush-close to a dead shm peer may never finish: teardown_ucx bounds the wait.
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = error_mode_peer ? UCP_EP_CLOSE_FLAG_FORCE : 0;
    void* req = ucp_ep_close_nbx(p.ep, &param);
    if (UCS_PTR_IS_PTR(req)) close_requests.push_back(req);
    p.ep = nullptr;
  }

  void reap_close_requests() {
    for (size_t i = 0; i < close_requests.size();) {
      if (ucp_request_check_status(close_requests[i]) != UCS_INPROGRESS) {
        ucp_request_free(close_requests[i]);
        close_requests[i] = close_requests.back();
        close_requests.pop_back();
      } else {
        ++i;
      }
    }
  }

  /// Fails the peer's transfers and closes its endpoint. `notify_user`: the loss was not asked for.
  void drop_peer(peer_record& p, const std::string& reason, bool notify_user) {
    p.lost = true;
    p.lost_handled = true;
    p.lost_reason = reason;
    std::vector<uint64_t> seqs;
    for (auto& [seq, t] : inflight)
      if (t.request.peer == p.id) seqs.push_back(seq);
    for (auto seq : seqs)
      finish(seq, kv_transfer_status::peer_lost,
             "peer " + std::to_string(p.id) + " (engine " + std::to_string(p.engine_id) + ") lost: " + reason);
    close_peer_endpoint(p);
    if (notify_user) {
      counter_peers_lost.fetch_add(1, std::memory_order_relaxed);
      if (peer_lost_fn) deferred.push_back([fn = peer_lost_fn, id = p.id, reason] { fn(id, reason); });
    }
  }

  void handle_lost_peers() {
    while (!lost_pending.empty()) {
      auto ids = std::move(lost_pending);
      lost_pending.clear();
      for (auto id : ids) {
        auto it = peers.find(id);
        if (it == peers.end() || it->second->lost_handled) continue;
        drop_peer(*it->second, it->second->lost_reason, true);
      }
    }
  }

  void do_disconnect(kv_peer_id id) {
    auto it = peers.find(id);
    if (it == peers.end()) return;
    if (!it->second->lost_handled) drop_peer(*it->second, "disconnected", false);
    peers.erase(it);
  }

  // -- transfers --

  void refuse(kv_transfer_request& req, kv_transfer_done_fn& done, kv_transfer_status st, std::string msg,
              clock_type::time_point submitted) {
    kv_transfer_result r;
    r.transfer_id = req.transfer_id;
    r.epoch = req.epoch;
    r.status = st;
    r.error = std::move(msg);
    for (auto& x : req.ranges) r.bytes += x.length;
    r.timing.queue_wait = clock_type::now() - submitted;
    count_failure(st);
    if (done) deferred.push_back([done = std::move(done), r = std::move(r)] { done(r); });
  }

  void count_failure(kv_transfer_status st) {
    counter_failed.fetch_add(1, std::memory_order_relaxed);
    if (st == kv_transfer_status::peer_lost) counter_failed_peer_lost.fetch_add(1, std::memory_order_relaxed);
    if (st == kv_transfer_status::timeout) counter_failed_timeout.fetch_add(1, std::memory_order_relaxed);
    if (st == kv_transfer_status::bad_descriptor || st == kv_transfer_status::out_of_bounds ||
        st == kv_transfer_status::unknown_peer)
      counter_failed_refused.fetch_add(1, std::memory_order_relaxed);
  }

  void start_transfer(kv_transfer_request req, kv_transfer_done_fn done, clock_type::time_point submitted) {
    counter_started.fetch_add(1, std::memory_order_relaxed);
    auto started = clock_type::now();
    auto tag = "transfer " + std::to_string(req.transfer_id) + " (epoch " + std::to_string(req.epoch) + "): ";
    if (shutting_down)
      return refuse(req, done, kv_transfer_status::shutting_down, tag + "engine is shutting down", submitted);
    auto pit = peers.find(req.peer);
    if (pit == peers.end())
      return refuse(req, done, kv_transfer_status::unknown_peer, tag + "unknown peer " + std::to_string(req.peer),
                    submitted);
    peer_record& peer = *pit->second;
    if (peer.lost)
      return refuse(req, done, kv_transfer_status::peer_lost,
                    tag + "peer " + std::to_string(peer.id) + " was lost: " + peer.lost_reason, submitted);
    auto lit = pools.find(req.local_pool);
    if (lit == pools.end())
      return refuse(req, done, kv_transfer_status::unknown_peer,
                    tag + "no local pool " + std::to_string(req.local_pool) + " on this engine", submitted);
    const pool_record& local = lit->second;
    if (auto v = req.remote.validate(); !v)
      return refuse(req, done, kv_transfer_status::bad_descriptor, tag + v.error(), submitted);
    if (req.remote.engine_id != peer.engine_id)
      return refuse(req, done, kv_transfer_status::bad_descriptor,
                    tag + "descriptor of engine " + std::to_string(req.remote.engine_id) + " used with peer " +
                        std::to_string(peer.id) + " (engine " + std::to_string(peer.engine_id) + ")",
                    submitted);
    uint64_t bytes = 0;
    for (size_t i = 0; i < req.ranges.size(); ++i) {
      const auto& r = req.ranges[i];
      if (!range_fits(r.src_offset, r.length, local.size))
        return refuse(req, done, kv_transfer_status::out_of_bounds,
                      tag + "range " + std::to_string(i) + " [src " + std::to_string(r.src_offset) + " +" +
                          std::to_string(r.length) + ") exceeds the local pool of " + std::to_string(local.size) +
                          " bytes",
                      submitted);
      if (!range_fits(r.dst_offset, r.length, req.remote.size))
        return refuse(req, done, kv_transfer_status::out_of_bounds,
                      tag + "range " + std::to_string(i) + " [dst " + std::to_string(r.dst_offset) + " +" +
                          std::to_string(r.length) + ") exceeds the remote pool of " +
                          std::to_string(req.remote.size) + " bytes",
                      submitted);
      bytes += r.length;
    }
    auto merged = coalesce_page_ranges(req.ranges);
    if (!merged) return refuse(req, done, kv_transfer_status::bad_descriptor, tag + merged.error(), submitted);

    uint64_t seq = next_seq++;
    transfer_record& t = inflight[seq];
    t.submitted = submitted;
    t.started = started;
    auto limit = req.deadline.count() > 0 ? req.deadline : opts.transfer_deadline;
    t.deadline = submitted + limit;
    t.result.transfer_id = req.transfer_id;
    t.result.epoch = req.epoch;
    t.result.bytes = bytes;
    t.request = std::move(req);
    t.done = std::move(done);
    deadlines.insert({t.deadline, seq});
    inflight_count.fetch_add(1, std::memory_order_relaxed);

    if (opts.allow_local_copy && t.request.remote.process_token == process_token() && try_local_copy(seq, *merged))
      return;
    const bool local_gpu = local.device_base != nullptr;
    const bool remote_gpu = t.request.remote.on_device();
    if (local_gpu && remote_gpu && opts.allow_cuda_ipc && !t.request.remote.ipc_handle.empty() &&
        t.request.remote.host_id == device_memory::host_id() && try_cuda_ipc_copy(seq, peer, *merged))
      return;
    if ((local_gpu && !local.mirror) || (remote_gpu && !t.request.remote.staging))
      return finish(seq, kv_transfer_status::bad_descriptor,
                    tag + "GPU pool to GPU pool needs CUDA IPC here (" +
                        (t.request.remote.host_id != device_memory::host_id() ? std::string("the pools are on two hosts")
                         : !opts.allow_cuda_ipc                                 ? std::string("IPC is off")
                                                                                : std::string("CUDA refused the handle")) +
                        "), and the " + (local_gpu && !local.mirror ? "source" : "destination") +
                        " pool has no host staging mirror: set transport.kv_gpu_path: staged");
    if (local_gpu) {
      // Staged: the pages go device -> this pool's host mirror (same offsets), and UCX puts them from there.
      try {
        device_memory::copy_ranges(local.base, local.device_base, device_copies(*merged, /*to_mirror=*/true));
      } catch (const std::exception& e) {
        return finish(seq, kv_transfer_status::transport_error, tag + "staging out of the GPU pool: " + e.what());
      }
      counter_staged.fetch_add(bytes, std::memory_order_relaxed);
      t.result.staged = true;
    }
    if (remote_gpu) {
      t.stage_in = *merged; // the receiver copies them into its GPU pool and acknowledges
      t.result.staged = true;
    }

    // Remote key: unpacked once per (peer, pool, registration).
    ucp_rkey_h rkey = nullptr;
    auto key = std::make_pair(t.request.remote.pool_id, t.request.remote.checksum);
    if (auto kit = peer.rkeys.find(key); kit != peer.rkeys.end()) {
      rkey = kit->second;
    } else {
      ucs_status_t s = ucp_ep_rkey_unpack(peer.ep, t.request.remote.rkey.data(), &rkey);
      if (s != UCS_OK)
        return finish(seq, kv_transfer_status::bad_descriptor, tag + ucs_error("ucp_ep_rkey_unpack", s));
      peer.rkeys[key] = rkey;
    }
    ucp_request_param_t put_param{}; // no callback: the flush below reports the puts' completion and errors
    for (const auto& r : *merged) {
      void* req_ptr = ucp_put_nbx(peer.ep, local.base + r.src_offset, r.length, t.request.remote.remote_base + r.dst_offset,
                                  rkey, &put_param);
      if (UCS_PTR_IS_ERR(req_ptr)) {
        auto st = UCS_PTR_STATUS(req_ptr);
        return finish(seq, peer.lost ? kv_transfer_status::peer_lost : kv_transfer_status::transport_error,
                      tag + ucs_error("ucp_put_nbx", st));
      }
      if (req_ptr) ucp_request_free(req_ptr); // released by UCX when it completes
      t.result.puts++;
    }
    counter_puts.fetch_add(t.result.puts, std::memory_order_relaxed);
    t.issued = clock_type::now();
    t.at = stage::flush;
    auto* ctx = new op_context{this, seq, stage::flush, {}};
    ucp_request_param_t fp{};
    fp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    fp.cb.send = &impl::on_request_done;
    fp.user_data = ctx;
    void* freq = ucp_ep_flush_nbx(peer.ep, &fp);
    if (freq == nullptr) {
      delete ctx;
      return on_flushed(seq, UCS_OK);
    }
    if (UCS_PTR_IS_ERR(freq)) {
      delete ctx;
      return on_flushed(seq, UCS_PTR_STATUS(freq));
    }
  }

  /// Same host, both pools on GPUs: copy straight into the peer's GPU pool through its CUDA IPC handle (mapped
  /// once per pool registration), then send the notice. False (nothing done) when CUDA refuses the handle: the
  /// transfer is then staged through the host mirrors.
  bool try_cuda_ipc_copy(uint64_t seq, peer_record& peer, const std::vector<kv_page_range>& ranges) {
    transfer_record& t = inflight[seq];
    const auto& remote = t.request.remote;
    const pool_record& local = pools[t.request.local_pool];
    auto key = std::make_pair(remote.pool_id, remote.checksum);
    void* mapped = nullptr;
    if (auto it = peer.ipc_maps.find(key); it != peer.ipc_maps.end()) {
      mapped = it->second;
    } else {
      if (ipc_refused.count(remote.engine_id)) return false;
      try {
        mapped = device_memory::open_ipc(remote.ipc_handle, remote.device);
      } catch (const std::exception& e) {
        ipc_refused.insert(remote.engine_id);
        std::fprintf(stderr, "petrel kv engine %llu: CUDA IPC to engine %llu refused (%s); its KV is staged through "
                             "host memory\n",
                     (unsigned long long)engine_id, (unsigned long long)remote.engine_id, e.what());
        return false;
      }
      peer.ipc_maps[key] = mapped;
    }
    try {
      device_memory::copy_ranges(mapped, local.device_base, device_copies(ranges));
    } catch (const std::exception& e) {
      finish(seq, kv_transfer_status::transport_error,
             "transfer " + std::to_string(t.request.transfer_id) + ": CUDA IPC copy failed: " + e.what());
      return true;
    }
    t.result.cuda_ipc = true;
    counter_cuda_ipc.fetch_add(1, std::memory_order_relaxed);
    t.issued = clock_type::now();
    on_flushed(seq, UCS_OK); // the bytes are in the peer's GPU pool: only the notice is left
    return true;
  }

  bool try_local_copy(uint64_t seq, const std::vector<kv_page_range>& ranges) {
    transfer_record& t = inflight[seq];
    const auto& remote = t.request.remote;
    const pool_record& local = pools[t.request.local_pool];
    auto& reg = local_registry::get();
    std::shared_lock lock(reg.mutex);
    auto eit = reg.engines.find(remote.engine_id);
    auto pit = reg.pools.find({remote.engine_id, remote.pool_id});
    if (eit == reg.engines.end() || pit == reg.pools.end()) return false;
    if (reinterpret_cast<uint64_t>(pit->second.first) != remote.data_base() || pit->second.second != remote.size)
      return false; // the descriptor is stale (pool re-registered); let UCX report it
    uint8_t* dst = pit->second.first;
    if (local.device_base || remote.on_device()) {
      try {
        device_memory::copy_ranges(dst, local.data(), device_copies(ranges));
      } catch (const std::exception& e) {
        lock.unlock();
        finish(seq, kv_transfer_status::transport_error,
               "transfer " + std::to_string(t.request.transfer_id) + ": GPU copy failed: " + e.what());
        return true;
      }
    } else {
      for (const auto& r : ranges) std::memmove(dst + r.dst_offset, local.base + r.src_offset, r.length);
    }
    t.issued = t.flushed = clock_type::now();
    t.result.local_copy = true;
    counter_local_copies.fetch_add(1, std::memory_order_relaxed);
    kv_transfer_notice n{t.request.transfer_id, t.request.epoch, t.result.bytes, remote.pool_id, engine_id};
    impl* target = eit->second;
    target->post([target, n] { target->deliver_notice(n); });
    finish(seq, kv_transfer_status::ok, {});
    return true;
  }

  static void on_request_done(void* request, ucs_status_t status, void* user_data) {
    auto* ctx = static_cast<op_context*>(user_data);
    impl* self = ctx->self;
    uint64_t seq = ctx->seq;
    stage kind = ctx->kind;
    delete ctx;
    ucp_request_free(request);
    if (kind == stage::flush)
      self->on_flushed(seq, status);
    else if (kind == stage::ack)
      return; // a stage-in acknowledgement went out; nothing waits for its local completion
    else
      self->on_notice_sent(seq, status);
  }

  kv_transfer_status classify(const transfer_record& t, ucs_status_t s) {
    auto pit = peers.find(t.request.peer);
    bool lost = pit == peers.end() || pit->second->lost;
    if (lost || s == UCS_ERR_CONNECTION_RESET || s == UCS_ERR_ENDPOINT_TIMEOUT || s == UCS_ERR_UNREACHABLE ||
        s == UCS_ERR_CANCELED)
      return kv_transfer_status::peer_lost;
    return kv_transfer_status::transport_error;
  }

  void fail_in_stage(uint64_t seq, const transfer_record& t, const char* stage_name, ucs_status_t status) {
    auto st = classify(t, status);
    std::string msg = "transfer " + std::to_string(t.request.transfer_id) + " (epoch " +
                      std::to_string(t.request.epoch) + ") ";
    if (st == kv_transfer_status::peer_lost)
      msg += "failed in " + std::string(stage_name) + ": peer " + std::to_string(t.request.peer) + " lost (" +
             ucs_status_string(status) + ")";
    else
      msg += "failed in " + std::string(stage_name) + ": " + ucs_status_string(status);
    finish(seq, st, std::move(msg));
  }

  void on_flushed(uint64_t seq, ucs_status_t status) {
    auto it = inflight.find(seq);
    if (it == inflight.end()) return; // already ended (deadline, peer loss)
    transfer_record& t = it->second;
    auto tag = "transfer " + std::to_string(t.request.transfer_id) + ": ";
    if (status != UCS_OK) return fail_in_stage(seq, t, "flush", status);
    t.flushed = clock_type::now();
    t.at = stage::notify;
    auto pit = peers.find(t.request.peer);
    if (pit == peers.end() || !pit->second->ep)
      return finish(seq, kv_transfer_status::peer_lost, tag + "peer disconnected before notify");
    auto* ctx = new op_context{this, seq, stage::notify, {}, {}};
    const uint16_t flags = t.stage_in.empty() ? 0 : notice_flag_stage_in;
    ctx->notice = notice_wire{notice_magic, wire_version, flags, t.request.transfer_id, t.request.epoch, t.result.bytes,
                              t.request.remote.pool_id, engine_id, seq};
    for (const auto& r : t.stage_in) {
      ctx->payload.push_back(r.dst_offset);
      ctx->payload.push_back(r.length);
    }
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = &impl::on_request_done;
    p.user_data = ctx;
    if (flags) {
      // The ranges travel with the notice (eager: the handler reads them in place) and the receiver answers on
      // the reply endpoint once they are in its GPU pool.
      p.op_attr_mask |= UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_AM_SEND_FLAG_EAGER | UCP_AM_SEND_FLAG_REPLY;
    }
    void* req = ucp_am_send_nbx(pit->second->ep, notice_am_id, &ctx->notice, sizeof(notice_wire),
                                ctx->payload.empty() ? nullptr : ctx->payload.data(),
                                ctx->payload.size() * sizeof(uint64_t), &p);
    if (req == nullptr) {
      delete ctx;
      return on_notice_sent(seq, UCS_OK);
    }
    if (UCS_PTR_IS_ERR(req)) {
      delete ctx;
      return on_notice_sent(seq, UCS_PTR_STATUS(req));
    }
  }

  void on_notice_sent(uint64_t seq, ucs_status_t status) {
    auto it = inflight.find(seq);
    if (it == inflight.end()) return;
    if (status != UCS_OK) return fail_in_stage(seq, it->second, "notify", status);
    if (!it->second.stage_in.empty()) {
      it->second.at = stage::ack; // done when the receiver says the pages are in its GPU pool
      return;
    }
    finish(seq, kv_transfer_status::ok, {});
  }

  void finish(uint64_t seq, kv_transfer_status st, std::string error) {
    auto it = inflight.find(seq);
    if (it == inflight.end()) return;
    transfer_record t = std::move(it->second);
    inflight.erase(it);
    deadlines.erase({t.deadline, seq});
    inflight_count.fetch_sub(1, std::memory_order_relaxed);
    auto now = clock_type::now();
    auto span = [](clock_type::time_point a, clock_type::time_point b) {
      return (a.time_since_epoch().count() == 0 || b < a) ? std::chrono::nanoseconds(0)
                                                          : std::chrono::nanoseconds(b - a);
    };
    auto& tm = t.result.timing;
    tm.queue_wait = span(t.submitted, t.started);
    if (st == kv_transfer_status::ok) {
      tm.issue = span(t.started, t.issued);
      tm.flush = span(t.issued, t.flushed);
      tm.notify = span(t.flushed, now);
      counter_ok.fetch_add(1, std::memory_order_relaxed);
      counter_bytes.fetch_add(t.result.bytes, std::memory_order_relaxed);
      counter_latency.fetch_add(uint64_t(tm.total().count()), std::memory_order_relaxed);
    } else {
      tm.issue = span(t.started, now); // everything after the queue wait, until the failure
      count_failure(st);
    }
    t.result.status = st;
    t.result.error = std::move(error);
    if (t.done) deferred.push_back([done = std::move(t.done), r = std::move(t.result)] { done(r); });
  }

  void expire_deadlines() {
    auto now = clock_type::now();
    while (!deadlines.empty() && deadlines.begin()->first <= now) {
      uint64_t seq = deadlines.begin()->second;
      auto it = inflight.find(seq);
      if (it == inflight.end()) {
        deadlines.erase(deadlines.begin());
        continue;
      }
      auto& t = it->second;
      auto limit = std::chrono::duration_cast<std::chrono::milliseconds>(t.deadline - t.submitted);
      finish(seq, kv_transfer_status::timeout,
             "transfer " + std::to_string(t.request.transfer_id) + " (epoch " + std::to_string(t.request.epoch) +
                 ") to peer " + std::to_string(t.request.peer) + ": no completion within " +
                 std::to_string(limit.count()) + " ms (stuck in " + (t.at == stage::flush ? "flush" : t.at == stage::notify ? "notify" : "the receiver's stage-in") +
                 "; is the peer progressing?)");
    }
  }

  // -- receiving --

  static ucs_status_t on_notice_am(void* arg, const void* header, size_t header_length, void* data,
                                   size_t data_length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<impl*>(arg);
    notice_wire w{};
    if (header_length != sizeof w) {
      std::fprintf(stderr, "petrel kv engine %llu: dropped a notice with a %zu-byte header (want %zu)\n",
                   (unsigned long long)self->engine_id, header_length, sizeof w);
      return UCS_OK;
    }
    std::memcpy(&w, header, sizeof w);
    if (w.magic != notice_magic || w.version != wire_version) {
      std::fprintf(stderr, "petrel kv engine %llu: dropped a notice with bad magic/version\n",
                   (unsigned long long)self->engine_id);
      return UCS_OK;
    }
    if (w.flags & notice_flag_stage_in) {
      self->stage_in(w, data, data_length, param);
      return UCS_OK;
    }
    self->deliver_notice(kv_transfer_notice{w.transfer_id, w.epoch, w.bytes, w.pool_id, w.sender_engine_id});
    return UCS_OK;
  }

  /// A staged transfer into one of this engine's GPU pools landed in the pool's host mirror: copy its ranges
  /// into the GPU pool, then acknowledge (the sender's transfer completes only then) and report the notice.
  void stage_in(const notice_wire& w, const void* data, size_t data_length, const ucp_am_recv_param_t* param) {
    bool ok = false;
    std::string why;
    auto pit = pools.find(w.pool_id);
    if (pit == pools.end() || !pit->second.device_base) {
      why = "no GPU pool " + std::to_string(w.pool_id);
    } else if (data_length % (2 * sizeof(uint64_t)) != 0 || (data_length > 0 && !data)) {
      why = "malformed range list (" + std::to_string(data_length) + " bytes)";
    } else {
      const pool_record& pool = pit->second;
      std::vector<uint64_t> pairs(data_length / sizeof(uint64_t));
      if (data_length) std::memcpy(pairs.data(), data, data_length);
      std::vector<device_memory::copy_range> copies;
      for (size_t i = 0; i + 1 < pairs.size(); i += 2) {
        if (!range_fits(pairs[i], pairs[i + 1], pool.size)) {
          why = "range outside the pool";
          break;
        }
        copies.push_back({pairs[i], pairs[i], pairs[i + 1]});
      }
      if (why.empty()) {
        try {
          device_memory::copy_ranges(pool.device_base, pool.base, copies);
          counter_staged.fetch_add(w.bytes, std::memory_order_relaxed);
          ok = true;
        } catch (const std::exception& e) {
          why = e.what();
        }
      }
    }
    if (!ok)
      std::fprintf(stderr, "petrel kv engine %llu: staged transfer %llu not copied into its GPU pool: %s\n",
                   (unsigned long long)engine_id, (unsigned long long)w.transfer_id, why.c_str());
    if (param && (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) && param->reply_ep) {
      auto* ack = new ack_wire{notice_magic, wire_version, uint16_t(ok ? 1 : 0), w.sender_seq, engine_id};
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
      p.cb.send = [](void* request, ucs_status_t, void* user) {
        delete static_cast<ack_wire*>(user);
        ucp_request_free(request);
      };
      p.user_data = ack;
      void* req = ucp_am_send_nbx(param->reply_ep, ack_am_id, ack, sizeof *ack, nullptr, 0, &p);
      if (req == nullptr || UCS_PTR_IS_ERR(req)) delete ack;
    }
    if (ok) deliver_notice(kv_transfer_notice{w.transfer_id, w.epoch, w.bytes, w.pool_id, w.sender_engine_id});
  }

  static ucs_status_t on_ack_am(void* arg, const void* header, size_t header_length, void*, size_t,
                                const ucp_am_recv_param_t*) {
    auto* self = static_cast<impl*>(arg);
    ack_wire a{};
    if (header_length != sizeof a) return UCS_OK;
    std::memcpy(&a, header, sizeof a);
    if (a.magic != notice_magic || a.version != wire_version) return UCS_OK;
    auto it = self->inflight.find(a.sender_seq);
    if (it == self->inflight.end() || it->second.at != stage::ack) return UCS_OK; // ended already (deadline)
    if (a.ok)
      self->finish(a.sender_seq, kv_transfer_status::ok, {});
    else
      self->finish(a.sender_seq, kv_transfer_status::transport_error,
                   "transfer " + std::to_string(it->second.request.transfer_id) + ": engine " +
                       std::to_string(a.receiver_engine_id) +
                       " could not copy the staged pages into its GPU pool (see its log)");
    return UCS_OK;
  }

  void deliver_notice(const kv_transfer_notice& n) {
    counter_notices.fetch_add(1, std::memory_order_relaxed);
    counter_bytes_received.fetch_add(n.bytes, std::memory_order_relaxed);
    if (notice_fn) deferred.push_back([fn = notice_fn, n] { fn(n); });
  }

  // -- state --

  kv_transfer_options opts;
  uint64_t engine_id = 0;
  bool error_mode_peer = true;
  std::vector<uint8_t> published_address;

  ucp_context_h context = nullptr;
  ucp_worker_h worker = nullptr;
  int worker_fd = -1;
  int wake_fd = -1;

  std::thread thread;
  std::thread::id thread_id;
  std::mutex mutex;
  std::vector<std::function<void()>> commands;
  std::atomic<bool> commands_pending{false};
  std::atomic<bool> stop_requested{false};
  std::atomic<bool> stopping{false};
  bool shutting_down = false;

  // Progress thread only.
  std::unordered_map<uint64_t, pool_record> pools;
  uint64_t next_pool_id = 1;
  std::unordered_map<kv_peer_id, std::unique_ptr<peer_record>> peers;
  kv_peer_id next_peer_id = 1;
  std::unordered_map<uint64_t, transfer_record> inflight;
  std::set<std::pair<clock_type::time_point, uint64_t>> deadlines;
  uint64_t next_seq = 1;
  std::vector<kv_peer_id> lost_pending;
  std::vector<void*> close_requests;
  std::vector<std::function<void()>> deferred;
  std::set<uint64_t> ipc_refused; // engines whose GPU pools CUDA would not map here: staged instead
  kv_notice_fn notice_fn;
  kv_peer_lost_fn peer_lost_fn;

  std::atomic<size_t> inflight_count{0};
  std::atomic<uint64_t> counter_started{0}, counter_ok{0}, counter_failed{0}, counter_failed_peer_lost{0},
      counter_failed_timeout{0}, counter_failed_refused{0}, counter_bytes{0}, counter_puts{0}, counter_local_copies{0}, counter_cuda_ipc{0}, counter_staged{0},
      counter_notices{0}, counter_bytes_received{0}, counter_peers_lost{0}, counter_latency{0};
};

// -- public API ---------------------------------------------------------------------------------------------------

kv_expected<std::unique_ptr<kv_transfer_engine>> kv_transfer_engine::create(kv_transfer_options options) {
  using R = kv_expected<std::unique_ptr<kv_transfer_engine>>;
  if (options.transports.empty()) return R::failure("kv transfer options: transports is empty (try \"tcp\")");
  if (options.transfer_deadline.count() <= 0) return R::failure("kv transfer options: transfer_deadline must be > 0");
  auto p = std::make_unique<impl>(std::move(options));
  std::promise<kv_expected<bool>> ready;
  auto ready_future = ready.get_future();
  impl* raw = p.get();
  p->thread = std::thread([raw, &ready] {
    raw->thread_id = std::this_thread::get_id();
    auto ok = raw->init_ucx();
    bool good = ok.has_value();
    ready.set_value(std::move(ok));
    if (good) raw->loop();
  });
  auto ok = ready_future.get();
  if (!ok) {
    p->thread.join();
    p->teardown_ucx();
    return R::failure(ok.error());
  }
  pthread_setname_np(p->thread.native_handle(), p->opts.name.substr(0, 15).c_str());
  {
    auto& reg = local_registry::get();
    std::unique_lock lock(reg.mutex);
    reg.engines[p->engine_id] = raw;
  }
  return std::unique_ptr<kv_transfer_engine>(new kv_transfer_engine(std::move(p)));
}

kv_transfer_engine::kv_transfer_engine(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

kv_transfer_engine::~kv_transfer_engine() {
  {
    auto& reg = local_registry::get();
    std::unique_lock lock(reg.mutex);
    reg.engines.erase(impl_->engine_id);
    for (auto it = reg.pools.begin(); it != reg.pools.end();)
      it = it->first.first == impl_->engine_id ? reg.pools.erase(it) : std::next(it);
  }
  impl_->stopping.store(true);
  impl_->stop_requested.store(true, std::memory_order_release);
  impl_->post([] {});
  if (impl_->thread.joinable()) impl_->thread.join();
}

uint64_t kv_transfer_engine::engine_id() const { return impl_->engine_id; }
const std::vector<uint8_t>& kv_transfer_engine::worker_address() const { return impl_->published_address; }
const kv_transfer_options& kv_transfer_engine::options() const { return impl_->opts; }

kv_expected<kv_pool_descriptor> kv_transfer_engine::register_pool(void* base, size_t bytes) {
  return impl_->call<kv_expected<kv_pool_descriptor>>([this, base, bytes] { return impl_->do_register_pool(base, bytes); });
}

kv_expected<bool> kv_transfer_engine::deregister_pool(uint64_t pool_id) {
  return impl_->call<kv_expected<bool>>([this, pool_id] { return impl_->do_deregister_pool(pool_id); });
}

kv_expected<kv_peer_id> kv_transfer_engine::connect(const std::vector<uint8_t>& peer_worker_address) {
  return impl_->call<kv_expected<kv_peer_id>>([this, &peer_worker_address] { return impl_->do_connect(peer_worker_address); });
}

void kv_transfer_engine::disconnect(kv_peer_id peer) {
  impl_->post([this, peer] { impl_->do_disconnect(peer); });
}

void kv_transfer_engine::transfer(kv_transfer_request request, kv_transfer_done_fn done) {
  auto submitted = clock_type::now();
  if (impl_->stopping.load()) {
    kv_transfer_result r;
    r.transfer_id = request.transfer_id;
    r.epoch = request.epoch;
    r.status = kv_transfer_status::shutting_down;
    r.error = "kv transfer engine is shutting down";
    if (done) done(r);
    return;
  }
  impl_->post([this, request = std::move(request), done = std::move(done), submitted]() mutable {
    impl_->start_transfer(std::move(request), std::move(done), submitted);
  });
}

void kv_transfer_engine::transfer(kv_peer_id peer, uint64_t local_pool, const kv_pool_descriptor& remote,
                                  std::vector<kv_page_range> ranges, uint64_t transfer_id, uint64_t epoch,
                                  kv_transfer_done_fn done) {
  kv_transfer_request r;
  r.peer = peer;
  r.local_pool = local_pool;
  r.remote = remote;
  r.ranges = std::move(ranges);
  r.transfer_id = transfer_id;
  r.epoch = epoch;
  transfer(std::move(r), std::move(done));
}

void kv_transfer_engine::on_notify(kv_notice_fn fn) {
  impl_->call<bool>([this, fn = std::move(fn)]() mutable {
    impl_->notice_fn = std::move(fn);
    return true;
  });
}

void kv_transfer_engine::on_peer_lost(kv_peer_lost_fn fn) {
  impl_->call<bool>([this, fn = std::move(fn)]() mutable {
    impl_->peer_lost_fn = std::move(fn);
    return true;
  });
}

kv_transfer_counters kv_transfer_engine::counters() const {
  const impl& i = *impl_;
  auto ld = [](const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  kv_transfer_counters c;
  c.transfers_started = ld(i.counter_started);
  c.transfers_ok = ld(i.counter_ok);
  c.transfers_failed = ld(i.counter_failed);
  c.failed_peer_lost = ld(i.counter_failed_peer_lost);
  c.failed_timeout = ld(i.counter_failed_timeout);
  c.failed_refused = ld(i.counter_failed_refused);
  c.bytes_sent = ld(i.counter_bytes);
  c.puts_issued = ld(i.counter_puts);
  c.local_copies = ld(i.counter_local_copies);
  c.cuda_ipc_copies = ld(i.counter_cuda_ipc);
  c.staged_bytes = ld(i.counter_staged);
  c.notices_received = ld(i.counter_notices);
  c.bytes_received = ld(i.counter_bytes_received);
  c.peers_lost = ld(i.counter_peers_lost);
  c.latency_ns_total = ld(i.counter_latency);
  return c;
}

size_t kv_transfer_engine::in_flight() const { return impl_->inflight_count.load(std::memory_order_relaxed); }

} // namespace petrel::transport
