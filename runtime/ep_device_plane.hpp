// The GPU data plane of an EP group: dispatch and combine rows move between the ranks' device memory through
// Petrel's intranode all-to-all kernels (kernels/cuda/ep_a2a), never through the host.
//
// ep_rank keeps its ep_transport for the control traffic (step header, expert-load gather, weight moves of a
// rebalance, and the one-time exchange of the planes' handles); a device_plane carries the token rows of every
// MoE layer. Per micro-batch, three stages that only enqueue work on the device (no host wait):
//   dispatch  the hidden rows (fp32, the backend's activations) are quantised to fp8 1x128 (normal mode) or cast
//             to bf16 (low-latency mode, the kernel casts to fp8) and sent to the ranks owning their physical
//             expert slots;
//   compute   the received rows are grouped by local expert and run through the rank's experts: dequantised into
//             the backend's fp32 grouped FFN, or (fp8_experts) fp8 grouped GEMMs on the fp8 rows as they arrived.
//             Normal mode applies the routing weights here and sums the token's local experts in k order;
//   combine   the rows go back in bf16 and are summed on the token's rank (normal: over ranks in rank order;
//             low latency: weighted, in k order) into `out`.
// Precision: fp8 activations (and with fp8_experts fp8 expert weights) into the experts and bf16 on the way back, as in
// DeepSeek's deployment, so the output differs from the host plane (fp32 throughout) at that tolerance.
//
// Every micro-batch slot has its own buffer (two with two-batch overlap), so the calls of one slot follow the
// all-to-all kernels' order contract (dispatch, combine, next dispatch) while the two slots interleave.
// A peer that stops answering makes the kernels' bounded waits time out; check() then throws, which fails the
// step like any transport error (the group re-forms).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "runtime/backend.hpp"
#include "runtime/tensor.hpp"

namespace petrel::ep {

/// What moves the rows between the ranks' GPUs.
///   cuda_ipc  Petrel's own kernels (kernels/cuda/ep_a2a) writing into the peers' memory, mapped through CUDA IPC:
///             one host, ranks may share a GPU; low-latency mode uses the masked layout and its receive hook.
///   nccl      NCCL send/recv (kernels/cuda/ep_nccl): the baseline, and the exchange for GPUs that CUDA IPC cannot
///             reach. Normal-mode layout in both modes; the host waits for the counts of every dispatch; every rank
///             needs a GPU of its own (NCCL refuses two ranks on one GPU). Up to 64 ranks.
enum class device_exchange_kind : uint8_t { cuda_ipc, nccl };

struct device_plane_config {
  device_exchange_kind kind = device_exchange_kind::cuda_ipc;
  /// nccl: rank 0's NCCL unique id (make_device_plane_bootstrap on rank 0), the same bytes on every rank.
  std::vector<uint8_t> bootstrap;
  int rank = 0;
  int ranks = 1;
  int64_t hidden = 0;        // % 128 == 0
  int64_t inter = 0;         // moe_intermediate_size
  int slots = 0;             // physical expert slots of the group, divisible by ranks
  int top_k = 0;
  int max_tokens = 0;        // normal mode: most tokens one rank dispatches per micro-batch
  int ll_max_tokens = 0;     // low-latency mode: most tokens per rank and micro-batch (0: no low-latency buffers)
  int micro_batches = 1;     // 2 with two-batch overlap
  /// Experts as DeepSeek's deployment runs them: fp8 weights (128x128 block scales, quantised from the store) in
  /// Petrel's fp8 grouped GEMMs, fed the received fp8 rows directly (contiguous layout in normal mode, the masked
  /// layout as it arrives in low-latency mode). Off (the default): the rows are dequantised and run through the
  /// backend's fp32 grouped FFN. Opt-in: tested in-process and benchmarked, but a served cluster with it hung at
  /// its first request on the H100 (docs/gpu-expert-exchange.md, "fp8 experts").
  bool fp8_experts = false;
  double timeout_s = 10;     // bounded wait of every receive
};

class device_plane {
public:
  virtual ~device_plane() = default;

