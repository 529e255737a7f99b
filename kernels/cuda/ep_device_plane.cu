// The GPU data plane of an EP group (runtime/ep_device_plane.hpp): ep_buffer's dispatch/combine kernels, glued to
// the cuda backend's fp32 activations and grouped expert FFN.
//
// Streams: the backend's compute stream runs every conversion and the experts; each micro-batch's ep_buffer has
// its own stream for the all-to-all kernels (whose waits spin). Events order the two, so the host never waits:
//   compute: quantise ---ev_in--> ep: dispatch ---ev_recv--> compute: experts ---ev_y--> ep: combine
//   ---ev_out--> compute: copy into `out`.
// Buffer reuse across layers is safe because each stage of layer l+1 is ordered after the matching stage of
// layer l on both streams. Every buffer the ep stream writes or reads is (re)allocated before the hand-off that
// precedes that use: an allocation zero-fills on the compute stream.
#include "runtime/ep_device_plane.hpp"

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "kernels/cuda/cuda_backend.hpp"
#include "kernels/cuda/ep_a2a.hpp"
#include "kernels/cuda/ep_nccl.hpp"
#include "kernels/cuda/fp8_layout.hpp"
#include "kernels/cuda/fp8_warp_quant.cuh"
#include "kernels/cuda/grouped_gemm_fp8.hpp"
#include "kernels/cuda/layer_ops.hpp"

namespace petrel::ep {
namespace {

using petrel::cuda::fp8_block;
using petrel::cuda::fp8_scale_ld;

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("GPU expert exchange: ") + what + ": " + cudaGetErrorString(e));
}
void check_status(const petrel::cuda::kernel_status& s) {
  if (!s.ok()) throw std::runtime_error("GPU expert exchange: " + s.message);
}
void check_launch(const char* what) { check_cuda(cudaGetLastError(), what); }

unsigned grid_for(int64_t n, int threads, int64_t cap = 4096) {
  int64_t g = (n + threads - 1) / threads;
  return unsigned(std::clamp<int64_t>(g, 1, cap));
}

using petrel::cuda::quantize_block_1x128;
using petrel::cuda::warp_max;

// -- conversions --------------------------------------------------------------------------------------------

// One warp per (row, 128-block): the 1x128 quantisation of kernels/cuda/fp8_warp_quant.cuh (as kernels/cuda/quant),
// from fp32 rows with a leading dimension.
__global__ void quantize_f32_kernel(const float* __restrict__ x, int64_t ld, int64_t rows, int64_t hidden,
                                    int64_t scale_ld, uint8_t* __restrict__ q, float* __restrict__ scales) {
  const int lane = threadIdx.x & 31;
  const int64_t blocks = hidden / fp8_block;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t w = int64_t(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5); w < rows * blocks; w += warps) {
    const int64_t row = w / blocks, kb = w % blocks;
    const float4 v = *reinterpret_cast<const float4*>(x + row * ld + kb * fp8_block + lane * 4);
    const float scale = quantize_block_1x128(v, q + row * hidden + kb * fp8_block + lane * 4);
    if (lane == 0) scales[kb * scale_ld + row] = scale;
  }
}

__global__ void f32_to_bf16_kernel(const float* __restrict__ x, int64_t ld, int64_t rows, int64_t cols,
                                   __nv_bfloat16* __restrict__ out) {
  const int64_t n = rows * cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(x[(i / cols) * ld + i % cols]);
}

__global__ void bf16_to_f32_kernel(const __nv_bfloat16* __restrict__ in, int64_t rows, int64_t cols, float* out,
                                   int64_t ld) {
  const int64_t n = rows * cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[(i / cols) * ld + i % cols] = __bfloat162float(in[i]);
}

__device__ __forceinline__ float dequant(const uint8_t* q, const float* scales, int64_t scale_ld, int64_t row,
                                         int64_t col) {
  __nv_fp8_e4m3 v;
  v.__x = q[col];
  return float(v) * scales[(col / fp8_block) * scale_ld + row];
}

// -- normal mode: group the received (row, k) pairs by local expert --------------------------------------------

// One block. Pairs of the `total` received rows (rank_offsets[ranks]) whose local expert id is >= 0 get a
// position: offsets[e] .. offsets[e+1] for expert e; perm_src[p] = the received row, pair_pos[i] = p (or -1).
// The order inside an expert does not matter: every row's FFN result depends on that row only.
__global__ void __launch_bounds__(1024) recv_permute_kernel(const int* __restrict__ topk_idx,
                                                            const int* __restrict__ rank_offsets, int ranks, int k,
                                                            int experts, int* offsets, int* perm_src, int* pair_pos) {
  extern __shared__ int cnt[]; // [experts + 1]
  const int total = rank_offsets[ranks];
  const int64_t n = int64_t(total) * k;
  for (int e = threadIdx.x; e <= experts; e += blockDim.x) cnt[e] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int e = topk_idx[i];
    if (e >= 0 && e < experts) atomicAdd(&cnt[e], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int e = 0; e < experts; ++e) {
      const int c = cnt[e];
      offsets[e] = acc;
      cnt[e] = acc; // becomes the cursor
      acc += c;
    }
    offsets[experts] = acc;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int e = topk_idx[i];
    if (e >= 0 && e < experts) {
      const int p = atomicAdd(&cnt[e], 1);
      perm_src[p] = int(i / k);
      pair_pos[i] = p;
    } else {
      pair_pos[i] = -1;
    }
  }
}

