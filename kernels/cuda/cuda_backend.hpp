// The cuda backend: every Backend op (runtime/backend.hpp) in fp32 on one CUDA device.
//
// Plain C++ header (no CUDA types), so that the factory and the tests include it from g++ translation units.
// The kernels live in cuda_backend.cu (memory, errors, cuBLAS, capture) and backend_*.cu (one file per op family).
//
// Streams: the backend owns two non-blocking streams. Every op, copy and allocation zero-fill is issued on the
// COMPUTE stream in program order, so a freed block can be handed out again at once (stream order protects it).
// The AUX stream is for work a caller wants to overlap (it is exposed, not used by the ops).
//
// Errors, in two classes (see docs/cuda-kernels.md):
//   - recoverable (out of memory, invalid argument, unsupported shape): a C++ exception, cuda_error or its
//     subclass cuda_oom_error; the context is intact, the step fails, the rank goes on.
//   - sticky (illegal address, launch failure, illegal instruction, misaligned address, assert, ECC, ...): the
//     context is dead for good, every later call would fail. The backend prints the error and the op to stderr and
//     ends the process with exit code cuda_sticky_exit_code (86) through std::_Exit, so the supervisor restarts it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>

#include "runtime/backend.hpp"

namespace petrel::kernels {

/// Exit code of a process that hit a sticky CUDA error (the context cannot be used again).
constexpr int cuda_sticky_exit_code = 86;

/// A recoverable CUDA or cuBLAS failure: the step fails, the device stays usable.
struct cuda_error : std::runtime_error {
  cuda_error(const std::string& msg, int code) : std::runtime_error(msg), code(code) {}
  int code; // cudaError_t or cublasStatus_t value
};
/// The device (or the pinned host pool) has no memory left, even after the cache was released.
struct cuda_oom_error : cuda_error {
  using cuda_error::cuda_error;
};

/// Number of CUDA devices visible (0 when none, or when the driver is missing); `why` gets the reason for 0.
int cuda_device_count(std::string* why = nullptr);

struct cuda_backend_options {
  /// Let cuBLAS use TF32 tensor cores for fp32 GEMMs (about 1e-3 relative error; fixtures need it off).
  bool allow_tf32 = false;
  /// Bytes of cuBLAS workspace (fixed, so that GEMMs are graph-capturable).
  size_t cublas_workspace_bytes = size_t(32) << 20;
};

/// Caching allocator counters.
struct cuda_allocator_stats {
  size_t bytes_in_use = 0;     // handed out to callers (rounded to the size class)
  size_t bytes_cached = 0;     // freed by callers, kept for reuse
  size_t bytes_reserved = 0;   // in_use + cached = what cudaMalloc holds
  size_t peak_bytes_in_use = 0;
  uint64_t allocations = 0;    // allocate() calls
  uint64_t cache_hits = 0;     // served from a freed block of the same size class
  uint64_t device_mallocs = 0; // cudaMalloc calls
  uint64_t cache_flushes = 0;  // times an out-of-memory cudaMalloc released the cache and retried
};

class cuda_backend final : public backend {
public:
  /// Binds to device `device` (0-based). Throws std::invalid_argument when there is no such device.
  explicit cuda_backend(int device = 0, cuda_backend_options opt = {});
  ~cuda_backend() override;
  cuda_backend(const cuda_backend&) = delete;
  cuda_backend& operator=(const cuda_backend&) = delete;

  std::string name() const override;
  void set_num_threads(int) override {}
  int device() const { return device_; }

  // -- memory ------------------------------------------------------------------------------------
  device_buffer allocate(size_t bytes) override;
  void deallocate(void* ptr, size_t bytes) override;
  void copy_to_device(void* dst, const void* host_src, size_t bytes) override;
  void copy_to_host(void* host_dst, const void* src, size_t bytes) override;
  void copy_device(void* dst, const void* src, size_t bytes) override;
  void fill_zero(void* dst, size_t bytes) override;
  void synchronize() override;
  void set_wait_hook(std::function<void()> hook) override;
  void bind_thread() override;

  cuda_allocator_stats allocator_stats() const;
  /// Returns every cached (free) block to the driver.
  void release_cached_memory();
  /// The size class a request of `bytes` is rounded to (512 B granules up to 1 MiB, then 2 MiB granules).
  static size_t size_class(size_t bytes);

  // -- streams and precision ---------------------------------------------------------------------
  /// cudaStream_t of the compute stream (every op runs there) and of the auxiliary stream, as void*.
  void* compute_stream() const;
  void* aux_stream() const;
  void set_allow_tf32(bool allow);
  bool allow_tf32() const { return opt_.allow_tf32; }

