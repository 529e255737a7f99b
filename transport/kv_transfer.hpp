// KV transfer engine: moves KV-cache pages from a prefill rank's pool into a decode rank's pool.
//
// Protocol (docs/kv-transfer.md): one-sided puts of the page ranges, then an endpoint flush (remote completion:
// the bytes are visible in the target pool), then an active message that tells the target which transfer landed.
// Transport is UCX (ucp). A second path, used when the destination pool lives in this same process, is a plain
// memcpy with the same semantics (same callbacks, same notice on the target engine).
//
// GPU pools (a pointer into CUDA device memory, see kernels/device_memory.hpp) take one of two paths:
//   cuda_ipc  both pools on GPUs of one host: the sender maps the destination pool through its CUDA IPC handle and
//             copies device to device (NVLink between GPUs, HBM on one GPU); then the notice, as usual.
//   staged    otherwise (another host, IPC refused): every GPU pool has a page-locked host mirror that UCX
//             registers; the sender copies its pages device -> mirror, puts them into the peer's mirror, and the
//             notice carries the page ranges so that the receiving engine copies them mirror -> device BEFORE it
//             reports the notice. Debian's UCX has no CUDA transports, so UCX never sees device memory.
//
// Threading: every engine owns one ucp context and one ucp worker, and ONE thread (the engine's progress thread)
// owns the worker. Every public member function is thread-safe: it enqueues a command for the progress thread.
// Every callback (transfer done, notice, peer lost) runs ON THE PROGRESS THREAD, so a callback must be short and
// must not block (hand the result to an actor and return). A callback may call back into the engine.
//
// No CAF here: actors/kv_agent wraps this class and turns callbacks into messages.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace petrel::transport {

// -- errors as values ---------------------------------------------------------------------------------------------

/// A value or a message saying what went wrong (std::expected is C++23; this is the small subset we need).
template <class T>
class kv_expected {
public:
  kv_expected(T value) : state_(std::move(value)) {}
  static kv_expected failure(std::string message) {
    kv_expected e{failure_tag{}};
    e.state_ = std::move(message);
    return e;
  }
  explicit operator bool() const { return state_.index() == 0; }
  bool has_value() const { return state_.index() == 0; }
  T& value() { return std::get<0>(state_); }
  const T& value() const { return std::get<0>(state_); }
  T& operator*() { return value(); }
  const T& operator*() const { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  /// The failure message; empty when a value is held.
  const std::string& error() const {
    static const std::string none;
    return state_.index() == 1 ? std::get<1>(state_) : none;
  }

private:
  struct failure_tag {};
  explicit kv_expected(failure_tag) : state_(std::string{}) {}
  std::variant<T, std::string> state_;
};

// -- configuration ------------------------------------------------------------------------------------------------

/// How to detect a dead peer. `peer` needs a transport with failure detection (tcp); `none` is what shm allows.
enum class kv_error_mode { automatic, peer, none };

struct kv_transfer_options {
  /// UCX transports (the UCX_TLS setting, applied with ucp_config_modify before ucp_init). "tcp" detects a killed
  /// peer in ~0.2 s (error mode PEER). "shm" (posix/sysv/cma) is faster on one host but has no peer-failure
  /// detection: a dead peer is only noticed by the transfer deadline. See docs/kv-transfer.md.
  std::string transports = "tcp";
  /// UCX_NET_DEVICES for tcp, e.g. "lo" to stay on loopback. Empty: UCX's default (all interfaces).
  std::string net_devices;
  /// UCX tcp segment size (UCX_TCP_TX_SEG_SIZE / _RX_SEG_SIZE). UCX's default of 8 KiB costs ~3x bandwidth on
  /// KV pages (tens of KiB each); 0 keeps UCX's default.
  size_t tcp_segment_bytes = 256 * 1024;
  /// Further UCX settings, name without the UCX_ prefix (e.g. {"TCP_SNDBUF", "4m"}); applied last.
  std::vector<std::pair<std::string, std::string>> ucx_config;
  /// automatic: peer when `transports` names tcp, none otherwise.
  kv_error_mode error_mode = kv_error_mode::automatic;
  /// Every transfer ends within this time (ok or an error), unless the request sets its own deadline.
  std::chrono::milliseconds transfer_deadline{10'000};
  /// Use a memcpy when the destination pool belongs to an engine of this same process.
  bool allow_local_copy = true;
  /// Copy GPU pool to GPU pool through CUDA IPC when both are on this host (else they are staged through host
  /// mirrors and UCX).
  bool allow_cuda_ipc = true;
  /// Give every GPU pool a pinned host mirror as large as the pool, for the staged path. Without one (a cluster on
  /// one host), a transfer CUDA IPC cannot make fails with bad_descriptor and says why.
  bool gpu_host_mirror = true;
  /// Spin on ucp_worker_progress instead of sleeping on the worker's event fd (lower latency, burns a core).
  bool busy_poll = false;
  /// The progress thread sleeps on the worker's event fd; it also wakes after this long when idle (1 ms while
  /// transfers are in flight) in case a transport event was missed.
  std::chrono::milliseconds idle_wakeup{5};
  /// Engine identity carried in addresses and notices; 0 picks a random one.
  uint64_t engine_id = 0;
  /// Names the progress thread and the UCX worker (shows up in UCX logs and `top -H`).
  std::string name = "petrel-kv";
};

// -- pools and descriptors ----------------------------------------------------------------------------------------

/// Everything a remote engine needs to write into a registered pool. Plain fields, so that an actor can carry it
/// in a CAF message (or use to_bytes/from_bytes). `checksum` seals the other fields against corruption.
struct kv_pool_descriptor {
  std::vector<uint8_t> worker_address; // the owning engine's published address (what connect() takes)
  uint64_t remote_base = 0;            // virtual address of the pool in its owner's process
  uint64_t size = 0;                   // bytes
  std::vector<uint8_t> rkey;           // packed UCX remote key (ucp_rkey_pack)
  uint64_t engine_id = 0;              // owning engine
  uint64_t pool_id = 0;                // pool id within the owning engine
  uint64_t process_token = 0;          // random per process: equal tokens mean "same process" (memcpy path)
  // GPU pools (memory == cuda): remote_base/rkey name the pool's pinned host mirror; these name the pool itself.
  uint8_t memory = 0;                  // 0: host memory, 1: CUDA device memory
  uint64_t device_base = 0;            // the pool's device address in its owner's process
  int32_t device = -1;                 // its GPU ordinal
  std::vector<uint8_t> ipc_handle;     // CUDA IPC handle of the pool's allocation (empty: none)
  uint64_t host_id = 0;                // the owner's host (kernel boot id): IPC only between equal ids
  uint8_t staging = 0;                 // a GPU pool with a host mirror (remote_base/rkey): staged transfers work
  uint64_t checksum = 0;               // FNV-1a over all fields above