// xp[p] = dequant(received row perm_src[p]) for p < offsets[experts].
__global__ void gather_dequant_kernel(const uint8_t* __restrict__ x, const float* __restrict__ scales, int64_t scale_ld,
                                      const int* __restrict__ perm_src, const int* __restrict__ offsets, int experts,
                                      int64_t hidden, float* __restrict__ xp) {
  const int64_t rows = offsets[experts];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t src = perm_src[r];
    for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x)
      xp[r * hidden + c] = dequant(x + src * hidden, scales, scale_ld, src, c);
  }
}

// y[r] = bf16(sum over k in order with pair_pos >= 0 of w[r, k] * yp[pair_pos[r, k]]) for received rows r.
__global__ void recv_reduce_kernel(const float* __restrict__ yp, const int* __restrict__ pair_pos,
                                   const float* __restrict__ w, const int* __restrict__ rank_offsets, int ranks, int k,
                                   int64_t hidden, __nv_bfloat16* __restrict__ y) {
  const int total = rank_offsets[ranks];
  for (int64_t r = blockIdx.x; r < total; r += gridDim.x)
    for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) {
      float acc = 0.0f;
      for (int j = 0; j < k; ++j) {
        const int p = pair_pos[r * k + j];
        if (p >= 0) acc = fmaf(w[r * k + j], yp[int64_t(p) * hidden + c], acc);
      }
      y[r * hidden + c] = __float2bfloat16_rn(acc);
    }
}

// -- low-latency mode: the masked layout, compacted for the fp32 grouped FFN ------------------------------------

__global__ void masked_offsets_kernel(const int* __restrict__ masked_m, int experts, int* offsets) {
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    int acc = 0;
    for (int e = 0; e < experts; ++e) {
      offsets[e] = acc;
      acc += masked_m[e];
    }
    offsets[experts] = acc;
  }
}

// Block per masked row (e, m): when m < masked_m[e], xp[offsets[e] + m] = dequant(row).
__global__ void masked_gather_kernel(const uint8_t* __restrict__ x, const float* __restrict__ scales, int64_t scale_ld,
                                     const int* __restrict__ masked_m, const int* __restrict__ offsets, int experts,
                                     int64_t max_m, int64_t hidden, float* __restrict__ xp) {
  for (int64_t row = blockIdx.x; row < int64_t(experts) * max_m; row += gridDim.x) {
    const int e = int(row / max_m);
    const int64_t m = row % max_m;
    if (m >= masked_m[e]) continue;
    float* dst = xp + (offsets[e] + m) * hidden;
    for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) dst[c] = dequant(x + row * hidden, scales, scale_ld, row, c);
  }
}

// y_masked[e, m] = bf16(yp[offsets[e] + m]) for m < masked_m[e].
__global__ void masked_scatter_kernel(const float* __restrict__ yp, const int* __restrict__ masked_m,
                                      const int* __restrict__ offsets, int experts, int64_t max_m, int64_t hidden,
                                      __nv_bfloat16* __restrict__ y) {
  for (int64_t row = blockIdx.x; row < int64_t(experts) * max_m; row += gridDim.x) {
    const int e = int(row / max_m);
    const int64_t m = row % max_m;
    if (m >= masked_m[e]) continue;
    const float* src = yp + (offsets[e] + m) * hidden;
    for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) y[row * hidden + c] = __float2bfloat16_rn(src[c]);
  }
}

// -- fp8 expert weights -----------------------------------------------------------------------------------------

// One block per 128x128 tile of w [n, k] (fp32): scale = max(amax, floor) / 448, q = w / scale (e4m3, saturating),
// scales [ceil(n/128), k/128] row-major (the grouped GEMMs' B scales, DeepSeek's weight_scale_inv).
__global__ void __launch_bounds__(256) quantize_weight_kernel(const float* __restrict__ w, int64_t n, int64_t k,
                                                              uint8_t* __restrict__ q, float* __restrict__ scales) {
  const int64_t nb = blockIdx.y, kb = blockIdx.x;
  const int64_t r0 = nb * fp8_block, c0 = kb * fp8_block;
  float amax = 0.0f;
  for (int i = threadIdx.x; i < fp8_block * fp8_block; i += blockDim.x) {
    const int64_t r = r0 + i / fp8_block, c = c0 + i % fp8_block;
    if (r < n) amax = fmaxf(amax, fabsf(w[r * k + c]));
  }
  __shared__ float red[8];
  amax = warp_max(amax);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = amax;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < blockDim.x / 32 ? red[threadIdx.x] : 0.0f;
    v = warp_max(v);
    if (threadIdx.x == 0) red[0] = fmaxf(v, petrel::cuda::fp8_amax_floor);
  }
  __syncthreads();
  const float scale = red[0] / petrel::cuda::fp8_e4m3_max;
  for (int i = threadIdx.x; i < fp8_block * fp8_block; i += blockDim.x) {
    const int64_t r = r0 + i / fp8_block, c = c0 + i % fp8_block;
    if (r < n) q[r * k + c] = __nv_cvt_float_to_fp8(__fdiv_rn(w[r * k + c], scale), __NV_SATFINITE, __NV_E4M3);
  }
  if (threadIdx.x == 0) scales[nb * (k / fp8_block) + kb] = scale;
}

