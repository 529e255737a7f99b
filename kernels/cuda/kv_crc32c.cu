// CRC32C of KV pages in GPU memory, on the GPU: the same checksum kv_page_crc32c computes on the host
// (Castagnoli, reflected polynomial 0x82F63B78, initial value and final xor ~0), so a sender and a receiver may
// each compute it where their pages are.
//
// One block of 256 threads per page. Thread i runs the CRC register over bytes [i*L, (i+1)*L) of the page
// (L = page_bytes / 256), thread 0 from the initial value ~0 and the others from 0. The register update is
// linear over GF(2) apart from the data term, so the page's register equals
//   Z_{255L}(r_0) ^ Z_{254L}(r_1) ^ ... ^ r_255,
// where Z_n is "feed n zero bytes" (a 32x32 bit matrix). A tree of 8 levels combines neighbours:
// v[i] = Z_{L*2^j}(v[i]) ^ v[i + 2^j]. The 8 matrices depend only on L; the host builds them.
#include <cuda_runtime.h>

#include <array>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/device_memory.hpp"

namespace petrel::device_memory {

namespace {

constexpr uint32_t castagnoli_reflected = 0x82F63B78u;
constexpr int crc_threads = 256;
constexpr int crc_levels = 8; // log2(crc_threads)

/// Columns of Z_n for n = L, 2L, 4L, ... 128L: column b is Z_n applied to the register 1 << b.
struct zero_shift_ops {
  uint32_t cols[crc_levels][32];
};

using matrix = std::array<uint32_t, 32>; // columns

uint32_t apply(const matrix& m, uint32_t v) {
  uint32_t r = 0;
  for (int b = 0; b < 32 && v; ++b, v >>= 1)
    if (v & 1)
      r ^= m[size_t(b)];
  return r;
}

matrix compose(const matrix& a, const matrix& b) { // a after b
  matrix r{};
  for (int i = 0; i < 32; ++i)
    r[size_t(i)] = apply(a, b[size_t(i)]);
  return r;
}

/// Z_1: one zero byte through the register (eight shifts, each xoring the polynomial when the low bit is set).
matrix one_zero_byte() {
  matrix m{};
  for (int b = 0; b < 32; ++b) {
    uint32_t s = 1u << b;
    for (int k = 0; k < 8; ++k)
      s = (s & 1) ? (s >> 1) ^ castagnoli_reflected : s >> 1;
    m[size_t(b)] = s;
  }
  return m;
}

matrix zero_bytes(uint64_t n) {
  matrix result{};
  for (int i = 0; i < 32; ++i)
    result[size_t(i)] = 1u << i; // identity
  matrix power = one_zero_byte();
  for (; n; n >>= 1) {
    if (n & 1)
      result = compose(power, result);
    power = compose(power, power);
  }
  return result;
}

const zero_shift_ops& ops_for(uint64_t chunk) {
  static std::mutex mu;
  static std::map<uint64_t, zero_shift_ops> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(chunk);
  if (it != cache.end())
    return it->second;
  zero_shift_ops ops{};
  for (int j = 0; j < crc_levels; ++j) {
    auto m = zero_bytes(chunk << j);
    for (int b = 0; b < 32; ++b)
      ops.cols[j][b] = m[size_t(b)];
  }
  return cache.emplace(chunk, ops).first->second;
}

__global__ void __launch_bounds__(crc_threads) crc32c_pages_kernel(const uint8_t* base, const int32_t* pages,
                                                                   uint64_t page_bytes, uint32_t* out,
                                                                   const zero_shift_ops ops) {
  __shared__ uint32_t table[256];
  __shared__ uint32_t v[crc_threads];
  const int t = threadIdx.x;
  uint32_t c = uint32_t(t);
  for (int k = 0; k < 8; ++k)
    c = (c & 1) ? (c >> 1) ^ castagnoli_reflected : c >> 1;
  table[t] = c;
  __syncthreads();

  const uint64_t chunk = page_bytes / crc_threads; // a multiple of 4 (the host checks)
  const uint32_t* q = reinterpret_cast<const uint32_t*>(base + uint64_t(pages[blockIdx.x]) * page_bytes + t * chunk);
  uint32_t s = t == 0 ? 0xFFFFFFFFu : 0u;
  for (uint64_t i = 0; i < chunk / 4; ++i) {
    uint32_t w = __ldg(q + i); // little endian: bytes in order
    s = table[(s ^ w) & 0xff] ^ (s >> 8);
    s = table[(s ^ (w >> 8)) & 0xff] ^ (s >> 8);
    s = table[(s ^ (w >> 16)) & 0xff] ^ (s >> 8);
    s = table[(s ^ (w >> 24)) & 0xff] ^ (s >> 8);
  }
  v[t] = s;
  __syncthreads();
  for (int j = 0; j < crc_levels; ++j) {
    const int stride = 1 << j;
    if ((t & (2 * stride - 1)) == 0) {
      uint32_t a = v[t], r = 0;
      for (int b = 0; b < 32; ++b)
        if ((a >> b) & 1)
          r ^= ops.cols[j][b];
      v[t] = r ^ v[t + stride];
    }
    __syncthreads();
  }
  if (t == 0)
    out[blockIdx.x] = ~v[0];
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("GPU CRC32C: ") + what + ": " + cudaGetErrorString(e));
  }
}

} // namespace

bool crc32c_on_device_fits(uint64_t page_bytes) { return page_bytes >= 1024 && page_bytes % 1024 == 0; }

std::vector<uint32_t> crc32c_pages(const void* base, const std::vector<int32_t>& pages, uint64_t page_bytes) {
  if (pages.empty())
    return {};
  if (!crc32c_on_device_fits(page_bytes))
    throw std::invalid_argument("GPU CRC32C: page size " + std::to_string(page_bytes) +
                                " is not a multiple of 1024 bytes");
  if (reinterpret_cast<uintptr_t>(base) % 4 != 0)
    throw std::invalid_argument("GPU CRC32C: the pool is not 4-byte aligned");
  const int device = device_of(base);
  if (device < 0)
    throw std::invalid_argument("GPU CRC32C: the pool is not device memory");
  check(cudaSetDevice(device), "cudaSetDevice");
  const auto& ops = ops_for(page_bytes / crc_threads);
  cudaStream_t s = cudaStreamPerThread;
  int32_t* d_pages = nullptr;
  uint32_t* d_out = nullptr;
  check(cudaMallocAsync(&d_pages, pages.size() * sizeof(int32_t), s), "cudaMallocAsync");
  check(cudaMallocAsync(&d_out, pages.size() * sizeof(uint32_t), s), "cudaMallocAsync");
  std::vector<uint32_t> out(pages.size());
  cudaError_t e = cudaMemcpyAsync(d_pages, pages.data(), pages.size() * sizeof(int32_t), cudaMemcpyHostToDevice, s);
  if (e == cudaSuccess) {
    crc32c_pages_kernel<<<unsigned(pages.size()), crc_threads, 0, s>>>(static_cast<const uint8_t*>(base), d_pages,
                                                                        page_bytes, d_out, ops);
    e = cudaGetLastError();
  }
  if (e == cudaSuccess)
    e = cudaMemcpyAsync(out.data(), d_out, out.size() * sizeof(uint32_t), cudaMemcpyDeviceToHost, s);
  cudaFreeAsync(d_pages, s);
  cudaFreeAsync(d_out, s);
  cudaError_t sync = cudaStreamSynchronize(s);
  check(e != cudaSuccess ? e : sync, "kernel");
  return out;
}

} // namespace petrel::device_memory
