// The expert all-to-all of one EP group through NCCL: the baseline that Petrel's own kernels (ep_a2a) are measured
// against, and the exchange for GPUs that CUDA IPC cannot join (another host, no peer access).
//
// One nccl_rows per rank, one communicator per group generation. Rank 0 makes the unique id
// (make_unique_id); whatever connects the ranks carries it (in a served cluster the rank's CAF `ep_endpoint` /
// `ep_peers` messages); connect() then creates the communicator on every rank, a collective call.
//
// Per micro-batch, the normal-mode contract of ep_buffer (ep_a2a.hpp), so the plane computes on either:
//   dispatch  a route kernel gives every token its position in each destination rank's list (token order), a pack
//             kernel writes one record per (token, destination): the fp8 row, its 1x128 scales, the token's top-k
//             ids local to that rank (-1 elsewhere) and weights, the source token index. The counts go through an
//             NCCL all-to-all first and the host waits for them (NCCL needs every send and receive size on the
//             host: the cost that Petrel's kernels avoid by all-gathering counts through peer memory on the device).
//             Then the records, and an unpack kernel writes recv()'s arrays.
//   combine   bf16 rows back to their sources through NCCL, summed on the token's rank over ranks in rank order
//             (fp32, deterministic).
// Every micro-batch uses the same communicator and stream (NCCL needs every rank to issue one communicator's
// operations in the same order; ep_rank makes the same calls on every rank).
// A watchdog thread times every NCCL operation: one that has not finished timeout_s after it was enqueued (a peer
// died or stalls) aborts the communicator, which ends NCCL's kernels, so no stream waits forever; error() then
// names it. abort() does the same at once (the EP group's abort hook).
// NCCL refuses two ranks of one communicator on one GPU: every rank needs a device of its own.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "kernels/cuda/ep_a2a.hpp"

namespace petrel::cuda {

struct nccl_rows_config {
  int rank = 0;
  int ranks = 1;          // <= 64
  int hidden = 7168;      // % 128 == 0
  int experts = 256;      // expert slots of the group, % ranks == 0
  int topk = 8;           // <= 32
  int micro_batches = 1;  // 1 or 2
  double timeout_s = 20;  // watchdog limit of every NCCL operation
  int device = -1;        // -1: the current device
};

class nccl_rows {
public:
  /// A new NCCL unique id (the bytes of ncclUniqueId): call on rank 0 only, in the process that will be rank 0.
  /// Throws std::runtime_error when NCCL cannot be loaded.
  static std::vector<std::uint8_t> make_unique_id();

  /// Creates the rank's stream and watchdog. Throws std::invalid_argument (bad config) or std::runtime_error (no
  /// NCCL, CUDA failure).
  explicit nccl_rows(const nccl_rows_config& cfg);
  ~nccl_rows();
  nccl_rows(const nccl_rows&) = delete;
  nccl_rows& operator=(const nccl_rows&) = delete;

  /// Creates the communicator from rank 0's id; every rank of the group calls it (it returns when all joined, and
  /// throws when they have not after timeout_s: non-blocking creation, where the library has it).
  void connect(const std::vector<std::uint8_t>& unique_id);
  bool connected() const;
  cudaStream_t stream() const { return stream_; }

  /// Normal-mode dispatch of micro-batch `mb` (stream order; the host waits for the counts): x_fp8 e4m3
  /// [tokens, hidden] with scales [hidden/128][fp8_scale_ld(tokens)], topk_idx [tokens, topk] expert slots (-1 none),
  /// topk_weights [tokens, topk]. No limit on tokens: buffers grow.
  void dispatch(int mb, const void* x_fp8, const float* x_scales, const int* topk_idx, const float* topk_weights,
                int tokens);
  /// What `mb`'s dispatch received (device pointers, valid until its next dispatch). capacity >= 1; rows past the
  /// received total carry topk_idx -1.
  ep_normal_recv recv(int mb) const;
  /// Rows received by `mb`'s last dispatch (host copy).
  std::int64_t received(int mb) const;
  /// y bf16 [received(mb) or more, hidden] back to the tokens' ranks; out fp32 [tokens of the dispatch, hidden] =
  /// the sum over ranks, in rank order (stream order).
  void combine(int mb, const void* y_bf16, float* out);

  /// "" or why the exchange failed (an NCCL error, a timed-out operation naming the rank, or an abort).
  std::string error() const;
  /// Aborts the communicator (thread-safe): NCCL's kernels end without data, error() names `reason`.
  void abort(const std::string& reason);
  /// Device bytes this rank holds for the exchange (all micro-batches).
  std::size_t buffer_bytes() const;

private:
  struct state;
  /// Why the exchange gives up on NCCL operation `what` that has not finished within timeout_s.
  std::string stalled(const std::string& what) const;
  void watch(const char* what);     // hands the NCCL work just enqueued to the watchdog
  void wait_host(const char* what); // the host waits for the stream, bounded; throws on failure
  void end_group(const char* what); // ncclGroupEnd, waiting (bounded) while a non-blocking communicator issues it
  bool nonblocking_ = false;        // the communicator was created non-blocking
  std::unique_ptr<state> st_;
  nccl_rows_config cfg_;
  cudaStream_t stream_ = nullptr;
};

} // namespace petrel::cuda
