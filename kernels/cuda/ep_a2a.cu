// Intranode expert all-to-all (see ep_a2a.hpp; design in docs/gpu-expert-exchange.md).
//
// Every kernel here is memory-bound: the send kernels read a row once and store it to each destination's
// buffer (NVLink stores between GPUs, HBM stores when ranks share a GPU), the reduce kernels read every
// returned row once. Waits run in one-block kernels of their own, so that a spinning rank never holds the SMs
// that the peer it waits for needs (ranks that share one GPU run side by side).
#include "kernels/cuda/ep_a2a.hpp"

#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels/cuda/fp8_warp_quant.cuh"

namespace petrel::cuda {
namespace {

// -- constants ----------------------------------------------------------------------------------

constexpr int send_threads = 256;           // 8 warps per block in every send kernel
constexpr int normal_send_blocks = 128;     // fixed grids: receivers count one signal per sender block
constexpr int ll_send_blocks = 128;
constexpr int combine_send_blocks = 128;
constexpr std::uint32_t handle_magic = 0x50455042; // "PEPB"
constexpr std::uint32_t handle_version = 1;

enum wait_kind : int { wait_counts = 1, wait_dispatch = 2, wait_combine = 3, wait_ll_dispatch = 4,
                       wait_ll_combine = 5, wait_barrier = 6 };

const char* wait_name(int kind) {
  switch (kind) {
  case wait_counts: return "normal dispatch (count exchange)";
  case wait_dispatch: return "normal dispatch (rows)";
  case wait_combine: return "normal combine";
  case wait_ll_dispatch: return "low-latency dispatch receive";
  case wait_ll_combine: return "low-latency combine receive";
  case wait_barrier: return "barrier";
  default: return "wait";
  }
}

std::size_t align_up(std::size_t v, std::size_t a = 256) { return (v + a - 1) / a * a; }

// Byte offsets of every region, the same on every rank (derived from the config only).
struct region_layout {
  // shared (peer-visible)
  std::size_t count_matrix = 0; // int [2][8][8]: [parity][src][dst] counts, all-gathered
  std::size_t count_flag = 0;   // u64 [2][8]: [parity][src] = sequence of the row there
  std::size_t dispatch_arrive = 0, combine_arrive = 0, barrier_arrive = 0; // u64 [8] per source, monotonic
  std::size_t ll_done = 0, ll_combine_done = 0; // u64 [2][8] per buffer and source, monotonic
  std::size_t ll_slot = 0;      // int [2][L] per buffer: next free row of each local expert
  std::size_t n_x = 0, n_scales = 0, n_topk = 0, n_weights = 0, n_src = 0, n_combine = 0;
  std::size_t ll_x[2] = {0, 0}, ll_scales[2] = {0, 0}, ll_src[2] = {0, 0}, ll_combine[2] = {0, 0};
  std::size_t shared_bytes = 0;
  // local (private)
  std::size_t token_pos = 0;    // int [8][max_tokens]: position of token t in rank d's list, -1 = not sent
  std::size_t send_count = 0, send_base = 0, recv_offsets = 0; // int [8], [8], [9]
  std::size_t ll_masked_m = 0;  // int [2][L]
  std::size_t ll_round = 0, ll_combine_round = 0; // u64 [2]
  std::size_t local_bytes = 0;
  // sizes
  std::int64_t n_capacity = 0, n_scale_ld = 0, ll_max_m = 0, ll_rows = 0, ll_scale_ld = 0;
};

region_layout make_layout(const ep_buffer_config& c) {
  region_layout l;
  const int L = c.experts / c.ranks;
  const std::size_t H = c.hidden, K = c.topk;
  std::size_t o = 0;
  auto take = [&](std::size_t bytes) { const std::size_t at = o; o = align_up(o + bytes); return at; };
  l.count_matrix = take(2 * 8 * 8 * sizeof(int));
  l.count_flag = take(2 * 8 * 8);
  l.dispatch_arrive = take(8 * 8);
  l.combine_arrive = take(8 * 8);
  l.barrier_arrive = take(8 * 8);
  l.ll_done = take(2 * 8 * 8);
  l.ll_combine_done = take(2 * 8 * 8);
  l.ll_slot = take(2 * std::size_t(L) * sizeof(int));
  if (c.normal) {
    l.n_capacity = std::int64_t(c.ranks) * c.max_tokens;
    l.n_scale_ld = fp8_scale_ld(l.n_capacity);
    l.n_x = take(l.n_capacity * H);
    l.n_scales = take((H / fp8_block) * l.n_scale_ld * sizeof(float));
    l.n_topk = take(l.n_capacity * K * sizeof(int));
    l.n_weights = take(l.n_capacity * K * sizeof(float));
    l.n_src = take(l.n_capacity * sizeof(int));
    l.n_combine = take(std::size_t(c.ranks) * c.max_tokens * H * 2);
  }
  if (c.low_latency) {
    l.ll_max_m = std::int64_t(c.ranks) * c.ll_max_tokens;
    l.ll_rows = l.ll_max_m * L;
    l.ll_scale_ld = fp8_scale_ld(l.ll_rows);
    for (int p = 0; p < 2; ++p) {
      l.ll_x[p] = take(l.ll_rows * H);
      l.ll_scales[p] = take((H / fp8_block) * l.ll_scale_ld * sizeof(float));
      l.ll_src[p] = take(l.ll_rows * sizeof(int));
      l.ll_combine[p] = take(std::size_t(c.ll_max_tokens) * K * H * 2);
    }
  }
  l.shared_bytes = o;
  o = 0;
  l.token_pos = take(8 * std::size_t(std::max(c.max_tokens, 1)) * sizeof(int));
  l.send_count = take(8 * sizeof(int));
  l.send_base = take(8 * sizeof(int));
  l.recv_offsets = take(9 * sizeof(int));
  l.ll_masked_m = take(2 * std::size_t(L) * sizeof(int));
  l.ll_round = take(2 * 8);
  l.ll_combine_round = take(2 * 8);
  l.local_bytes = o;
  return l;
}

// Everything a kernel needs, by value.
struct kparams {
  char* peer[ep_max_ranks]; // every rank's shared allocation, mapped here (peer[rank] = own)
  char* local;
  int* error;               // mapped host words
  region_layout l;
  int rank, ranks, hidden, experts, topk, max_tokens, ll_max_tokens, local_experts;
  std::uint64_t timeout_ns;
};

template <typename T>
__device__ __forceinline__ T* at(char* base, std::size_t offset) {
  return reinterpret_cast<T*>(base + offset);
}

// -- device helpers: system-scope signalling ---------------------------------------------------------

__device__ __forceinline__ std::uint64_t load_acquire_sys(const std::uint64_t* p) {
  std::uint64_t v;
  asm volatile("ld.acquire.sys.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void add_release_sys(std::uint64_t* p, std::uint64_t v) {
  asm volatile("red.release.sys.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void store_release_sys(std::uint64_t* p, std::uint64_t v) {
  asm volatile("st.release.sys.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ std::uint64_t global_ns() {
  std::uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Records the first failure (code 1 = timeout) in the mapped words: code, kind, peer, round.
__device__ void report_timeout(int* err, int kind, int peer, std::uint64_t round) {
  if (atomicCAS_system(err, 0, -1) == 0) {
    err[1] = kind;
    err[2] = peer;
    err[3] = int(round);
    __threadfence_system();
    atomicExch_system(err, 1);
  }
}

// Bounded spin until *p >= target. False on timeout (recorded) or when an earlier wait already failed.
__device__ bool wait_at_least(const std::uint64_t* p, std::uint64_t target, const kparams& k, int kind, int peer,
                              std::uint64_t round) {
  if (*reinterpret_cast<volatile int*>(k.error) != 0) return false;
  const std::uint64_t start = global_ns();
  std::uint32_t spins = 0;
  while (load_acquire_sys(p) < target) {
    if ((++spins & 1023) == 0) {
      if (*reinterpret_cast<volatile int*>(k.error) != 0) return false; // aborted by the host, or a peer wait failed
      if (global_ns() - start > k.timeout_ns) {
        report_timeout(k.error, kind, peer, round);
        return false;
      }
    }
  }
  return true;
}

// Every sender block ends like this: its stores become visible system-wide, then one counter per
// destination rank grows by one (the receivers know the grid size, so they know what to wait for).
__device__ __forceinline__ void signal_block_done(const kparams& k, std::size_t counters) {
  __threadfence_system();
  __syncthreads();
  if (int(threadIdx.x) < k.ranks) add_release_sys(at<std::uint64_t>(k.peer[threadIdx.x], counters) + k.rank, 1);
}

// -- the generic wait kernel ---------------------------------------------------------------------------

// One block: thread s waits until counter[s] of this rank's buffer reaches target. With a device-side
// round (low latency: graph replays must advance it), target = (round[parity] + 1) * per_round and the round
// is bumped once everything arrived.
__global__ void wait_kernel(kparams k, int kind, std::size_t counters, std::uint64_t target, int device_round,
                            std::size_t round_offset, std::uint64_t per_round) {
  std::uint64_t* round = device_round ? at<std::uint64_t>(k.local, round_offset) : nullptr;
  const std::uint64_t want = round ? (*round + 1) * per_round : target;
  if (int(threadIdx.x) < k.ranks) {
    const std::uint64_t* c = at<std::uint64_t>(k.peer[k.rank], counters) + threadIdx.x;
    wait_at_least(c, want, k, kind, threadIdx.x, want / (per_round ? per_round : 1));
  }
  __syncthreads();
  if (round && threadIdx.x == 0) *round += 1;
}

// -- normal mode ----------------------------------------------------------------------------------------

// Block d: token_pos[d][t] = position of token t among the tokens that go to rank d (in token order), -1 when
// none of its top-k experts lives there; send_count[d] = how many.
__global__ void __launch_bounds__(1024) normal_layout_kernel(kparams k, const int* __restrict__ topk_idx, int tokens) {
  using scan = cub::BlockScan<int, 1024>;
  __shared__ typename scan::TempStorage tmp;
  __shared__ int base;
  const int d = blockIdx.x;
  const int per_rank = k.experts / k.ranks;
  int* pos = at<int>(k.local, k.l.token_pos) + std::size_t(d) * k.max_tokens;
  if (threadIdx.x == 0) base = 0;
  __syncthreads();
  for (int t0 = 0; t0 < tokens; t0 += 1024) {
    const int t = t0 + threadIdx.x;
    int hit = 0;
    if (t < tokens)
      for (int j = 0; j < k.topk; ++j) {
        const int e = topk_idx[std::size_t(t) * k.topk + j];
        if (e >= 0 && e < k.experts && e / per_rank == d) hit = 1;
      }
    int excl = 0, total = 0;
    scan(tmp).ExclusiveSum(hit, excl, total);
    if (t < tokens) pos[t] = hit ? base + excl : -1;
    __syncthreads();
    if (threadIdx.x == 0) base += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) at<int>(k.local, k.l.send_count)[d] = base;
}

// One block. All-gathers the count rows: writes this rank's row into slot [parity][rank] of every peer, then
// waits for every peer's row of this sequence, then derives where this rank's rows start in each receiver
// (send_base) and where each source's rows start here (recv_offsets). Also a full barrier: no rank writes
// rows of this round before every rank arrived here, i.e. finished reading the previous round's rows.
__global__ void normal_notify_kernel(kparams k, std::uint64_t seq) {
  const int parity = int(seq & 1);
  const int* my_count = at<int>(k.local, k.l.send_count);
  const int t = threadIdx.x;
  if (t < k.ranks) {
    int* row = at<int>(k.peer[t], k.l.count_matrix) + (parity * 8 + k.rank) * 8;
    for (int j = 0; j < k.ranks; ++j) row[j] = my_count[j];
    __threadfence_system();
    store_release_sys(at<std::uint64_t>(k.peer[t], k.l.count_flag) + parity * 8 + k.rank, seq);
  }
  __shared__ bool ok_all;
  if (t == 0) ok_all = true;
  __syncthreads();
  if (t < k.ranks) {
    const std::uint64_t* flag = at<std::uint64_t>(k.peer[k.rank], k.l.count_flag) + parity * 8 + t;
    if (!wait_at_least(flag, seq, k, wait_counts, t, seq)) ok_all = false;
  }
  __syncthreads();
  if (t == 0) {
    const volatile int* m = at<int>(k.peer[k.rank], k.l.count_matrix) + parity * 64;
    int* recv_offsets = at<int>(k.local, k.l.recv_offsets);
    int* send_base = at<int>(k.local, k.l.send_base);
    int acc = 0;
    for (int s = 0; s < k.ranks; ++s) {
      recv_offsets[s] = acc;
      acc += ok_all ? m[s * 8 + k.rank] : 0;
    }
    recv_offsets[k.ranks] = acc;
    for (int d = 0; d < k.ranks; ++d) {
      int b = 0;
      for (int s = 0; s < k.rank; ++s) b += ok_all ? m[s * 8 + d] : 0;
      send_base[d] = b;
    }
  }
}

// Rows past this round's total get topk_idx -1, so consumers may scan the whole capacity.
__global__ void normal_clear_tail_kernel(kparams k) {
  const int total = at<int>(k.local, k.l.recv_offsets)[k.ranks];
  int* topk = at<int>(k.peer[k.rank], k.l.n_topk);
  const std::int64_t n = k.l.n_capacity * k.topk;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x)
    if (i >= std::int64_t(total) * k.topk) topk[i] = -1;
}

// One warp per token: the row is read once and stored to every destination rank that owns one of its experts,
// with its scales, its top-k ids made local to that rank, its weights and its token index.
__global__ void __launch_bounds__(send_threads) normal_dispatch_send_kernel(kparams k, const int4* __restrict__ x,
                                                                            const float* __restrict__ x_scales,
                                                                            const int* __restrict__ topk_idx,
                                                                            const float* __restrict__ topk_w,
                                                                            int tokens) {
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (send_threads / 32);
  const int per_rank = k.experts / k.ranks;
  const int nvec = k.hidden / 16;
  const int kblocks = k.hidden / fp8_block;
  const std::int64_t src_ld = fp8_scale_ld(tokens);
  const int* token_pos = at<int>(k.local, k.l.token_pos);
  const int* send_base = at<int>(k.local, k.l.send_base);
  for (int t = blockIdx.x * (send_threads / 32) + (threadIdx.x >> 5); t < tokens; t += warps) {
    int4* dst[ep_max_ranks];
    int row[ep_max_ranks];
#pragma unroll
    for (int d = 0; d < ep_max_ranks; ++d) {
      dst[d] = nullptr;
      row[d] = -1;
      if (d < k.ranks) {
        const int p = token_pos[std::size_t(d) * k.max_tokens + t];
        if (p >= 0) {
          row[d] = send_base[d] + p;
          dst[d] = at<int4>(k.peer[d], k.l.n_x) + std::size_t(row[d]) * nvec;
        }
      }
    }
    const int4* src = x + std::size_t(t) * nvec;
    for (int c = lane; c < nvec; c += 32) {
      const int4 v = __ldg(src + c);
#pragma unroll
      for (int d = 0; d < ep_max_ranks; ++d)
        if (dst[d]) dst[d][c] = v;
    }
#pragma unroll
    for (int d = 0; d < ep_max_ranks; ++d) {
      if (row[d] < 0) continue;
      char* base = k.peer[d];
      float* sc = at<float>(base, k.l.n_scales);
      for (int b = lane; b < kblocks; b += 32) sc[std::size_t(b) * k.l.n_scale_ld + row[d]] = x_scales[std::size_t(b) * src_ld + t];
      if (lane < k.topk) {
        const int e = topk_idx[std::size_t(t) * k.topk + lane];
        const bool mine = e >= 0 && e < k.experts && e / per_rank == d;
        at<int>(base, k.l.n_topk)[std::size_t(row[d]) * k.topk + lane] = mine ? e % per_rank : -1;
        at<float>(base, k.l.n_weights)[std::size_t(row[d]) * k.topk + lane] = mine ? topk_w[std::size_t(t) * k.topk + lane] : 0.0f;
      }
      if (lane == 0) at<int>(base, k.l.n_src)[row[d]] = t;
    }
  }
  signal_block_done(k, k.l.dispatch_arrive);
}

// One warp per received row: back to its owner, into slot [this rank][token] of the owner's combine buffer.
__global__ void __launch_bounds__(send_threads) normal_combine_send_kernel(kparams k, const int4* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (send_threads / 32);
  const int nvec = k.hidden / 8; // bf16 row: hidden * 2 bytes
  const int* offsets = at<int>(k.local, k.l.recv_offsets);
  const int total = offsets[k.ranks];
  const int* src_token = at<int>(k.peer[k.rank], k.l.n_src);
  for (int i = blockIdx.x * (send_threads / 32) + (threadIdx.x >> 5); i < total; i += warps) {
    int s = 0;
    while (s + 1 < k.ranks && offsets[s + 1] <= i) ++s;
    const int t = src_token[i];
    int4* dst = at<int4>(k.peer[s], k.l.n_combine) + (std::size_t(k.rank) * k.max_tokens + t) * nvec;
    const int4* src = y + std::size_t(i) * nvec;
    for (int c = lane; c < nvec; c += 32) dst[c] = __ldg(src + c);
  }
  signal_block_done(k, k.l.combine_arrive);
}

__device__ __forceinline__ void add_bf16x8(float* acc, const int4& v) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] += f.x;
    acc[2 * i + 1] += f.y;
  }
}
__device__ __forceinline__ void fma_bf16x8(float* acc, float w, const int4& v) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] = fmaf(w, f.x, acc[2 * i]);
    acc[2 * i + 1] = fmaf(w, f.y, acc[2 * i + 1]);
  }
}
__device__ __forceinline__ int4 pack_bf16x8(const float* acc) {
  int4 out;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
  return out;
}