  bool on_device() const { return memory == 1; }
  /// Where the pool's bytes are in its owner's process (the device pool for GPU pools).
  uint64_t data_base() const { return on_device() ? device_base : remote_base; }

  /// Recomputes `checksum` from the other fields.
  void seal();
  /// Checks magic-free invariants and the checksum; the message names the broken field.
  kv_expected<bool> validate() const;
  /// Self-describing byte string (magic, version, fields, checksum).
  std::vector<uint8_t> to_bytes() const;
  static kv_expected<kv_pool_descriptor> from_bytes(const std::vector<uint8_t>& bytes);
};

/// Lower-case hex, handy for pipes and logs.
std::string to_hex(const std::vector<uint8_t>& bytes);
kv_expected<std::vector<uint8_t>> from_hex(const std::string& text);

/// One contiguous run of bytes: source offset in the local pool, destination offset in the remote pool.
struct kv_page_range {
  uint64_t src_offset = 0;
  uint64_t dst_offset = 0;
  uint64_t length = 0;
};

/// Sorts by destination, rejects overlapping or empty destination ranges, and merges ranges that are adjacent on
/// both sides into one. Exposed for tests and for callers that want to know how many puts a transfer costs.
kv_expected<std::vector<kv_page_range>> coalesce_page_ranges(std::vector<kv_page_range> ranges);

// -- transfers ------------------------------------------------------------------------------------------------------

using kv_peer_id = uint64_t;

enum class kv_transfer_status {
  ok,
  peer_lost,       // the endpoint's error callback fired (or the peer was disconnected) before completion
  timeout,         // the deadline passed before the notice was sent
  bad_descriptor,  // malformed descriptor, checksum mismatch, rkey unpack failure, wrong engine
  out_of_bounds,   // a range falls outside the local or remote pool: refused before any put
  unknown_peer,    // no such peer handle, or unknown local pool
  transport_error, // UCX refused an operation
  shutting_down,   // the engine is being destroyed
};

const char* to_string(kv_transfer_status status);

/// Time split of one transfer, measured on the sender. Each field is the time since the previous stage.
struct kv_transfer_timing {
  std::chrono::nanoseconds queue_wait{0};  // transfer() call -> progress thread starts it
  std::chrono::nanoseconds issue{0};       // -> every put issued (or memcpy done)
  std::chrono::nanoseconds flush{0};       // -> flush complete: data visible in the target pool
  std::chrono::nanoseconds notify{0};      // -> notice sent (AM send completed)
  std::chrono::nanoseconds total() const { return queue_wait + issue + flush + notify; }
};

struct kv_transfer_request {
  kv_peer_id peer = 0;
  uint64_t local_pool = 0;           // pool_id of a pool registered on THIS engine (the source)
  kv_pool_descriptor remote;         // destination pool, as registered by the peer
  std::vector<kv_page_range> ranges; // bytes to move; adjacent ranges are coalesced
  uint64_t transfer_id = 0;          // caller's id, echoed in the result and in the target's notice
  uint64_t epoch = 0;                // fencing epoch, echoed likewise
  std::chrono::milliseconds deadline{0}; // 0: options.transfer_deadline
};

struct kv_transfer_result {
  uint64_t transfer_id = 0;
  uint64_t epoch = 0;
  kv_transfer_status status = kv_transfer_status::ok;
  std::string error;     // empty when ok; otherwise says what failed and where
  uint64_t bytes = 0;    // bytes requested
  uint32_t puts = 0;     // puts after coalescing (0 on the memcpy path)
  bool local_copy = false;
  bool cuda_ipc = false; // GPU to GPU through CUDA IPC
  bool staged = false;   // a GPU pool on either side went through its host mirror
  kv_transfer_timing timing;
  bool ok() const { return status == kv_transfer_status::ok; }
};

/// What the target engine reports when a transfer's notice arrives (the data is already in its pool).
struct kv_transfer_notice {
  uint64_t transfer_id = 0;
  uint64_t epoch = 0;
  uint64_t bytes = 0;
  uint64_t pool_id = 0;          // destination pool on this engine
  uint64_t sender_engine_id = 0; // the engine that pushed the pages
};

using kv_transfer_done_fn = std::function<void(const kv_transfer_result&)>;
using kv_notice_fn = std::function<void(const kv_transfer_notice&)>;
using kv_peer_lost_fn = std::function<void(kv_peer_id peer, const std::string& reason)>;

/// Monotonic counters; a snapshot is cheap and thread-safe.
struct kv_transfer_counters {
  uint64_t transfers_started = 0;
  uint64_t transfers_ok = 0;
  uint64_t transfers_failed = 0;
  uint64_t failed_peer_lost = 0;
  uint64_t failed_timeout = 0;
  uint64_t failed_refused = 0;      // bad descriptor, out of bounds, unknown peer/pool
  uint64_t bytes_sent = 0;          // by transfers that ended ok
  uint64_t puts_issued = 0;
  uint64_t local_copies = 0;
  uint64_t cuda_ipc_copies = 0;     // transfers that went GPU to GPU through CUDA IPC
  uint64_t staged_bytes = 0;        // bytes copied between a GPU pool and its host mirror (both directions)
  uint64_t notices_received = 0;
  uint64_t bytes_received = 0;      // as announced by received notices
  uint64_t peers_lost = 0;
  uint64_t latency_ns_total = 0;    // sum of timing.total() over ok transfers
};

// -- the engine -----------------------------------------------------------------------------------------------------

class kv_transfer_engine {
public:
  /// Starts the progress thread and brings UCX up (context, worker, notice handler). Fails with UCX's reason.
  static kv_expected<std::unique_ptr<kv_transfer_engine>> create(kv_transfer_options options = {});