// -- tracing ----------------------------------------------------------------------------------------------

// PETREL_EP_TRACE=1 prints one line per stage boundary of every rank's plane to stderr (a node's log in a
// cluster): which host call a rank last entered and left. When a group hangs until its bounded wait, the last
// line of each rank says where its host thread is held.
bool trace_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("PETREL_EP_TRACE");
    return v && *v && *v != '0';
  }();
  return on;
}

void trace(int rank, int mb, int layer, const char* what) {
  if (!trace_enabled()) return;
  static const auto t0 = std::chrono::steady_clock::now();
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "ep-plane %10.3f ms rank %d mb %d layer %d: %s\n", ms, rank, mb, layer, what);
}

// -- the plane ----------------------------------------------------------------------------------------------

// The rows move through ep_buffer (one per micro-batch, cuda_ipc) or through one nccl_rows shared by the micro-batches
// (nccl: normal-mode layout in both modes). Everything else (conversions, experts, hand-offs) is the same.
class gpu_plane final : public device_plane {
public:
  gpu_plane(kernels::cuda_backend& be, const device_plane_config& cfg) : be_(be), cfg_(cfg) {
    local_ = cfg.slots / cfg.ranks;
    stream_ = static_cast<cudaStream_t>(be.compute_stream());
    if (cfg.kind == device_exchange_kind::nccl) {
      petrel::cuda::nccl_rows_config nc;
      nc.rank = cfg.rank;
      nc.ranks = cfg.ranks;
      nc.hidden = int(cfg.hidden);
      nc.experts = cfg.slots;
      nc.topk = cfg.top_k;
      nc.micro_batches = cfg.micro_batches;
      nc.timeout_s = cfg.timeout_s;
      nc.device = be.device();
      nccl_ = std::make_unique<petrel::cuda::nccl_rows>(nc);
    }
    for (int mb = 0; mb < cfg.micro_batches; ++mb) {
      slot_[mb].index = mb;
      for (cudaEvent_t* ev : {&slot_[mb].ev_in, &slot_[mb].ev_recv, &slot_[mb].ev_y, &slot_[mb].ev_out})
        check_cuda(cudaEventCreateWithFlags(ev, cudaEventDisableTiming), "cudaEventCreate");
      if (nccl_) continue;
      petrel::cuda::ep_buffer_config bc;
      bc.rank = cfg.rank;
      bc.ranks = cfg.ranks;
      bc.hidden = int(cfg.hidden);
      bc.experts = cfg.slots;
      bc.topk = cfg.top_k;
      bc.max_tokens = cfg.max_tokens;
      bc.ll_max_tokens = std::max(1, cfg.ll_max_tokens);
      bc.normal = true;
      bc.low_latency = cfg.ll_max_tokens > 0;
      bc.timeout_s = cfg.timeout_s;
      bc.device = be.device();
      slot_[mb].buf = std::make_unique<petrel::cuda::ep_buffer>(bc);
    }
  }

  ~gpu_plane() override {
    cudaStreamSynchronize(stream_);
    nccl_.reset(); // waits for its stream (bounded by its watchdog)
    for (auto& s : slot_) {
      if (s.buf) cudaStreamSynchronize(s.buf->stream());
      for (cudaEvent_t ev : {s.ev_in, s.ev_recv, s.ev_y, s.ev_out})
        if (ev) cudaEventDestroy(ev);
    }
  }

  std::vector<uint8_t> export_handle() const override {
    std::vector<uint8_t> out;
    if (nccl_) return out; // the communicator comes from rank 0's id (cfg.bootstrap)
    for (int mb = 0; mb < cfg_.micro_batches; ++mb) {
      const std::vector<uint8_t> h = slot_[mb].buf->export_handle();
      const uint32_t n = uint32_t(h.size());
      const size_t at = out.size();
      out.resize(at + 4 + h.size());
      std::memcpy(out.data() + at, &n, 4);
      std::memcpy(out.data() + at + 4, h.data(), h.size());
    }
    return out;
  }