// out[t] = sum over ranks d (ascending) that token t went to of combine[d][t]; one thread per 8 columns.
__global__ void normal_combine_reduce_kernel(kparams k, int tokens, void* out, int out_fp32) {
  const int nvec = k.hidden / 8;
  const std::int64_t n = std::int64_t(tokens) * nvec;
  const int* token_pos = at<int>(k.local, k.l.token_pos);
  const int4* buf = at<int4>(k.peer[k.rank], k.l.n_combine);
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x) {
    const int t = int(i / nvec), c = int(i % nvec);
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int d = 0; d < k.ranks; ++d)
      if (token_pos[std::size_t(d) * k.max_tokens + t] >= 0)
        add_bf16x8(acc, buf[(std::size_t(d) * k.max_tokens + t) * nvec + c]);
    if (out_fp32) {
      float4* o = reinterpret_cast<float4*>(out) + i * 2;
      o[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      o[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
    } else {
      reinterpret_cast<int4*>(out)[i] = pack_bf16x8(acc);
    }
  }
}

// -- low-latency mode ------------------------------------------------------------------------------------

// One block per token (grid-stride): the bf16 row is cast to fp8 1x128 in shared memory (the same arithmetic
// as quantize_bf16_to_fp8_1x128, so the bytes are identical), then one row per (token, k) goes to the expert's
// rank: a system-scope atomic on the receiver's per-expert counter picks the row, so every expert's rows are
// packed from 0 (their order depends on timing; the combine puts every row back in its own slot).
__global__ void __launch_bounds__(send_threads) ll_dispatch_send_kernel(kparams k, const __nv_bfloat16* __restrict__ x,
                                                                        const int* __restrict__ topk_idx, int tokens,
                                                                        int parity) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int kblocks = k.hidden / fp8_block;
  std::uint8_t* q = smem;                                         // [hidden]
  float* qs = reinterpret_cast<float*>(smem + k.hidden);           // [kblocks]
  __shared__ int slot[32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int L = k.local_experts;
  const int nvec = k.hidden / 16;
  for (int t = blockIdx.x; t < tokens; t += gridDim.x) {
    for (int b = warp; b < kblocks; b += send_threads / 32) {
      const std::size_t off = std::size_t(t) * k.hidden + std::size_t(b) * fp8_block + lane * 4;
      const uint2 raw = *reinterpret_cast<const uint2*>(x + off);
      const float2 v01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
      const float2 v23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
      const float scale = quantize_block_1x128(make_float4(v01.x, v01.y, v23.x, v23.y), q + b * fp8_block + lane * 4);
      if (lane == 0) qs[b] = scale;
    }
    // reserve every (token, k) row at once: one atomic per k, in parallel
    if (int(threadIdx.x) < k.topk) {
      const int e = topk_idx[std::size_t(t) * k.topk + threadIdx.x];
      int s = -1;
      if (e >= 0 && e < k.experts) {
        const int d = e / L, el = e % L;
        s = atomicAdd_system(at<int>(k.peer[d], k.l.ll_slot) + parity * L + el, 1);
      }
      slot[threadIdx.x] = s;
    }
    __syncthreads();
    for (int j = 0; j < k.topk; ++j) {
      const int s = slot[j];
      if (s < 0 || s >= k.l.ll_max_m) continue; // s >= max_m cannot happen while tokens <= ll_max_tokens
      const int e = topk_idx[std::size_t(t) * k.topk + j];
      const int d = e / L, el = e % L;
      const std::size_t row = std::size_t(el) * k.l.ll_max_m + s;
      char* base = k.peer[d];
      int4* dst = at<int4>(base, k.l.ll_x[parity]) + row * nvec;
      const int4* src = reinterpret_cast<const int4*>(q);
      for (int c = threadIdx.x; c < nvec; c += send_threads) dst[c] = src[c];
      float* sc = at<float>(base, k.l.ll_scales[parity]);
      for (int b = threadIdx.x; b < kblocks; b += send_threads) sc[std::size_t(b) * k.l.ll_scale_ld + row] = qs[b];
      if (threadIdx.x == 0)
        at<int>(base, k.l.ll_src[parity])[row] = (k.rank * k.ll_max_tokens + t) * k.topk + j;
    }
    __syncthreads(); // q and slot are reused by the next token
  }
  signal_block_done(k, k.l.ll_done + parity * 8 * 8);
}