  /// Fails every in-flight transfer with shutting_down (callbacks run), closes endpoints, unmaps pools.
  ~kv_transfer_engine();
  kv_transfer_engine(const kv_transfer_engine&) = delete;
  kv_transfer_engine& operator=(const kv_transfer_engine&) = delete;

  uint64_t engine_id() const;
  /// The bytes a peer passes to connect(): wrapped UCX worker address (magic, engine id, checksum).
  const std::vector<uint8_t>& worker_address() const;
  const kv_transfer_options& options() const;

  /// Registers [base, base+bytes) once and returns its descriptor; blocks until the progress thread has done it.
  /// Host memory is mapped for UCX (ucp_mem_map). CUDA device memory (the start of a cudaMalloc allocation) gets
  /// a pinned host mirror of the same size, which UCX maps, and a CUDA IPC handle for same-host peers.
  kv_expected<kv_pool_descriptor> register_pool(void* base, size_t bytes);
  /// Unmaps a pool. Transfers still using it as a source must have ended.
  kv_expected<bool> deregister_pool(uint64_t pool_id);

  /// Creates (or returns the live) endpoint to the engine that published `peer_worker_address`.
  /// Error mode PEER when enabled: a dead peer triggers on_peer_lost and fails its transfers.
  kv_expected<kv_peer_id> connect(const std::vector<uint8_t>& peer_worker_address);
  /// Closes the endpoint; its in-flight transfers fail with peer_lost ("disconnected").
  void disconnect(kv_peer_id peer);

  /// Starts a transfer; `done` runs exactly once on the progress thread (or inline, with shutting_down, when the
  /// engine is already stopping).
  void transfer(kv_transfer_request request, kv_transfer_done_fn done);
  void transfer(kv_peer_id peer, uint64_t local_pool, const kv_pool_descriptor& remote,
                std::vector<kv_page_range> ranges, uint64_t transfer_id, uint64_t epoch, kv_transfer_done_fn done);

  /// Receiver side: called for every notice that arrives (after the data is visible).
  void on_notify(kv_notice_fn fn);
  /// Called once per lost peer, with UCX's reason.
  void on_peer_lost(kv_peer_lost_fn fn);

  kv_transfer_counters counters() const;
  /// Transfers started and not yet ended.
  size_t in_flight() const;

  class impl;

private:
  explicit kv_transfer_engine(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

} // namespace petrel::transport