  void open_peers(const std::vector<std::vector<uint8_t>>& handles) override {
    if (int(handles.size()) != cfg_.ranks)
      throw std::runtime_error("GPU expert exchange: " + std::to_string(handles.size()) + " handles for " +
                               std::to_string(cfg_.ranks) + " ranks");
    if (nccl_) {
      if (cfg_.bootstrap.empty())
        throw std::runtime_error("NCCL expert exchange: no NCCL unique id from rank 0 (device_plane_config::bootstrap)");
      trace(cfg_.rank, -1, -1, "ncclCommInitRank");
      try {
        nccl_->connect(cfg_.bootstrap);
      } catch (const std::runtime_error& e) {
        throw std::runtime_error(std::string("NCCL expert exchange: ") + e.what() +
                                 " (NCCL needs a GPU of its own for every rank of the group)");
      }
      return;
    }
    for (int mb = 0; mb < cfg_.micro_batches; ++mb) {
      std::vector<std::vector<uint8_t>> part(handles.size());
      for (size_t r = 0; r < handles.size(); ++r) {
        const std::vector<uint8_t>& h = handles[r];
        size_t at = 0;
        for (int j = 0; j <= mb; ++j) {
          uint32_t n = 0;
          if (at + 4 > h.size()) throw std::runtime_error("GPU expert exchange: rank " + std::to_string(r) +
                                                          " sent a short handle (micro-batch buffers differ?)");
          std::memcpy(&n, h.data() + at, 4);
          if (at + 4 + n > h.size()) throw std::runtime_error("GPU expert exchange: rank " + std::to_string(r) +
                                                              " sent a truncated handle");
          if (j == mb) part[r].assign(h.begin() + long(at + 4), h.begin() + long(at + 4 + n));
          at += 4 + n;
        }
      }
      check_status(slot_[mb].buf->open_peers(part));
    }
  }

  void set_experts(int moe_layer, const std::vector<const float*>& gate_up,
                   const std::vector<const float*>& down) override {
    trace(cfg_.rank, -1, moe_layer, "set_experts");
    if (int(gate_up.size()) != local_ || int(down.size()) != local_)
      throw std::invalid_argument("GPU expert exchange: layer " + std::to_string(moe_layer) + " has " +
                                  std::to_string(gate_up.size()) + " experts, the plane expects " + std::to_string(local_));
    if (moe_layer < 0) throw std::invalid_argument("GPU expert exchange: bad MoE layer");
    if (size_t(moe_layer) >= layers_.size()) layers_.resize(size_t(moe_layer) + 1);
    layer_experts& L = layers_[size_t(moe_layer)];
    const int64_t H = cfg_.hidden, I = cfg_.inter, E = local_;
    if (!cfg_.fp8_experts) {
      std::vector<const float*> ptrs(gate_up);
      ptrs.insert(ptrs.end(), down.begin(), down.end());
      ensure(L.ptrs, sizeof(float*) * ptrs.size());
      be_.copy_to_device(L.ptrs.data(), ptrs.data(), sizeof(float*) * ptrs.size());
      return;
    }
    const int64_t s1 = ((2 * I + fp8_block - 1) / fp8_block) * (H / fp8_block);
    const int64_t s2 = ((H + fp8_block - 1) / fp8_block) * (I / fp8_block);
    ensure(L.w1, size_t(E * 2 * I * H));
    ensure(L.s1, sizeof(float) * size_t(E * s1));
    ensure(L.w2, size_t(E * H * I));
    ensure(L.s2, sizeof(float) * size_t(E * s2));
    for (int64_t e = 0; e < E; ++e) {
      quantize_weight_kernel<<<dim3(unsigned(H / fp8_block), unsigned((2 * I + fp8_block - 1) / fp8_block)), 256, 0,
                               stream_>>>(gate_up[size_t(e)], 2 * I, H,
                                          static_cast<uint8_t*>(L.w1.data()) + e * 2 * I * H, L.s1.f32() + e * s1);
      quantize_weight_kernel<<<dim3(unsigned(I / fp8_block), unsigned((H + fp8_block - 1) / fp8_block)), 256, 0,
                               stream_>>>(down[size_t(e)], H, I,
                                          static_cast<uint8_t*>(L.w2.data()) + e * H * I, L.s2.f32() + e * s2);
    }
    check_launch("fp8 expert weights");
    trace(cfg_.rank, -1, moe_layer, "set_experts done");
  }