// One block, after every rank's rows arrived (the wait kernel ran before it on this stream): the per-expert
// counters become masked_m, and are cleared for the round that reuses this buffer.
__global__ void ll_finish_dispatch_kernel(kparams k, int parity) {
  int* slot = at<int>(k.peer[k.rank], k.l.ll_slot) + parity * k.local_experts;
  int* masked = at<int>(k.local, k.l.ll_masked_m) + parity * k.local_experts;
  for (int e = threadIdx.x; e < k.local_experts; e += blockDim.x) {
    const int n = *reinterpret_cast<volatile int*>(slot + e);
    masked[e] = n < k.l.ll_max_m ? n : int(k.l.ll_max_m);
    slot[e] = 0;
  }
}

// One warp per row of the masked layout (rows past masked_m skipped): back to slot [token][k] of its owner.
__global__ void __launch_bounds__(send_threads) ll_combine_send_kernel(kparams k, const int4* __restrict__ y, int parity) {
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (send_threads / 32);
  const int nvec = k.hidden / 8;
  const int* masked = at<int>(k.local, k.l.ll_masked_m) + parity * k.local_experts;
  const int* info = at<int>(k.peer[k.rank], k.l.ll_src[parity]);
  const std::int64_t rows = k.l.ll_rows;
  for (std::int64_t r = blockIdx.x * (send_threads / 32) + (threadIdx.x >> 5); r < rows; r += warps) {
    const int e = int(r / k.l.ll_max_m);
    if (r % k.l.ll_max_m >= masked[e]) continue;
    const int v = info[r];
    const int j = v % k.topk, t = (v / k.topk) % k.ll_max_tokens, s = v / k.topk / k.ll_max_tokens;
    int4* dst = at<int4>(k.peer[s], k.l.ll_combine[parity]) + (std::size_t(t) * k.topk + j) * nvec;
    const int4* src = y + std::size_t(r) * nvec;
    for (int c = lane; c < nvec; c += 32) dst[c] = __ldg(src + c);
  }
  signal_block_done(k, k.l.ll_combine_done + parity * 8 * 8);
}

