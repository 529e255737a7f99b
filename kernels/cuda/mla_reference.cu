// fp32 references for MLA decode and prefill (one CTA per output row, scores in shared memory).
#include "kernels/cuda/mla_reference.hpp"

#include <cuda_bf16.h>

#include <cmath>
#include <string>

namespace petrel::cuda {
namespace {

constexpr int ref_threads = 256;

__device__ float block_reduce(float v, bool is_max, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = is_max ? fmaxf(v, o) : v + o;
  }
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float r = scratch[0];
  for (int w = 1; w < ref_threads / 32; ++w) r = is_max ? fmaxf(r, scratch[w]) : r + scratch[w];
  return r;
}

// scores: [n] in shared memory; turns them into probabilities and returns nothing (normalised in place).
__device__ void softmax_inplace(float* scores, int n, float* scratch) {
  float m = -INFINITY;
  for (int i = threadIdx.x; i < n; i += ref_threads) m = fmaxf(m, scores[i]);
  m = block_reduce(m, true, scratch);
  float sum = 0.f;
  for (int i = threadIdx.x; i < n; i += ref_threads) {
    const float e = expf(scores[i] - m);
    scores[i] = e;
    sum += e;
  }
  sum = block_reduce(sum, false, scratch);
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += ref_threads) scores[i] *= inv;
  __syncthreads();
}

__global__ void decode_reference_kernel(const __nv_bfloat16* q, const __nv_bfloat16* kv, const int* block_table, int ld,
                                        const int* seqlens, int heads, float scale, float* out) {
  extern __shared__ float ref_smem[];
  __shared__ float scratch[32];
  __shared__ float qs[mla_qk_dim];
  const int b = blockIdx.x / heads;
  const int row = blockIdx.x;
  const int n = seqlens[b];
  for (int d = threadIdx.x; d < mla_qk_dim; d += ref_threads) qs[d] = __bfloat162float(q[static_cast<std::size_t>(row) * mla_qk_dim + d]);
  __syncthreads();
  auto token = [&](int t) {
    const int pg = block_table[static_cast<std::size_t>(b) * ld + t / mla_page_size];
    return kv + (static_cast<std::size_t>(pg) * mla_page_size + t % mla_page_size) * mla_qk_dim;
  };
  for (int t = threadIdx.x; t < n; t += ref_threads) {
    const __nv_bfloat16* k = token(t);
    float acc = 0.f;
    for (int d = 0; d < mla_qk_dim; ++d) acc += qs[d] * __bfloat162float(k[d]);
    ref_smem[t] = acc * scale;
  }
  __syncthreads();
  softmax_inplace(ref_smem, n, scratch);
  for (int d = threadIdx.x; d < mla_latent_dim; d += ref_threads) {
    float acc = 0.f;
    for (int t = 0; t < n; ++t) acc += ref_smem[t] * __bfloat162float(token(t)[d]);
    out[static_cast<std::size_t>(row) * mla_latent_dim + d] = acc;
  }
}

__global__ void prefill_reference_kernel(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                                         const int* cu_q, const int* cu_k, int num_seqs, int heads, float scale, float* out) {
  extern __shared__ float ref_smem[];
  __shared__ float scratch[32];
  __shared__ float qs[mla_prefill_qk_dim];
  const int token = blockIdx.x / heads, h = blockIdx.x % heads;
  int s = 0;
  while (s + 1 < num_seqs && cu_q[s + 1] <= token) ++s;
  const int len_q = cu_q[s + 1] - cu_q[s], len_k = cu_k[s + 1] - cu_k[s];
  const int pos = len_k - len_q + (token - cu_q[s]);
  const int n = pos + 1 < 0 ? 0 : (pos + 1 > len_k ? len_k : pos + 1);
  const std::size_t q_row = static_cast<std::size_t>(token) * heads + h;
  for (int d = threadIdx.x; d < mla_prefill_qk_dim; d += ref_threads)
    qs[d] = __bfloat162float(q[q_row * mla_prefill_qk_dim + d]);
  __syncthreads();
  for (int t = threadIdx.x; t < n; t += ref_threads) {
    const __nv_bfloat16* kr = k + (static_cast<std::size_t>(cu_k[s] + t) * heads + h) * mla_prefill_qk_dim;
    float acc = 0.f;
    for (int d = 0; d < mla_prefill_qk_dim; ++d) acc += qs[d] * __bfloat162float(kr[d]);
    ref_smem[t] = acc * scale;
  }
  __syncthreads();
  softmax_inplace(ref_smem, n, scratch);
  for (int d = threadIdx.x; d < mla_prefill_v_dim; d += ref_threads) {
    float acc = 0.f;
    for (int t = 0; t < n; ++t)
      acc += ref_smem[t] * __bfloat162float(v[(static_cast<std::size_t>(cu_k[s] + t) * heads + h) * mla_prefill_v_dim + d]);
    out[q_row * mla_prefill_v_dim + d] = acc;
  }
}

