// The expert all-to-all of one EP group, behind ONE interface with a start half and a wait half.
//
// Every exchange the group makes is an all-to-all under a 64-bit tag that all ranks agree on (step, micro-batch,
// layer, phase: see make_tag): each rank hands one byte range per destination (empty allowed, itself included)
// and gets one back from every source. The dispatch and combine of the MoE layers, the per-step header, the
// expert-load gather and the expert-weight moves of a live rebalance all use it; nothing else crosses ranks.
//
// Implementations:
//   inprocess_exchange   N ranks as N threads of one process (shared-memory mailboxes), with an injectable delay.
//   ep_ucx_transport     ranks in different processes (transport/ep_ucx), tagged sends per destination.
// The token rows themselves may bypass it: with ep_options::device_exchange, runtime/ep_device_plane moves them
// between the ranks' GPUs and the transport carries only the control traffic.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace petrel::ep {

using byte_buffer = std::vector<std::byte>;

/// The group failed: a peer aborted (its step threw) or a peer was lost. Every pending and later wait throws it.
struct transport_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// What an all-to-all carries; the low 4 bits of a tag.
enum class exchange_phase : uint8_t {
  step_header = 1, // per-step agreement: token counts, mode, rebalance requests
  dispatch = 2,    // token rows to the ranks owning their experts
  combine = 3,     // expert outputs back to the tokens' ranks
  load_gather = 4, // expert-load windows, for EPLB
  weights = 5,     // expert weights moving to their new ranks
  device_handles = 6, // the GPU data planes' buffer handles, once per group (runtime/ep_device_plane.hpp)
};

/// step (40 bits) | micro-batch (4 bits) | layer (16 bits) | phase (4 bits).
inline uint64_t make_tag(uint64_t step, int micro_batch, int layer, exchange_phase phase) {
  return (step << 24) | (uint64_t(micro_batch & 0xf) << 20) | (uint64_t(layer & 0xffff) << 4) | uint64_t(phase);
}

class ep_transport {
public:
  virtual ~ep_transport() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;

  /// Starts the all-to-all `tag`: send[d] goes to rank d (send.size() == size()). Returns without waiting for
  /// the peers. The caller keeps every send[d] alive and unchanged until wait_all_to_all(tag) returns, so an
  /// implementation may send from the caller's memory. Each tag is used once per rank.
  virtual void start_all_to_all(uint64_t tag, std::span<const std::span<const std::byte>> send) = 0;

  /// Blocks until rank s's part of `tag` has arrived for every s; recv[s] = those bytes (resized to size()).
  /// Throws transport_error once the group is aborted.
  virtual void wait_all_to_all(uint64_t tag, std::vector<byte_buffer>& recv) = 0;

  /// Fails the whole group (idempotent): every pending and later wait on every rank throws transport_error(reason).
  virtual void abort(const std::string& reason) = 0;

  /// Called with the reason when the group is aborted, by whichever thread aborts it (so keep it short and
  /// non-blocking; an empty function removes it). A rank whose thread waits on the GPU, not in this transport,
  /// learns of the abort this way. Where the transport cannot tell (a peer in another process), nothing is called.
  virtual void on_abort(std::function<void(const std::string&)> hook) { (void)hook; }

  /// Makes progress without waiting, from the rank's own thread, while it waits for something else (the GPU):
  /// a transport that learns of the group's failure here (a peer's abort message, a peer process that died) aborts
  /// the group, which calls the on_abort hook, and throws transport_error like a wait. Default: nothing to do.
  virtual void poll() {}
};

/// Shared-memory mailboxes of N in-process ranks. make_rank(r) gives rank r's endpoint; the exchange must
/// outlive them. `delay` simulates the network: a part becomes visible to its receiver `delay` after it was
/// started (without burning a core), for the two-batch-overlap measurement.
class inprocess_exchange {
public:
  explicit inprocess_exchange(int size, std::chrono::microseconds delay = std::chrono::microseconds(0));
  ~inprocess_exchange();

  std::unique_ptr<ep_transport> make_rank(int rank);
  int size() const { return size_; }
  void set_delay(std::chrono::microseconds d);

  /// Bytes that went through start_all_to_all (all ranks, self-sends included), and all-to-alls completed.
  uint64_t bytes_sent() const;

private:
  class endpoint;
  struct arrival {
    std::vector<byte_buffer> parts;
    std::vector<bool> present;
    int count = 0;
    std::chrono::steady_clock::time_point ready;
  };
  struct mailbox {
    std::map<uint64_t, arrival> by_tag;
  };

  void deliver(int from, int to, uint64_t tag, std::span<const std::byte> bytes);
  void collect(int rank, uint64_t tag, std::vector<byte_buffer>& recv);
  void fail(const std::string& reason);
  void set_hook(int rank, std::function<void(const std::string&)> hook);

  const int size_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<mailbox> boxes_;
  std::chrono::microseconds delay_;
  bool aborted_ = false;
  std::string abort_reason_;
  std::vector<std::function<void(const std::string&)>> hooks_; // per rank, see ep_transport::on_abort
  uint64_t bytes_ = 0;
};

} // namespace petrel::ep