// out[t] = bf16(sum_k w[t, k] * combine[t][k]) in k order (fp32 fma); one thread per 8 columns.
__global__ void ll_combine_reduce_kernel(kparams k, const int* __restrict__ topk_idx, const float* __restrict__ topk_w,
                                         int tokens, int4* __restrict__ out, int parity) {
  const int nvec = k.hidden / 8;
  const std::int64_t n = std::int64_t(tokens) * nvec;
  const int4* buf = at<int4>(k.peer[k.rank], k.l.ll_combine[parity]);
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x) {
    const int t = int(i / nvec), c = int(i % nvec);
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int j = 0; j < k.topk; ++j) {
      const int e = topk_idx[std::size_t(t) * k.topk + j];
      if (e < 0 || e >= k.experts) continue;
      fma_bf16x8(acc, topk_w[std::size_t(t) * k.topk + j], buf[(std::size_t(t) * k.topk + j) * nvec + c]);
    }
    out[i] = pack_bf16x8(acc);
  }
}

// -- barrier -------------------------------------------------------------------------------------------

__global__ void barrier_kernel(kparams k, std::uint64_t seq) {
  if (int(threadIdx.x) < k.ranks) add_release_sys(at<std::uint64_t>(k.peer[threadIdx.x], k.l.barrier_arrive) + k.rank, 1);
  if (int(threadIdx.x) < k.ranks)
    wait_at_least(at<std::uint64_t>(k.peer[k.rank], k.l.barrier_arrive) + threadIdx.x, seq, k, wait_barrier, threadIdx.x, seq);
}