  void dispatch(int mb, bool low_latency, const mat_view& hidden, const int32_t* slots_dev, const float* weights_dev,
                int64_t tokens) override {
    slot& s = at(mb);
    const int64_t H = cfg_.hidden;
    trace(cfg_.rank, mb, -1, low_latency ? "dispatch (low latency)" : "dispatch (normal)");
    s.tokens = tokens;
    low_latency = low_latency && !nccl_; // NCCL moves the normal-mode layout in both modes
    s.low_latency = low_latency;
    s.slots_dev = slots_dev;
    s.weights_dev = weights_dev;
    const int limit = nccl_ ? std::numeric_limits<int>::max() : low_latency ? cfg_.ll_max_tokens : cfg_.max_tokens;
    if (tokens > 0 && !low_latency && (hidden.ld % 4 != 0 || reinterpret_cast<uintptr_t>(hidden.data) % 16 != 0))
      throw std::invalid_argument("GPU expert exchange: hidden rows must be 16-byte aligned (ld " +
                                  std::to_string(hidden.ld) + ")");
    if (tokens > limit)
      throw std::invalid_argument("GPU expert exchange: " + std::to_string(tokens) + " tokens in one micro-batch, the " +
                                  (low_latency ? "low-latency" : "normal") + " buffers hold " + std::to_string(limit));
    if (low_latency) {
      ensure(s.x_bf16, sizeof(__nv_bfloat16) * size_t(std::max<int64_t>(tokens, 1) * H));
      if (tokens > 0) {
        f32_to_bf16_kernel<<<grid_for(tokens * H, 256), 256, 0, stream_>>>(hidden.data, hidden.ld, tokens, H,
                                                                          static_cast<__nv_bfloat16*>(s.x_bf16.data()));
        check_launch("bf16 cast");
      }
      handoff(s.ev_in, stream_, s.buf->stream());
      check_status(s.buf->ll_dispatch_send(s.x_bf16.data(), slots_dev, int(tokens)));
    } else {
      const int64_t sld = fp8_scale_ld(std::max<int64_t>(tokens, 1));
      ensure(s.x_fp8, size_t(std::max<int64_t>(tokens, 1) * H));
      ensure(s.x_scales, sizeof(float) * size_t((H / fp8_block) * sld));
      if (tokens > 0) {
        quantize_f32_kernel<<<grid_for(tokens * (H / fp8_block), 8), 256, 0, stream_>>>(
            hidden.data, hidden.ld, tokens, H, fp8_scale_ld(tokens), static_cast<uint8_t*>(s.x_fp8.data()),
            s.x_scales.f32());
        check_launch("fp8 quantisation");
      }
      handoff(s.ev_in, stream_, ep_stream(s));
      if (nccl_)
        nccl_->dispatch(mb, s.x_fp8.data(), s.x_scales.f32(), slots_dev, weights_dev, int(tokens));
      else
        check_status(s.buf->dispatch(s.x_fp8.data(), s.x_scales.f32(), slots_dev, weights_dev, int(tokens)));
      handoff(s.ev_recv, ep_stream(s), stream_);
    }
    trace(cfg_.rank, mb, -1, "dispatch enqueued");
  }