  /// This rank's handles (all micro-batch buffers), as bytes for the other ranks (nccl: none).
  virtual std::vector<uint8_t> export_handle() const = 0;
  /// Maps every rank's buffers; handles[r] = rank r's export_handle() (nccl: creates the communicator, a call
  /// every rank makes together). Throws std::runtime_error naming the cause.
  virtual void open_peers(const std::vector<std::vector<uint8_t>>& handles) = 0;

  /// Stage 1 of micro-batch `mb`. hidden [tokens, hidden] fp32 (any ld); slots_dev [tokens, top_k] physical slot
  /// ids (backend int32); weights_dev [tokens, top_k] routing weights (backend fp32). Both stay valid until
  /// combine(mb) returns. `low_latency` selects the mode (every rank of the group passes the same).
  virtual void dispatch(int mb, bool low_latency, const mat_view& hidden, const int32_t* slots_dev,
                        const float* weights_dev, int64_t tokens) = 0;
  /// The local experts of MoE layer `moe_layer`, in local slot order: fp32 weights on the backend, gate_up
  /// [2*inter, hidden] and down [hidden, inter] each. Call for every layer before the first compute and again after
  /// the store changed (a rebalance); the pointers stay valid until then. With fp8_experts the plane quantises them
  /// (128x128 blocks) into its own copies here.
  virtual void set_experts(int moe_layer, const std::vector<const float*>& gate_up,
                           const std::vector<const float*>& down) = 0;
  /// Stage 2: runs the local experts of `moe_layer` on what arrived. group_tokens: tokens the whole group
  /// dispatches in this micro-batch (bounds the rows that can arrive, so the scratch is sized without asking the
  /// device).
  virtual void compute(int mb, int moe_layer, int64_t group_tokens) = 0;
  /// Stage 3: out [tokens of the dispatch, hidden] = the combined expert outputs (overwritten).
  virtual void combine(int mb, const mat_view& out) = 0;

  /// Throws std::runtime_error when a kernel recorded a failure (a wait that timed out names the peer). Call it
  /// after the step's work was synchronised (the logits reached the host).
  virtual void check() = 0;
  /// Makes every wait of this rank's kernels, pending or later, give up at once (check() then names `reason`).
  /// Thread-safe and non-blocking: the group's abort hook calls it from another thread.
  virtual void abort(const std::string& reason) = 0;
  /// Bytes of peer-visible device memory this rank allocated (all buffers).
  virtual size_t buffer_bytes() const = 0;
};

/// Ranks that are threads of one process and share a GPU spin in receive kernels while a peer thread launches the
/// kernel they wait for. Two CUDA defaults can make that launch wait behind the spin until the receive times out:
/// lazy module loading (a kernel's first launch, including a cuBLAS kernel picked for a new shape, may wait for the
/// whole context to go idle) and too few hardware queues (streams that share one are serialised; some images
/// export CUDA_DEVICE_MAX_CONNECTIONS=1). Call this before the process's first CUDA call in every process whose
/// ranks use the plane: it loads modules eagerly and asks for 32 queues.
inline void prepare_process_for_device_plane() {
  setenv("CUDA_MODULE_LOADING", "EAGER", 1);
  setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 1);
}

/// What rank 0 makes before the group connects and every rank then passes as device_plane_config::bootstrap:
/// NCCL's unique id for nccl (throws std::runtime_error without NCCL or CUDA), nothing for cuda_ipc.
std::vector<uint8_t> make_device_plane_bootstrap(device_exchange_kind kind);

/// Creates the plane on `be`'s device. Throws std::invalid_argument when the backend has no device plane (cpu, or
/// a build without CUDA) or the config does not fit (hidden % 128, slots % ranks, top_k, ranks <= 8).
std::unique_ptr<device_plane> make_device_plane(backend& be, const device_plane_config& cfg);

} // namespace petrel::ep