// -- host side -------------------------------------------------------------------------------------------

std::string cuda_msg(const char* op, cudaError_t e) { return std::string(op) + ": " + cudaGetErrorString(e); }

kernel_status launched(const char* op) {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? kernel_status::success() : kernel_status::failure(cuda_msg(op, e));
}

// The bytes of a handle, written and read field by field.
struct handle_fields {
  std::uint32_t magic = handle_magic, version = handle_version;
  std::int32_t rank = 0, ranks = 0, device = 0;
  std::int64_t pid = 0;
  std::uint64_t ptr = 0, bytes = 0;
  std::int32_t hidden = 0, experts = 0, topk = 0, max_tokens = 0, ll_max_tokens = 0, normal = 0, low_latency = 0;
  char host[64] = {};
  cudaIpcMemHandle_t ipc{};
};

std::string host_name() {
  char h[64] = {};
  gethostname(h, sizeof(h) - 1);
  return h;
}

} // namespace

struct ep_buffer::peer_map {
  char* base[ep_max_ranks] = {};
  bool opened_ipc[ep_max_ranks] = {};
  region_layout layout;
};

ep_buffer::ep_buffer(const ep_buffer_config& cfg) : cfg_(cfg), peers_(std::make_unique<peer_map>()) {
  auto bad = [](const std::string& why) { throw std::invalid_argument("ep_buffer: " + why); };
  if (cfg.ranks < 1 || cfg.ranks > ep_max_ranks) bad("ranks=" + std::to_string(cfg.ranks) + " must be in [1, 8]");
  if (cfg.rank < 0 || cfg.rank >= cfg.ranks) bad("rank=" + std::to_string(cfg.rank) + " outside [0, ranks)");
  if (cfg.hidden <= 0 || cfg.hidden % fp8_block != 0) bad("hidden=" + std::to_string(cfg.hidden) + " must be a positive multiple of 128");
  if (cfg.hidden > 32768) bad("hidden=" + std::to_string(cfg.hidden) + " must be <= 32768");
  if (cfg.experts <= 0 || cfg.experts % cfg.ranks != 0)
    bad("experts=" + std::to_string(cfg.experts) + " must be a positive multiple of ranks=" + std::to_string(cfg.ranks));
  if (cfg.topk < 1 || cfg.topk > 32 || cfg.topk > cfg.experts) bad("topk=" + std::to_string(cfg.topk) + " must be in [1, min(32, experts)]");
  if (!cfg.normal && !cfg.low_latency) bad("neither mode enabled");
  if (cfg.normal && (cfg.max_tokens < 1 || std::int64_t(cfg.max_tokens) * cfg.ranks > (1 << 28)))
    bad("max_tokens=" + std::to_string(cfg.max_tokens) + " out of range");
  if (cfg.low_latency && (cfg.ll_max_tokens < 1 || std::int64_t(cfg.ranks) * cfg.ll_max_tokens * cfg.topk >= (1LL << 31)))
    bad("ll_max_tokens=" + std::to_string(cfg.ll_max_tokens) + " out of range");
  if (!(cfg.timeout_s > 0)) bad("timeout_s must be > 0");
  if (!cfg.normal) cfg_.max_tokens = 0;

  auto check = [](cudaError_t e, const char* op) {
    if (e != cudaSuccess) throw std::runtime_error("ep_buffer: " + cuda_msg(op, e));
  };
  if (cfg.device >= 0) check(cudaSetDevice(cfg.device), "cudaSetDevice");
  check(cudaGetDevice(&device_), "cudaGetDevice");
  peers_->layout = make_layout(cfg_);
  shared_bytes_ = peers_->layout.shared_bytes;
  local_bytes_ = peers_->layout.local_bytes;
  try {
    check(cudaMalloc(reinterpret_cast<void**>(&shared_), shared_bytes_), "cudaMalloc (peer-visible buffer)");
    check(cudaMemset(shared_, 0, shared_bytes_), "cudaMemset");
    check(cudaMalloc(reinterpret_cast<void**>(&local_), local_bytes_), "cudaMalloc (local state)");
    check(cudaMemset(local_, 0, local_bytes_), "cudaMemset");
    check(cudaHostAlloc(reinterpret_cast<void**>(&error_host_), 4 * sizeof(int), cudaHostAllocMapped), "cudaHostAlloc");
    std::memset(error_host_, 0, 4 * sizeof(int));
    check(cudaHostGetDevicePointer(reinterpret_cast<void**>(&error_dev_), error_host_, 0), "cudaHostGetDevicePointer");
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    // Load every kernel now. With lazy loading (CUDA's default) the first launch of a kernel may wait for the
    // whole context to go idle; when ranks are threads of one process, that idle never comes while a peer
    // spins in a receive waiting for this very launch.
    const void* kernels[] = {reinterpret_cast<const void*>(&wait_kernel), reinterpret_cast<const void*>(&normal_layout_kernel),
                             reinterpret_cast<const void*>(&normal_notify_kernel), reinterpret_cast<const void*>(&normal_clear_tail_kernel),
                             reinterpret_cast<const void*>(&normal_dispatch_send_kernel),
                             reinterpret_cast<const void*>(&normal_combine_send_kernel),
                             reinterpret_cast<const void*>(&normal_combine_reduce_kernel),
                             reinterpret_cast<const void*>(&ll_dispatch_send_kernel),
                             reinterpret_cast<const void*>(&ll_finish_dispatch_kernel),
                             reinterpret_cast<const void*>(&ll_combine_send_kernel),
                             reinterpret_cast<const void*>(&ll_combine_reduce_kernel), reinterpret_cast<const void*>(&barrier_kernel)};
    for (const void* f : kernels) {
      cudaFuncAttributes attr;
      check(cudaFuncGetAttributes(&attr, f), "cudaFuncGetAttributes (kernel preload)");
    }
    check(cudaStreamSynchronize(nullptr), "cudaStreamSynchronize"); // the memsets, before any peer sees the handle
  } catch (...) {
    if (stream_) cudaStreamDestroy(stream_);
    cudaFree(shared_);
    cudaFree(local_);
    if (error_host_) cudaFreeHost(error_host_);
    throw;
  }
}

ep_buffer::~ep_buffer() {
  int prev = 0;
  cudaGetDevice(&prev);
  cudaSetDevice(device_);
  if (stream_) cudaStreamSynchronize(stream_);
  for (int r = 0; r < ep_max_ranks; ++r)
    if (peers_->opened_ipc[r]) cudaIpcCloseMemHandle(peers_->base[r]);
  if (stream_) cudaStreamDestroy(stream_);
  cudaFree(shared_);
  cudaFree(local_);
  if (error_host_) cudaFreeHost(error_host_);
  cudaSetDevice(prev);
}