  void compute(int mb, int moe_layer, int64_t group_tokens) override {
    slot& s = at(mb);
    const int64_t H = cfg_.hidden, K = cfg_.top_k, I = cfg_.inter;
    const int E = local_;
    if (moe_layer < 0 || size_t(moe_layer) >= layers_.size())
      throw std::logic_error("GPU expert exchange: no experts were set for MoE layer " + std::to_string(moe_layer));
    const layer_experts& L = layers_[size_t(moe_layer)];
    trace(cfg_.rank, mb, moe_layer, cfg_.fp8_experts ? "compute (fp8 experts)" : "compute (fp32 experts)");
    struct leave {
      int rank, mb, layer;
      ~leave() { trace(rank, mb, layer, "compute enqueued"); }
    } on_leave{cfg_.rank, mb, moe_layer};
    const float* const* gate_up = cfg_.fp8_experts ? nullptr : static_cast<const float* const*>(L.ptrs.data());
    const float* const* down = gate_up ? gate_up + E : nullptr;
    if (s.low_latency) {
      check_status(s.buf->ll_dispatch_recv()); // the receive hook: waits on the ep stream only
      handoff(s.ev_recv, s.buf->stream(), stream_);
      const petrel::cuda::ep_ll_recv r = s.buf->ll_recv();
      const int64_t masked_rows = int64_t(E) * r.max_m;
      if (cfg_.fp8_experts) {
        // The masked layout as it arrived feeds the masked grouped GEMMs (rows past a count are neither read nor
        // written), and the second GEMM writes the bf16 rows the combine sends back.
        ensure(s.gu_bf16, sizeof(__nv_bfloat16) * size_t(masked_rows * 2 * I));
        ensure(s.act_fp8, size_t(masked_rows * I));
        ensure(s.act_scales, sizeof(float) * size_t((I / fp8_block) * fp8_scale_ld(masked_rows)));
        ensure(s.y_bf16, sizeof(__nv_bfloat16) * size_t(std::max<int64_t>(masked_rows, 1) * H));
        check_status(petrel::cuda::m_grouped_fp8_gemm_nt_masked(r.x_fp8, r.scales, E, r.max_m, r.masked_m,
                                                                L.w1.data(), L.s1.f32(), 2 * I, H, s.gu_bf16.data(),
                                                                stream_));
        check_status(petrel::cuda::swiglu_bf16(s.gu_bf16.data(), masked_rows, int(I), nullptr, s.act_fp8.data(),
                                               s.act_scales.f32(), nullptr, r.masked_m, r.max_m, stream_));
        check_status(petrel::cuda::m_grouped_fp8_gemm_nt_masked(s.act_fp8.data(), s.act_scales.f32(), E, r.max_m,
                                                                r.masked_m, L.w2.data(), L.s2.f32(), H, I,
                                                                s.y_bf16.data(), stream_));
        send_back(s);
        return;
      }
      const int64_t bound = std::min<int64_t>(masked_rows, group_tokens * std::min<int64_t>(K, E));
      size_scratch(s, bound);
      ensure(s.offsets, sizeof(int) * size_t(E + 1));
      ensure(s.y_bf16, sizeof(__nv_bfloat16) * size_t(std::max<int64_t>(masked_rows, 1) * H));
      masked_offsets_kernel<<<1, 32, 0, stream_>>>(r.masked_m, E, s.offsets.i32());
      check_launch("masked offsets");
      const int64_t sld = fp8_scale_ld(masked_rows);
      if (bound > 0) {
        masked_gather_kernel<<<grid_for(masked_rows, 1, 65535), 256, 0, stream_>>>(
            static_cast<const uint8_t*>(r.x_fp8), r.scales, sld, r.masked_m, s.offsets.i32(), E, r.max_m, H,
            s.xp.f32());
        check_launch("masked gather");
        ffn(s, gate_up, down, bound);
        masked_scatter_kernel<<<grid_for(masked_rows, 1, 65535), 256, 0, stream_>>>(
            s.yp.f32(), r.masked_m, s.offsets.i32(), E, r.max_m, H, static_cast<__nv_bfloat16*>(s.y_bf16.data()));
        check_launch("masked scatter");
      }
      send_back(s);
      return;
    }
    const petrel::cuda::ep_normal_recv r = nccl_ ? nccl_->recv(mb) : s.buf->recv();
    const int64_t rows = std::min<int64_t>(r.capacity, group_tokens);
    const int64_t bound = rows * std::min<int64_t>(K, E);
    if (cfg_.fp8_experts) {
      // The received fp8 rows go into the contiguous layout (every expert's rows from a multiple of 128), through
      // the two grouped GEMMs, and every received row's local experts are summed with its routing weights.
      const int64_t m_cap = std::max<int64_t>(petrel::cuda::moe_contiguous_capacity(bound, E), fp8_block);
      ensure(s.a_fp8, size_t(m_cap * H));
      ensure(s.a_scales, sizeof(float) * size_t((H / fp8_block) * fp8_scale_ld(m_cap)));
      ensure(s.m_indices, sizeof(int) * size_t(m_cap));
      ensure(s.pair_pos, sizeof(int) * size_t(std::max<int64_t>(r.capacity * K, 1)));
      ensure(s.workspace, sizeof(int) * size_t(petrel::cuda::moe_permute_workspace_ints(E)));
      ensure(s.gu_bf16, sizeof(__nv_bfloat16) * size_t(m_cap * 2 * I));
      ensure(s.act_fp8, size_t(m_cap * I));
      ensure(s.act_scales, sizeof(float) * size_t((I / fp8_block) * fp8_scale_ld(m_cap)));
      ensure(s.yp, sizeof(__nv_bfloat16) * size_t(m_cap * H));
      ensure(s.y_bf16, sizeof(__nv_bfloat16) * size_t(std::max<int64_t>(rows, 1) * H));
      // All `capacity` rows are scanned (rows past this round's total carry no local expert), so the scales'
      // leading dimension is the receive buffer's.
      check_status(petrel::cuda::moe_permute_contiguous(r.x_fp8, r.scales, r.capacity, int(H), r.topk_idx, int(K), E,
                                                        m_cap, s.a_fp8.data(), s.a_scales.f32(), s.m_indices.i32(),
                                                        s.pair_pos.i32(), s.workspace.i32(), stream_));
      check_status(petrel::cuda::m_grouped_fp8_gemm_nt_contiguous(s.a_fp8.data(), s.a_scales.f32(), m_cap,
                                                                  s.m_indices.i32(), L.w1.data(), L.s1.f32(), E,
                                                                  2 * I, H, s.gu_bf16.data(), stream_));
      check_status(petrel::cuda::swiglu_bf16(s.gu_bf16.data(), m_cap, int(I), nullptr, s.act_fp8.data(),
                                             s.act_scales.f32(), s.m_indices.i32(), nullptr, 0, stream_));
      check_status(petrel::cuda::m_grouped_fp8_gemm_nt_contiguous(s.act_fp8.data(), s.act_scales.f32(), m_cap,
                                                                  s.m_indices.i32(), L.w2.data(), L.s2.f32(), E, H,
                                                                  I, s.yp.data(), stream_));
      if (rows > 0)
        check_status(petrel::cuda::moe_combine_bf16(s.yp.data(), s.pair_pos.i32(), r.topk_weights, rows, int(K),
                                                    int(H), nullptr, s.y_bf16.data(), stream_));
      send_back(s);
      return;
    }
    size_scratch(s, bound);
    ensure(s.offsets, sizeof(int) * size_t(E + 1));
    ensure(s.perm_src, sizeof(int) * size_t(std::max<int64_t>(r.capacity * K, 1)));
    ensure(s.pair_pos, sizeof(int) * size_t(std::max<int64_t>(r.capacity * K, 1)));
    ensure(s.y_bf16, sizeof(__nv_bfloat16) * size_t(std::max<int64_t>(rows, 1) * H));
    recv_permute_kernel<<<1, 1024, sizeof(int) * size_t(E + 1), stream_>>>(
        r.topk_idx, r.rank_offsets, cfg_.ranks, int(K), E, s.offsets.i32(), s.perm_src.i32(), s.pair_pos.i32());
    check_launch("receive permutation");
    if (bound > 0) {
      gather_dequant_kernel<<<grid_for(bound, 1, 65535), 256, 0, stream_>>>(
          static_cast<const uint8_t*>(r.x_fp8), r.scales, fp8_scale_ld(r.capacity), s.perm_src.i32(), s.offsets.i32(),
          E, H, s.xp.f32());
      check_launch("gather");
      ffn(s, gate_up, down, bound);
      recv_reduce_kernel<<<grid_for(rows, 1, 65535), 256, 0, stream_>>>(
          s.yp.f32(), s.pair_pos.i32(), r.topk_weights, r.rank_offsets, cfg_.ranks, int(K), H,
          static_cast<__nv_bfloat16*>(s.y_bf16.data()));
      check_launch("weighted reduce");
    }
    send_back(s);
  }

