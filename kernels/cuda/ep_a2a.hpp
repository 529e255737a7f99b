// The expert all-to-all of one EP group inside one host, on GPUs: Petrel's own dispatch and combine kernels
// that write straight into the peers' device memory (NVLink between GPUs; HBM when ranks share one GPU).
//
// One ep_buffer per rank. It owns one peer-visible device allocation (receive buffers + signal words) that
// every other rank maps: through a CUDA IPC handle when the peer is another process, through the plain
// pointer when it is a thread of the same process. The handle is plain bytes (export_handle), so whatever
// connects the ranks (a pipe, a file, later a CAF message between rank actors) carries it; open_peers takes
// all ranks' handles, in rank order. Each rank owns its own cudaStream_t; every call only enqueues work on it.
//
// Two modes (docs/gpu-expert-exchange.md has the whole design):
//   normal (prefill)      fp8 rows + their 1x128 scales go once per destination rank, with the token's top-k
//                         ids (local to that rank, -1 elsewhere) and weights. Counts are all-gathered first
//                         through the peer buffers, so every receiver gets its rows packed, grouped by source
//                         rank, in token order. Combine sends bf16 rows back and sums them, unweighted, on
//                         the token's owner in rank order (deterministic).
//   low latency (decode)  bf16 in, fp8 cast inside the send kernel, rows land in the masked grouped-GEMM layout
//                         [local_experts, ranks * max_tokens, hidden] with a count per expert. Weighted combine.
//                         Two buffers used alternately; send and receive are separate calls (the receive is the
//                         hook), nothing allocates or syncs the host: CUDA-graph safe.
// Signalling: data, then __threadfence_system, then a release add to a counter in the receiver's memory.
// Receivers wait in one-block kernels with a bounded spin; a timeout is recorded (error()) instead of a hang.
// Counters only grow, so a value from an earlier round never satisfies a later wait.
//
// Ordering contract (as DeepEP's): every rank makes the same calls in the same order, and a rank calls
// dispatch, then combine, then the next dispatch. The normal receive buffers stay valid until this rank's next
// dispatch; the low-latency ones until the next-but-one low-latency dispatch (double buffering).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "kernels/cuda/fp8_layout.hpp"

namespace petrel::cuda {

/// Most ranks one intranode group may have (one host: up to 8 GPUs, or ranks sharing them).
constexpr int ep_max_ranks = 8;

/// What one rank's buffer is sized for; every rank of a group must pass the same values (open_peers checks).
struct ep_buffer_config {
  int rank = 0;
  int ranks = 1;
  int hidden = 7168;      // % 128 == 0
  int experts = 256;      // global expert count, % ranks == 0 (expert e lives on rank e / (experts / ranks))
  int topk = 8;           // <= 32
  int max_tokens = 4096;  // normal mode: tokens one rank dispatches at most
  int ll_max_tokens = 128; // low-latency mode: tokens one rank dispatches at most (the M of the masked layout)
  bool normal = true;     // allocate the normal-mode buffers
  bool low_latency = true; // allocate the low-latency buffers (two of them)
  double timeout_s = 20;  // bounded spin of every wait
  int device = -1;        // CUDA device; -1 = the current one
};

/// The normal-mode receive side after dispatch (device pointers into this rank's buffer). Rows
/// [rank_offsets[s], rank_offsets[s+1]) came from rank s, in its token order. `capacity` rows are addressable;
/// rows past the total carry topk_idx -1, so a caller may pass tokens = capacity to moe_permute_contiguous
/// without a host sync.
struct ep_normal_recv {
  const void* x_fp8 = nullptr;     // e4m3 [capacity, hidden]
  const float* scales = nullptr;   // [hidden/128][fp8_scale_ld(capacity)]
  const int* topk_idx = nullptr;   // [capacity, topk] local expert ids, -1 where the pair lives elsewhere
  const float* topk_weights = nullptr; // [capacity, topk] (0 where topk_idx is -1)
  const int* src_token = nullptr;  // [capacity] the token index on its source rank
  const int* rank_offsets = nullptr; // [ranks + 1] on the device
  std::int64_t capacity = 0;
};

/// The low-latency receive side after ll_dispatch_recv: the masked layout of the grouped GEMM.
struct ep_ll_recv {
  const void* x_fp8 = nullptr;   // e4m3 [local_experts, max_m, hidden]
  const float* scales = nullptr; // [hidden/128][fp8_scale_ld(local_experts * max_m)]
  const int* masked_m = nullptr; // [local_experts] rows per expert (device)
  const int* src_info = nullptr; // [local_experts, max_m]: ((src_rank * ll_max_tokens) + token) * topk + k
  int local_experts = 0;
  std::int64_t max_m = 0;        // ranks * ll_max_tokens
};

class ep_buffer {
public:
  /// Allocates the buffers on cfg.device (or the current device) and creates the rank's stream.
  /// Throws std::invalid_argument for a bad config, std::runtime_error for a CUDA failure (both name the cause).
  explicit ep_buffer(const ep_buffer_config& cfg);
  ~ep_buffer();
  ep_buffer(const ep_buffer&) = delete;
  ep_buffer& operator=(const ep_buffer&) = delete;

  const ep_buffer_config& config() const { return cfg_; }
  cudaStream_t stream() const { return stream_; }
  int local_experts() const { return cfg_.experts / cfg_.ranks; }
  /// Bytes of peer-visible device memory this rank allocated.
  std::size_t buffer_bytes() const;