std::size_t ep_buffer::buffer_bytes() const { return shared_bytes_; }

std::vector<std::uint8_t> ep_buffer::export_handle() const {
  handle_fields f;
  f.rank = cfg_.rank;
  f.ranks = cfg_.ranks;
  f.device = device_;
  f.pid = getpid();
  f.ptr = reinterpret_cast<std::uint64_t>(shared_);
  f.bytes = shared_bytes_;
  f.hidden = cfg_.hidden;
  f.experts = cfg_.experts;
  f.topk = cfg_.topk;
  f.max_tokens = cfg_.max_tokens;
  f.ll_max_tokens = cfg_.ll_max_tokens;
  f.normal = cfg_.normal;
  f.low_latency = cfg_.low_latency;
  const std::string h = host_name();
  std::strncpy(f.host, h.c_str(), sizeof(f.host) - 1);
  int prev = 0;
  cudaGetDevice(&prev);
  cudaSetDevice(device_);
  const cudaError_t e = cudaIpcGetMemHandle(&f.ipc, shared_);
  cudaSetDevice(prev);
  if (e != cudaSuccess) throw std::runtime_error("ep_buffer::export_handle: " + cuda_msg("cudaIpcGetMemHandle", e));
  std::vector<std::uint8_t> out(sizeof(f));
  std::memcpy(out.data(), &f, sizeof(f));
  return out;
}

namespace {
bool read_handle(const std::vector<std::uint8_t>& bytes, handle_fields* f, std::string* error) {
  if (bytes.size() != sizeof(handle_fields)) {
    if (error) *error = "handle of " + std::to_string(bytes.size()) + " bytes, expected " + std::to_string(sizeof(handle_fields));
    return false;
  }
  std::memcpy(f, bytes.data(), sizeof(*f));
  if (f->magic != handle_magic || f->version != handle_version) {
    if (error) *error = "not an ep_buffer handle (magic/version)";
    return false;
  }
  f->host[sizeof(f->host) - 1] = 0;
  return true;
}
} // namespace

bool parse_ep_handle(const std::vector<std::uint8_t>& bytes, ep_handle_info* out, std::string* error) {
  handle_fields f;
  if (!read_handle(bytes, &f, error)) return false;
  out->rank = f.rank;
  out->ranks = f.ranks;
  out->device = f.device;
  out->pid = long(f.pid);
  out->host = f.host;
  return true;
}

kernel_status ep_buffer::open_peers(const std::vector<std::vector<std::uint8_t>>& handles) {
  const std::string who = "ep_buffer::open_peers (rank " + std::to_string(cfg_.rank) + "): ";
  if (peers_open_) return kernel_status::failure(who + "already open");
  if (int(handles.size()) != cfg_.ranks)
    return kernel_status::failure(who + std::to_string(handles.size()) + " handles for " + std::to_string(cfg_.ranks) + " ranks");
  const std::string me_host = host_name();
  const long me_pid = getpid();
  std::vector<handle_fields> fs(handles.size());
  for (int r = 0; r < cfg_.ranks; ++r) {
    std::string err;
    handle_fields& f = fs[r];
    if (!read_handle(handles[r], &f, &err)) return kernel_status::failure(who + "handle " + std::to_string(r) + ": " + err);
    if (f.rank != r) return kernel_status::failure(who + "handle " + std::to_string(r) + " belongs to rank " + std::to_string(f.rank));
    if (f.ranks != cfg_.ranks || f.hidden != cfg_.hidden || f.experts != cfg_.experts || f.topk != cfg_.topk ||
        f.max_tokens != cfg_.max_tokens || f.ll_max_tokens != cfg_.ll_max_tokens || f.normal != int(cfg_.normal) ||
        f.low_latency != int(cfg_.low_latency) || f.bytes != shared_bytes_)
      return kernel_status::failure(who + "rank " + std::to_string(r) + " was configured differently (ranks/hidden/experts/topk/tokens/modes)");
    if (me_host != f.host) return kernel_status::failure(who + "rank " + std::to_string(r) + " is on host '" + f.host + "', not this one");
  }
  int prev = 0;
  cudaGetDevice(&prev);
  cudaSetDevice(device_);
  kernel_status st;
  for (int r = 0; r < cfg_.ranks && st.ok(); ++r) {
    const handle_fields& f = fs[r];
    if (r == cfg_.rank) {
      peers_->base[r] = shared_;
    } else if (f.pid == me_pid) {
      if (f.device != device_) {
        int can = 0;
        cudaDeviceCanAccessPeer(&can, device_, f.device);
        if (!can) {
          st = kernel_status::failure(who + "device " + std::to_string(device_) + " cannot access device " + std::to_string(f.device));
          break;
        }
        const cudaError_t e = cudaDeviceEnablePeerAccess(f.device, 0);
        if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled) {
          st = kernel_status::failure(who + cuda_msg("cudaDeviceEnablePeerAccess", e));
          break;
        }
        cudaGetLastError(); // clear cudaErrorPeerAccessAlreadyEnabled
      }
      peers_->base[r] = reinterpret_cast<char*>(f.ptr);
    } else {
      void* p = nullptr;
      const cudaError_t e = cudaIpcOpenMemHandle(&p, f.ipc, cudaIpcMemLazyEnablePeerAccess);
      if (e != cudaSuccess) {
        st = kernel_status::failure(who + "rank " + std::to_string(r) + ": " + cuda_msg("cudaIpcOpenMemHandle", e));
        break;
      }
      peers_->base[r] = static_cast<char*>(p);
      peers_->opened_ipc[r] = true;
    }
  }
  if (!st.ok()) {
    for (int r = 0; r < ep_max_ranks; ++r)
      if (peers_->opened_ipc[r]) cudaIpcCloseMemHandle(peers_->base[r]);
    *peers_ = peer_map{{}, {}, peers_->layout};
  }
  cudaSetDevice(prev);
  peers_open_ = st.ok();
  return st;
}