__global__ void fill_random_kernel(__nv_bfloat16* dst, std::size_t count, std::uint64_t seed, float scale) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    std::uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    x ^= x >> 33;
    x *= 0xFF51AFD7ED558CCDull;
    x ^= x >> 33;
    x *= 0xC4CEB9FE1A85EC53ull;
    x ^= x >> 33;
    const float u = static_cast<float>(x >> 40) * (1.0f / 16777216.0f); // [0, 1)
    dst[i] = __float2bfloat16((2.f * u - 1.f) * scale);
  }
}

__global__ void copy_kernel(const uint4* __restrict__ src, uint4* __restrict__ dst, std::size_t n) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) { // four independent loads in flight per thread
    const uint4 a = src[i], b = src[i + stride], c = src[i + 2 * stride], d = src[i + 3 * stride];
    dst[i] = a;
    dst[i + stride] = b;
    dst[i + 2 * stride] = c;
    dst[i + 3 * stride] = d;
  }
  for (; i < n; i += stride) dst[i] = src[i];
}

kernel_status launched(const char* who) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return kernel_status::failure(std::string(who) + ": " + cudaGetErrorString(err));
  return kernel_status::success();
}

} // namespace

kernel_status mla_decode_reference_f32(const void* q, const void* kv_cache, const int* block_table, int block_table_ld,
                                       const int* seqlens, int batch, int heads, int max_seqlen, float softmax_scale,
                                       float* out_f32, cudaStream_t stream) {
  if (batch <= 0) return kernel_status::success();
  const std::size_t smem = static_cast<std::size_t>(max_seqlen) * sizeof(float);
  if (smem > 200 * 1024) return kernel_status::failure("mla_decode_reference_f32: max_seqlen too large for the reference");
  cudaFuncSetAttribute(decode_reference_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  decode_reference_kernel<<<batch * heads, ref_threads, smem, stream>>>(
      static_cast<const __nv_bfloat16*>(q), static_cast<const __nv_bfloat16*>(kv_cache), block_table, block_table_ld, seqlens,
      heads, softmax_scale, out_f32);
  return launched("mla_decode_reference_f32");
}

kernel_status mla_prefill_reference_f32(const void* q, const void* k, const void* v, const int* cu_seqlens_q,
                                        const int* cu_seqlens_k, int num_seqs, int max_seqlen_q, int max_seqlen_k,
                                        int heads, float softmax_scale, float* out_f32, cudaStream_t stream) {
  (void)max_seqlen_q;
  int total_q = 0;
  if (cudaMemcpy(&total_q, cu_seqlens_q + num_seqs, sizeof(int), cudaMemcpyDeviceToHost) != cudaSuccess)
    return kernel_status::failure("mla_prefill_reference_f32: cannot read cu_seqlens_q");
  if (total_q <= 0) return kernel_status::success();
  const std::size_t smem = static_cast<std::size_t>(max_seqlen_k) * sizeof(float);
  if (smem > 200 * 1024) return kernel_status::failure("mla_prefill_reference_f32: max_seqlen_k too large for the reference");
  cudaFuncSetAttribute(prefill_reference_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  prefill_reference_kernel<<<total_q * heads, ref_threads, smem, stream>>>(
      static_cast<const __nv_bfloat16*>(q), static_cast<const __nv_bfloat16*>(k), static_cast<const __nv_bfloat16*>(v),
      cu_seqlens_q, cu_seqlens_k, num_seqs, heads, softmax_scale, out_f32);
  return launched("mla_prefill_reference_f32");
}

kernel_status mla_fill_random_bf16(void* dst, std::size_t count, std::uint64_t seed, float scale, cudaStream_t stream) {
  if (count == 0) return kernel_status::success();
  fill_random_kernel<<<1024, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(dst), count, seed, scale);
  return launched("mla_fill_random_bf16");
}

kernel_status mla_bench_copy(void* dst, const void* src, std::size_t bytes, cudaStream_t stream) {
  if (bytes % 16) return kernel_status::failure("mla_bench_copy: bytes must be a multiple of 16");
  int dev = 0, sms = 132;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  copy_kernel<<<sms * 4, 512, 0, stream>>>(static_cast<const uint4*>(src), static_cast<uint4*>(dst), bytes / 16);
  return launched("mla_bench_copy");
}

} // namespace petrel::cuda