  void combine(int mb, const mat_view& out) override {
    slot& s = at(mb);
    trace(cfg_.rank, mb, -1, "combine");
    const int64_t H = cfg_.hidden, T = s.tokens;
    if (s.low_latency) {
      check_status(s.buf->ll_combine_recv(s.slots_dev, s.weights_dev, int(T), s.out.data()));
      handoff(s.ev_out, s.buf->stream(), stream_);
      if (T > 0) {
        bf16_to_f32_kernel<<<grid_for(T * H, 256), 256, 0, stream_>>>(static_cast<const __nv_bfloat16*>(s.out.data()),
                                                                     T, H, out.data, out.ld);
        check_launch("fp32 cast");
      }
      return;
    }
    // ev_out was recorded after the normal combine in compute(); the compute stream already waits on it.
    if (T > 0) be_.copy_mat(mat_view(s.out.f32(), T, H), out);
  }

  void check() override {
    trace(cfg_.rank, -1, -1, "step synchronised, check");
    if (nccl_) {
      const std::string e = nccl_->error();
      if (!e.empty()) throw std::runtime_error("NCCL expert exchange: " + e);
      return;
    }
    for (int mb = 0; mb < cfg_.micro_batches; ++mb) {
      const std::string e = slot_[mb].buf->error();
      if (!e.empty()) throw std::runtime_error("GPU expert exchange (micro-batch " + std::to_string(mb) + "): " + e);
    }
  }

  void abort(const std::string& reason) override {
    if (nccl_) {
      nccl_->abort(reason);
      return;
    }
    for (int mb = 0; mb < cfg_.micro_batches; ++mb) slot_[mb].buf->abort(reason);
  }

  size_t buffer_bytes() const override {
    if (nccl_) return nccl_->buffer_bytes();
    size_t b = 0;
    for (int mb = 0; mb < cfg_.micro_batches; ++mb) b += slot_[mb].buf->buffer_bytes();
    return b;
  }

private:
  struct slot {
    int index = 0;
    std::unique_ptr<petrel::cuda::ep_buffer> buf; // cuda_ipc
    cudaEvent_t ev_in = nullptr, ev_recv = nullptr, ev_y = nullptr, ev_out = nullptr;
    int64_t tokens = 0;
    bool low_latency = false;
    const int32_t* slots_dev = nullptr;
    const float* weights_dev = nullptr;
    device_buffer x_fp8, x_scales, x_bf16, offsets, perm_src, pair_pos, xp, gu, act, yp, y_bf16, out;
    device_buffer a_fp8, a_scales, m_indices, workspace, gu_bf16, act_fp8, act_scales; // fp8 experts
  };
  struct layer_experts {
    device_buffer ptrs;           // fp32 experts: [gate_up x E | down x E] weight pointers
    device_buffer w1, s1, w2, s2; // fp8 experts: [E, 2I, H] and [E, H, I] e4m3 with their 128x128 block scales
  };

  slot& at(int mb) {
    if (mb < 0 || mb >= cfg_.micro_batches)
      throw std::invalid_argument("GPU expert exchange: micro-batch " + std::to_string(mb) + " has no buffer (" +
                                  std::to_string(cfg_.micro_batches) + " configured)");
    return slot_[mb];
  }

  void ensure(device_buffer& b, size_t bytes) { grow_buffer(be_, b, std::max<size_t>(bytes, 256)); }

  void size_scratch(slot& s, int64_t rows) {
    const int64_t r = std::max<int64_t>(rows, 1), H = cfg_.hidden, I = cfg_.inter;
    ensure(s.xp, sizeof(float) * size_t(r * H));
    ensure(s.gu, sizeof(float) * size_t(r * 2 * I));
    ensure(s.act, sizeof(float) * size_t(r * I));
    ensure(s.yp, sizeof(float) * size_t(r * H));
  }

