// The expert all-to-all between processes over UCX (tag matching): one ep_transport per rank.
//
// Each all-to-all part is one tagged message: UCX tag = source rank (8 bits) | the group's tag (56 bits: step,
// micro-batch, layer, phase). Parts have any size, so a wait probes each expected tag, then receives it. Sends
// go straight from the caller's buffers (the ep_transport contract keeps them alive until the wait returns).
//
// Threading: the rank's thread drives the UCX worker (progress happens inside start and wait); every call must
// come from that one thread. Messages that arrive while the rank computes wait in UCX's unexpected queue.
//
// Failure: abort() sends a reason to every peer, whose next wait throws transport_error. A peer that dies is
// detected by the endpoint error callback (error mode PEER, which UCX supports over tcp), and a wait that sees
// no progress for `wait_timeout` throws too. Either way the group is over: its supervisor restarts it.
//
// Setup, out of band (the rank actors carry the addresses in CAF messages):
//   auto t = ep_ucx_transport::create(rank, size, opts);   // every rank
//   addresses[rank] = t->address();                        // gather every rank's address
//   t->connect(addresses);                                 // every rank, before the first all-to-all
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/ep_transport.hpp"

namespace petrel::transport {

struct ep_ucx_options {
  /// UCX_TLS. "tcp" detects a dead peer (error mode PEER); shared-memory transports do not.
  std::string transports = "tcp";
  /// UCX_NET_DEVICES for tcp, e.g. "lo". Empty: UCX's default.
  std::string net_devices;
  /// A wait that sees no part arrive for this long throws transport_error.
  std::chrono::milliseconds wait_timeout{60'000};
};

class ep_ucx_transport final : public petrel::ep::ep_transport {
public:
  /// Creates this rank's UCX context and worker. Throws petrel::ep::transport_error with UCX's message.
  static std::unique_ptr<ep_ucx_transport> create(int rank, int size, const ep_ucx_options& opts = {});
  ~ep_ucx_transport() override;

  /// This rank's worker address, to hand to every peer.
  std::vector<uint8_t> address() const;
  /// Connects to every other rank (addresses[r], one per rank; this rank's own entry is ignored).
  void connect(const std::vector<std::vector<uint8_t>>& addresses);

  int rank() const override;
  int size() const override;
  void start_all_to_all(uint64_t tag, std::span<const std::span<const std::byte>> send) override;
  void wait_all_to_all(uint64_t tag, std::vector<petrel::ep::byte_buffer>& recv) override;
  void abort(const std::string& reason) override;
  void on_abort(std::function<void(const std::string&)> hook) override;
  void poll() override;

private:
  struct impl;
  explicit ep_ucx_transport(std::unique_ptr<impl> p);
  std::unique_ptr<impl> p_;
};

} // namespace petrel::transport