  // -- CUDA graphs -------------------------------------------------------------------------------
  // Capture: begin_capture(), then the ops of a step (on device pointers whose buffers stay alive), then
  // end_capture() returns a graph id; replay_graph(id) relaunches it on the compute stream. Host copies
  // (copy_to_device / copy_to_host) cannot be captured: they throw cuda_error while capturing, so a captured step
  // reads its inputs from buffers the caller fills with copy_to_device before each replay. Blocks freed during a
  // capture are held by the graph until destroy_graph(id) (the graph still points at them). The launch shape of
  // every op depends only on its host arguments (mla_decode_attention: batch, heads, max_ctx), so one graph per
  // batch-size bucket (and max_ctx bound) replays correctly for any device-side values within those bounds.
  void begin_capture();
  int end_capture();
  void replay_graph(int id);
  void destroy_graph(int id);
  bool capturing() const { return capturing_; }
  /// Step graphs per bucket (the decode step's batch-size bucket, say): the first call with `key` runs `step`
  /// eagerly (it sizes every workspace and allocation), the second captures it and replays the capture, later calls
  /// replay. `step` must issue device work only, on pointers that stay valid (its inputs are filled with
  /// copy_to_device before the call). Returns true when the step ran from a graph. If the capture fails, the
  /// capture is abandoned, the key falls back to eager runs, and the error propagates.
  bool run_step_graph(uint64_t key, const std::function<void()>& step) override;
  bool supports_graphs() const override { return true; }
  /// Launches a kernel that traps on the compute stream and waits for it: a sticky error, so the process exits
  /// with cuda_sticky_exit_code like after any device fault.
  void inject_device_fault() override;
  /// Destroys every step graph (after the buffers they use were reallocated, say).
  void clear_step_graphs() override;

  // -- device-side MoE permutation (graph-safe: no host round trip) ------------------------------
  /// From topk_ids [tokens, top_k] (device int32) computes, all on the device:
  ///   expert_offsets [num_experts + 1]  start of each expert's rows in the permuted order
  ///   perm_rows [tokens * top_k]        token row of each permuted row (grouped by expert, stable)
  ///   perm_weights [tokens * top_k]     its routing weight (topk_weights may be nullptr: weights skipped)
  /// The order matches runtime/model.cpp's host counting sort exactly.
  void moe_permute(const int32_t* topk_ids, const float* topk_weights, int64_t tokens, int64_t top_k,
                   int64_t num_experts, int32_t* expert_offsets, int32_t* perm_rows, float* perm_weights) override;
  /// Expert FFN over permuted rows with device-side offsets (graph-safe), y[r] = W_down,e (silu(W_g x) * W_u x)
  /// for row r of expert e, with expert_offsets as above; gate_up[e] / down[e] are device arrays of weight
  /// pointers ([2*inter, hidden] and [hidden, inter]); max_rows bounds the rows (sizes the grid).
  /// x [max_rows, hidden], act scratch [max_rows, inter], gu scratch [max_rows, 2*inter], y [max_rows, hidden].
  void grouped_expert_ffn(const int32_t* expert_offsets, int64_t num_experts, const float* const* gate_up_w,
                          const float* const* down_w, int64_t hidden, int64_t inter, int64_t max_rows,
                          const mat_view& x, float* gu, float* act, const mat_view& y) override;
  /// counts[topk_ids[i]] += 1 for i < n with i / top_k < *valid_tokens (atomics; graph-safe).
  void expert_histogram(const int32_t* topk_ids, int64_t n, int64_t top_k, const int32_t* valid_tokens,
                        int32_t* counts) override;

  // -- dense math ----------------------------------------------------------------------------------
  void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
            const float* b, int64_t ldb, float beta, float* c, int64_t ldc) override;
  void embedding(const int32_t* ids, int64_t n, const float* table, int64_t hidden, float* out) override;
  void rmsnorm(const mat_view& x, const float* weight, float eps, const mat_view& out) override;
  void copy_mat(const mat_view& src, const mat_view& dst) override;
  void add_inplace(const mat_view& x, const mat_view& y) override;
  void silu_mul(const mat_view& gate_up, int64_t inter, const mat_view& out) override;
  void rope_cos_sin(const int32_t* positions, int64_t n, const float* inv_freq, int64_t rope_dim,
                    float attention_factor, float* cos_sin) override;
  void rope_interleaved(const mat_view& x, int64_t heads, int64_t head_stride, int64_t offset, int64_t rope_dim,
                        const float* cos_sin) override;

  // -- MLA -----------------------------------------------------------------------------------------
  void kv_store(const kv_pool_geometry& pool, int32_t layer, const int32_t* slots, int64_t n,
                const mat_view& src) override;
  void kv_gather(const kv_pool_geometry& pool, int32_t layer, const int32_t* slots, int64_t n,
                 const mat_view& dst) override;
  void mla_prefill_attention(const mat_view& q, const mat_view& kv, const mat_view& k_pe, const mat_view& out,
                             int64_t heads, int64_t nope, int64_t rope, int64_t v_dim, int64_t start, float scale,
                             float* scratch) override;
  void mla_decode_attention(const kv_pool_geometry& pool, int32_t layer, const decode_attention_batch& b,
                            const mat_view& q_abs, const mat_view& out_lat, int64_t heads, int64_t kv_lora,
                            float scale, float* scratch) override;

  // -- MoE -----------------------------------------------------------------------------------------
  void route_noaux_tc(const mat_view& logits, const float* correction_bias, const route_params& p,
                      int32_t* topk_ids, float* topk_weights) override;
  void gather_rows(const mat_view& src, const int32_t* rows, int64_t n, const mat_view& dst) override;
  void scatter_rows(const mat_view& src, const int32_t* rows, int64_t n, const mat_view& dst) override;
  void scatter_add_rows(const mat_view& src, const int32_t* rows, const float* weights, int64_t n,
                        const mat_view& dst) override;

  struct impl; // CUDA-side state (streams, cuBLAS handle, allocator, graphs, workspaces)

private:
  /// Scratch owned by the backend, grown outside capture; valid until the next call of the same kind.
  void* workspace(int slot, size_t bytes);

  int device_;
  cuda_backend_options opt_;
  bool capturing_ = false;
  std::unique_ptr<impl> impl_;
};

} // namespace petrel::kernels