  void ffn(slot& s, const float* const* gate_up, const float* const* down, int64_t bound) {
    const int64_t H = cfg_.hidden, I = cfg_.inter;
    be_.grouped_expert_ffn(s.offsets.i32(), local_, gate_up, down, H, I, bound, mat_view(s.xp.f32(), bound, H),
                           s.gu.f32(), s.act.f32(), mat_view(s.yp.f32(), bound, H));
  }

  // The end of stage 2: s.y_bf16 (one row per received row, or the masked layout) goes back to the tokens' ranks.
  // The combine's output buffer is (re)allocated first, before the hand-off: an allocation zero-fills on the compute
  // stream, which must come before the ep stream writes into it. Normal mode also starts the reduction here, and
  // the compute stream waits for it (ev_out); low latency receives in combine().
  void send_back(slot& s) {
    const size_t out_rows = size_t(std::max<int64_t>(s.tokens, 1)) * size_t(cfg_.hidden);
    if (s.low_latency) {
      ensure(s.out, sizeof(__nv_bfloat16) * out_rows);
      handoff(s.ev_y, stream_, s.buf->stream());
      check_status(s.buf->ll_combine_send(s.y_bf16.data()));
      return;
    }
    ensure(s.out, sizeof(float) * out_rows);
    handoff(s.ev_y, stream_, ep_stream(s));
    if (nccl_)
      nccl_->combine(s.index, s.y_bf16.data(), s.out.f32());
    else
      check_status(s.buf->combine(s.y_bf16.data(), s.out.data(), /*out_fp32=*/true));
    handoff(s.ev_out, ep_stream(s), stream_);
  }

  cudaStream_t ep_stream(const slot& s) const { return nccl_ ? nccl_->stream() : s.buf->stream(); }

  // `to` waits (on the device) for everything enqueued on `from` so far.
  static void handoff(cudaEvent_t ev, cudaStream_t from, cudaStream_t to) {
    check_cuda(cudaEventRecord(ev, from), "cudaEventRecord");
    check_cuda(cudaStreamWaitEvent(to, ev, 0), "cudaStreamWaitEvent");
  }

  kernels::cuda_backend& be_;
  device_plane_config cfg_;
  int local_ = 0;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<petrel::cuda::nccl_rows> nccl_; // nccl only
  slot slot_[2];
  std::vector<layer_experts> layers_; // per MoE layer (set_experts)
};

} // namespace

std::unique_ptr<device_plane> make_device_plane(backend& be, const device_plane_config& cfg) {
  auto* cb = dynamic_cast<kernels::cuda_backend*>(&be);
  if (!cb)
    throw std::invalid_argument("the GPU expert exchange needs the cuda backend (this rank runs '" + be.name() + "')");
  const bool nccl = cfg.kind == device_exchange_kind::nccl;
  const int most = nccl ? 64 : petrel::cuda::ep_max_ranks;
  if (cfg.ranks < 1 || cfg.ranks > most)
    throw std::invalid_argument(std::string("the ") + (nccl ? "NCCL" : "GPU") + " expert exchange takes 1 to " +
                                std::to_string(most) + " ranks" + (nccl ? "" : " on one host") + ", not " +
                                std::to_string(cfg.ranks));
  if (cfg.hidden <= 0 || cfg.hidden % fp8_block != 0)
    throw std::invalid_argument("the GPU expert exchange needs hidden_size divisible by 128 (the model has " +
                                std::to_string(cfg.hidden) + ")");
  if (cfg.slots <= 0 || cfg.slots % cfg.ranks != 0)
    throw std::invalid_argument("the GPU expert exchange needs the expert slots (" + std::to_string(cfg.slots) +
                                ") divisible by the EP size (" + std::to_string(cfg.ranks) +
                                "): add redundant experts or change ep_size");
  if (cfg.top_k < 1 || cfg.top_k > 32) throw std::invalid_argument("the GPU expert exchange takes top_k 1..32");
  if (cfg.fp8_experts && (cfg.inter <= 0 || cfg.inter % fp8_block != 0))
    throw std::invalid_argument("fp8 experts need moe_intermediate_size divisible by 128 (the model has " +
                                std::to_string(cfg.inter) + "); turn them off (fp32 experts)");
  if (cfg.max_tokens < 1) throw std::invalid_argument("the GPU expert exchange needs max_tokens >= 1");
  if (cfg.micro_batches < 1 || cfg.micro_batches > 2) throw std::invalid_argument("micro_batches must be 1 or 2");
  if (nccl && cfg.fp8_experts)
    throw std::invalid_argument("fp8 experts are not offered with the NCCL exchange (it is the baseline of the "
                                "all-to-all; use cuda_ipc)");
  if (nccl && cfg.bootstrap.empty())
    throw std::invalid_argument("the NCCL expert exchange needs rank 0's NCCL unique id (device_plane_config::bootstrap)");
  return std::make_unique<gpu_plane>(*cb, cfg);
}

std::vector<uint8_t> make_device_plane_bootstrap(device_exchange_kind kind) {
  if (kind == device_exchange_kind::cuda_ipc) return {};
  return petrel::cuda::nccl_rows::make_unique_id();
}

} // namespace petrel::ep