namespace {
kparams make_params(const ep_buffer_config& c, const region_layout& l, char* const* base, char* local, int* err) {
  kparams k{};
  for (int r = 0; r < ep_max_ranks; ++r) k.peer[r] = base[r];
  k.local = local;
  k.error = err;
  k.l = l;
  k.rank = c.rank;
  k.ranks = c.ranks;
  k.hidden = c.hidden;
  k.experts = c.experts;
  k.topk = c.topk;
  k.max_tokens = c.max_tokens;
  k.ll_max_tokens = c.ll_max_tokens;
  k.local_experts = c.experts / c.ranks;
  k.timeout_ns = std::uint64_t(c.timeout_s * 1e9);
  return k;
}

// Makes the buffer's device current for the scope of a call.
struct device_scope {
  int prev = 0;
  explicit device_scope(int d) {
    cudaGetDevice(&prev);
    if (prev != d) cudaSetDevice(d);
  }
  ~device_scope() {
    int now = 0;
    cudaGetDevice(&now);
    if (now != prev) cudaSetDevice(prev);
  }
};
} // namespace

#define PETREL_EP_PARAMS make_params(cfg_, peers_->layout, peers_->base, local_, error_dev_)

kernel_status ep_buffer::launch_wait(int kind, std::size_t counters, std::uint64_t target, bool device_round, int parity) {
  const region_layout& l = peers_->layout;
  const std::size_t round_offset = kind == wait_ll_combine ? l.ll_combine_round + parity * 8 : l.ll_round + parity * 8;
  const std::uint64_t per_round = kind == wait_ll_combine ? combine_send_blocks : ll_send_blocks;
  wait_kernel<<<1, 32, 0, stream_>>>(PETREL_EP_PARAMS, kind, counters, target, device_round ? 1 : 0, round_offset,
                                     device_round ? per_round : normal_send_blocks);
  return launched("ep wait kernel");
}

kernel_status ep_buffer::dispatch(const void* x_fp8, const float* x_scales, const int* topk_idx, const float* topk_weights,
                                  int tokens) {
  if (!peers_open_) return kernel_status::failure("ep_buffer::dispatch: open_peers first");
  if (!cfg_.normal) return kernel_status::failure("ep_buffer::dispatch: the buffer was built without normal mode");
  if (tokens < 0 || tokens > cfg_.max_tokens)
    return kernel_status::failure("ep_buffer::dispatch: tokens=" + std::to_string(tokens) + " outside [0, max_tokens=" +
                                  std::to_string(cfg_.max_tokens) + "]");
  if (tokens > 0 && (!x_fp8 || !x_scales || !topk_idx || !topk_weights))
    return kernel_status::failure("ep_buffer::dispatch: null pointer");
  if (reinterpret_cast<std::uintptr_t>(x_fp8) % 16 != 0) return kernel_status::failure("ep_buffer::dispatch: x_fp8 must be 16-byte aligned");
  device_scope ds(device_);
  const kparams k = PETREL_EP_PARAMS;
  const std::uint64_t seq = ++normal_dispatch_seq_;
  last_tokens_ = tokens;
  normal_layout_kernel<<<cfg_.ranks, 1024, 0, stream_>>>(k, topk_idx, tokens);
  if (auto st = launched("ep normal layout"); !st.ok()) return st;
  normal_notify_kernel<<<1, 32, 0, stream_>>>(k, seq);
  if (auto st = launched("ep normal notify"); !st.ok()) return st;
  normal_clear_tail_kernel<<<64, 256, 0, stream_>>>(k);
  if (auto st = launched("ep normal clear tail"); !st.ok()) return st;
  normal_dispatch_send_kernel<<<normal_send_blocks, send_threads, 0, stream_>>>(
      k, static_cast<const int4*>(x_fp8), x_scales, topk_idx, topk_weights, tokens);
  if (auto st = launched("ep normal dispatch send"); !st.ok()) return st;
  return launch_wait(wait_dispatch, peers_->layout.dispatch_arrive, seq * normal_send_blocks, false, 0);
}

ep_normal_recv ep_buffer::recv() const {
  const region_layout& l = peers_->layout;
  ep_normal_recv r;
  if (!cfg_.normal) return r;
  r.x_fp8 = shared_ + l.n_x;
  r.scales = reinterpret_cast<const float*>(shared_ + l.n_scales);
  r.topk_idx = reinterpret_cast<const int*>(shared_ + l.n_topk);
  r.topk_weights = reinterpret_cast<const float*>(shared_ + l.n_weights);
  r.src_token = reinterpret_cast<const int*>(shared_ + l.n_src);
  r.rank_offsets = reinterpret_cast<const int*>(local_ + l.recv_offsets);
  r.capacity = l.n_capacity;
  return r;
}

kernel_status ep_buffer::combine(const void* y_bf16, void* out, bool out_fp32) {
  if (!peers_open_) return kernel_status::failure("ep_buffer::combine: open_peers first");
  if (!cfg_.normal) return kernel_status::failure("ep_buffer::combine: the buffer was built without normal mode");
  if (normal_combine_seq_ >= normal_dispatch_seq_) return kernel_status::failure("ep_buffer::combine: no dispatch to combine");
  if (!y_bf16 || (!out && last_tokens_ > 0)) return kernel_status::failure("ep_buffer::combine: null pointer");
  if (reinterpret_cast<std::uintptr_t>(y_bf16) % 16 != 0 || reinterpret_cast<std::uintptr_t>(out) % 16 != 0)
    return kernel_status::failure("ep_buffer::combine: y and out must be 16-byte aligned");
  device_scope ds(device_);
  const kparams k = PETREL_EP_PARAMS;
  const std::uint64_t seq = ++normal_combine_seq_;
  normal_combine_send_kernel<<<combine_send_blocks, send_threads, 0, stream_>>>(k, static_cast<const int4*>(y_bf16));
  if (auto st = launched("ep normal combine send"); !st.ok()) return st;
  wait_kernel<<<1, 32, 0, stream_>>>(k, wait_combine, peers_->layout.combine_arrive, seq * combine_send_blocks, 0, 0,
                                     combine_send_blocks);
  if (auto st = launched("ep normal combine wait"); !st.ok()) return st;
  if (last_tokens_ == 0) return kernel_status::success();
  const std::int64_t n = std::int64_t(last_tokens_) * (cfg_.hidden / 8);
  const unsigned grid = unsigned(std::min<std::int64_t>((n + 255) / 256, 132 * 8));
  normal_combine_reduce_kernel<<<grid, 256, 0, stream_>>>(k, last_tokens_, out, out_fp32 ? 1 : 0);
  return launched("ep normal combine reduce");
}