  // -- the handle exchange ------------------------------------------------------------------------

  /// This rank's handle: plain bytes (IPC handle, pointer, pid, host, device, config) for the other ranks.
  std::vector<std::uint8_t> export_handle() const;
  /// Maps every rank's buffer; handles[r] is rank r's export_handle() (this rank's own included).
  /// Another process's buffer is opened with cudaIpcOpenMemHandle, a buffer of this process is used directly,
  /// and peer access is enabled between different devices. Fails (message) on a handle of another config,
  /// rank or host.
  kernel_status open_peers(const std::vector<std::vector<std::uint8_t>>& handles);
  bool peers_open() const { return peers_open_; }

  // -- normal mode (prefill) ----------------------------------------------------------------------

  /// Dispatch `tokens` (<= max_tokens) rows: x_fp8 e4m3 [tokens, hidden] with scales
  /// [hidden/128][fp8_scale_ld(tokens)] (quantize_bf16_to_fp8_1x128's layout), topk_idx int [tokens, topk]
  /// (global expert ids, -1 = none), topk_weights fp32 [tokens, topk]. On return (stream order) recv() holds the
  /// rows this rank received. The routing is kept for the next combine.
  kernel_status dispatch(const void* x_fp8, const float* x_scales, const int* topk_idx, const float* topk_weights,
                         int tokens);
  ep_normal_recv recv() const;
  /// Sends y bf16 [capacity or more, hidden] (one row per received row, in recv() order) back to the tokens'
  /// owners, which sum the rows of every rank their token went to, in rank order, in fp32, into out
  /// [tokens of the last dispatch, hidden]: bf16, or fp32 when out_fp32.
  kernel_status combine(const void* y_bf16, void* out, bool out_fp32 = false);

  // -- low-latency mode (decode) -------------------------------------------------------------------

  /// Casts x bf16 [tokens, hidden] (tokens <= ll_max_tokens) to fp8 1x128 and writes one row per (token, k)
  /// with topk_idx[t, k] >= 0 into the owning rank's masked layout. Returns without waiting for peers.
  kernel_status ll_dispatch_send(const void* x_bf16, const int* topk_idx, int tokens);
  /// The receive hook: waits (on the stream) until every rank's rows of the matching send arrived and writes
  /// the per-expert counts. Other work enqueued between send and recv overlaps the transfer.
  kernel_status ll_dispatch_recv();
  /// The masked layout of the current round (valid after ll_dispatch_recv, in stream order).
  ep_ll_recv ll_recv() const;
  /// Sends y bf16 [local_experts, max_m, hidden] (the grouped GEMM's output in the masked layout; rows past
  /// masked_m are not read) back to the tokens' owners.
  kernel_status ll_combine_send(const void* y_bf16);
  /// Waits for every rank's combine rows, then out[t] = bf16(sum_k w[t, k] * row(t, k)) in k order (fp32 fma),
  /// skipping k with topk_idx -1. topk_idx/topk_weights/tokens as passed to the matching ll_dispatch_send.
  kernel_status ll_combine_recv(const int* topk_idx, const float* topk_weights, int tokens, void* out_bf16);

  // -- misc ------------------------------------------------------------------------------------------

  /// A device-side barrier of all ranks on the stream (no host sync). For benchmarks; not graph safe.
  kernel_status barrier();
  /// "" or the first failure a kernel recorded (a wait that timed out names the peer and the round). Read it
  /// after synchronising the stream; clear_error() resets it.
  std::string error() const;
  void clear_error();
  /// Makes every wait, pending or later, give up at once (its kernels then finish without data); error() names
  /// `reason`. For a group that failed elsewhere: a rank spinning on the GPU cannot hear a host-side abort.
  /// Thread-safe (it only writes the mapped error words); the buffer is unusable afterwards.
  void abort(const std::string& reason);

private:
  struct peer_map;
  kernel_status launch_wait(int kind, std::size_t counters_offset, std::uint64_t target, bool device_round,
                            int parity);

  ep_buffer_config cfg_;
  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  char* shared_ = nullptr;          // the peer-visible allocation
  std::size_t shared_bytes_ = 0;
  char* local_ = nullptr;           // this rank's private device state (routing handle, counts, rounds)
  std::size_t local_bytes_ = 0;
  int* error_host_ = nullptr;       // mapped pinned words: code (1 timeout, 2 aborted), kind, peer, round
  std::string abort_reason_;
  int* error_dev_ = nullptr;
  std::unique_ptr<peer_map> peers_;
  bool peers_open_ = false;
  // host-side sequence numbers (normal mode and the barrier); low latency counts rounds on the device
  std::uint64_t normal_dispatch_seq_ = 0, normal_combine_seq_ = 0, barrier_seq_ = 0;
  int last_tokens_ = 0;
  std::uint64_t ll_calls_ = 0;
  int ll_parity_ = 0;
};

/// Parses the fields of a handle without opening it (for error messages and tests).
struct ep_handle_info {
  int rank = -1, ranks = 0, device = -1;
  long pid = 0;
  std::string host;
};
bool parse_ep_handle(const std::vector<std::uint8_t>& bytes, ep_handle_info* out, std::string* error);

} // namespace petrel::cuda