kernel_status ep_buffer::ll_dispatch_send(const void* x_bf16, const int* topk_idx, int tokens) {
  if (!peers_open_) return kernel_status::failure("ep_buffer::ll_dispatch_send: open_peers first");
  if (!cfg_.low_latency) return kernel_status::failure("ep_buffer::ll_dispatch_send: the buffer was built without low-latency mode");
  if (tokens < 0 || tokens > cfg_.ll_max_tokens)
    return kernel_status::failure("ep_buffer::ll_dispatch_send: tokens=" + std::to_string(tokens) + " outside [0, ll_max_tokens=" +
                                  std::to_string(cfg_.ll_max_tokens) + "]");
  if (tokens > 0 && (!x_bf16 || !topk_idx)) return kernel_status::failure("ep_buffer::ll_dispatch_send: null pointer");
  if (reinterpret_cast<std::uintptr_t>(x_bf16) % 16 != 0)
    return kernel_status::failure("ep_buffer::ll_dispatch_send: x must be 16-byte aligned");
  device_scope ds(device_);
  ll_parity_ = int(ll_calls_++ & 1);
  const std::size_t smem = align_up(cfg_.hidden, 16) + (cfg_.hidden / fp8_block) * sizeof(float);
  ll_dispatch_send_kernel<<<ll_send_blocks, send_threads, smem, stream_>>>(
      PETREL_EP_PARAMS, static_cast<const __nv_bfloat16*>(x_bf16), topk_idx, tokens, ll_parity_);
  return launched("ep low-latency dispatch send");
}

kernel_status ep_buffer::ll_dispatch_recv() {
  if (!peers_open_ || !cfg_.low_latency || ll_calls_ == 0)
    return kernel_status::failure("ep_buffer::ll_dispatch_recv: no low-latency send before it");
  device_scope ds(device_);
  if (auto st = launch_wait(wait_ll_dispatch, peers_->layout.ll_done + ll_parity_ * 64, 0, true, ll_parity_); !st.ok()) return st;
  ll_finish_dispatch_kernel<<<1, 256, 0, stream_>>>(PETREL_EP_PARAMS, ll_parity_);
  return launched("ep low-latency dispatch finish");
}

ep_ll_recv ep_buffer::ll_recv() const {
  const region_layout& l = peers_->layout;
  ep_ll_recv r;
  if (!cfg_.low_latency) return r;
  r.x_fp8 = shared_ + l.ll_x[ll_parity_];
  r.scales = reinterpret_cast<const float*>(shared_ + l.ll_scales[ll_parity_]);
  r.masked_m = reinterpret_cast<const int*>(local_ + l.ll_masked_m) + ll_parity_ * local_experts();
  r.src_info = reinterpret_cast<const int*>(shared_ + l.ll_src[ll_parity_]);
  r.local_experts = local_experts();
  r.max_m = l.ll_max_m;
  return r;
}

kernel_status ep_buffer::ll_combine_send(const void* y_bf16) {
  if (!peers_open_ || !cfg_.low_latency || ll_calls_ == 0)
    return kernel_status::failure("ep_buffer::ll_combine_send: no low-latency dispatch before it");
  if (!y_bf16 || reinterpret_cast<std::uintptr_t>(y_bf16) % 16 != 0)
    return kernel_status::failure("ep_buffer::ll_combine_send: y must be a 16-byte aligned pointer");
  device_scope ds(device_);
  ll_combine_send_kernel<<<combine_send_blocks, send_threads, 0, stream_>>>(PETREL_EP_PARAMS, static_cast<const int4*>(y_bf16),
                                                                            ll_parity_);
  return launched("ep low-latency combine send");
}

kernel_status ep_buffer::ll_combine_recv(const int* topk_idx, const float* topk_weights, int tokens, void* out_bf16) {
  if (!peers_open_ || !cfg_.low_latency || ll_calls_ == 0)
    return kernel_status::failure("ep_buffer::ll_combine_recv: no low-latency dispatch before it");
  if (tokens < 0 || tokens > cfg_.ll_max_tokens)
    return kernel_status::failure("ep_buffer::ll_combine_recv: tokens=" + std::to_string(tokens) + " outside [0, ll_max_tokens]");
  if (tokens > 0 && (!topk_idx || !topk_weights || !out_bf16))
    return kernel_status::failure("ep_buffer::ll_combine_recv: null pointer");
  if (reinterpret_cast<std::uintptr_t>(out_bf16) % 16 != 0)
    return kernel_status::failure("ep_buffer::ll_combine_recv: out must be 16-byte aligned");
  device_scope ds(device_);
  if (auto st = launch_wait(wait_ll_combine, peers_->layout.ll_combine_done + ll_parity_ * 64, 0, true, ll_parity_); !st.ok())
    return st;
  if (tokens == 0) return kernel_status::success();
  const std::int64_t n = std::int64_t(tokens) * (cfg_.hidden / 8);
  const unsigned grid = unsigned(std::min<std::int64_t>((n + 255) / 256, 132 * 4));
  ll_combine_reduce_kernel<<<grid, 256, 0, stream_>>>(PETREL_EP_PARAMS, topk_idx, topk_weights, tokens,
                                                      static_cast<int4*>(out_bf16), ll_parity_);
  return launched("ep low-latency combine reduce");
}

kernel_status ep_buffer::barrier() {
  if (!peers_open_) return kernel_status::failure("ep_buffer::barrier: open_peers first");
  device_scope ds(device_);
  barrier_kernel<<<1, 32, 0, stream_>>>(PETREL_EP_PARAMS, ++barrier_seq_);
  return launched("ep barrier");
}

std::string ep_buffer::error() const {
  volatile int* e = error_host_;
  if (e[0] == 0) return "";
  if (e[0] == 2) return "ep rank " + std::to_string(cfg_.rank) + ": aborted: " + abort_reason_;
  if (e[0] != 1) return "ep rank " + std::to_string(cfg_.rank) + ": a wait failed while recording its error";
  return "ep rank " + std::to_string(cfg_.rank) + ": " + wait_name(e[1]) + " timed out after " + std::to_string(cfg_.timeout_s) +
         " s waiting for rank " + std::to_string(e[2]) + " (round " + std::to_string(e[3]) +
         "): the peer died, is stuck, or did not make the same call";
}

void ep_buffer::clear_error() { std::memset(error_host_, 0, 4 * sizeof(int)); }

void ep_buffer::abort(const std::string& reason) {
  int expected = 0;
  // The reason first: error() reads it once the code says 2.
  if (__atomic_load_n(error_host_, __ATOMIC_ACQUIRE) == 0) abort_reason_ = reason;
  __atomic_compare_exchange_n(error_host_, &expected, 2, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

} // namespace petrel::cuda
