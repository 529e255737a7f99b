// fp8 quantisation and GEMM kernels (kernels/cuda) against a plain fp32 CPU reference.
// Compiles everywhere; without CUDA or without a GPU every case reports the skip and passes that check only.
#include <doctest/doctest.h>

#ifdef PETREL_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "tests/support/cuda_test_util.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/fp8_layout.hpp"
#include "kernels/cuda/gemm_fp8.hpp"
#include "kernels/cuda/grouped_gemm_fp8.hpp"
#include "kernels/cuda/quant.hpp"

namespace {

using namespace petrel::cuda;

using petrel::test::gpu_available;

// -- CPU number formats -----------------------------------------------------------------

using petrel::test::bf16_to_float;
using petrel::test::e4m3_to_float;
using petrel::test::float_to_bf16;
using petrel::test::float_to_e4m3;

// -- device buffers -----------------------------------------------------------------------

template <typename T>
struct device_buffer {
  T* ptr = nullptr;
  std::size_t count = 0;
  explicit device_buffer(std::size_t n) : count(n) { REQUIRE(cudaMalloc(reinterpret_cast<void**>(&ptr), std::max<std::size_t>(n, 1) * sizeof(T)) == cudaSuccess); }
  explicit device_buffer(const std::vector<T>& host) : device_buffer(host.size()) { upload(host); }
  ~device_buffer() { cudaFree(ptr); }
  void upload(const std::vector<T>& host) {
    REQUIRE(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess);
  }
  std::vector<T> download() const {
    std::vector<T> host(count);
    REQUIRE(cudaMemcpy(host.data(), ptr, count * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
    return host;
  }
};

// -- the CPU reference: dequantise, multiply in fp32 (double accumulate) ----------------------

struct fp8_problem {
  std::int64_t rows = 0, n = 0, k = 0;
  int groups = 1;
  std::vector<std::uint8_t> a;      // [rows, k]
  std::vector<float> a_scales;      // [k/128][fp8_scale_ld(rows)]
  std::vector<std::uint8_t> b;      // [groups, n, k]
  std::vector<float> b_scales;      // [groups, ceil(n/128), k/128]
  std::vector<int> row_group;       // expert of each row, -1 = not computed

  std::int64_t ld() const { return fp8_scale_ld(rows); }
  std::int64_t k_blocks() const { return k / 128; }
  std::int64_t n_blocks() const { return (n + 127) / 128; }
};

fp8_problem make_problem(std::int64_t rows, std::int64_t n, std::int64_t k, int groups, std::uint32_t seed) {
  fp8_problem p;
  p.rows = rows; p.n = n; p.k = k; p.groups = groups;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> value(-440.0f, 440.0f), scale(0.5e-3f, 2e-3f);
  p.a.resize(rows * k);
  for (auto& x : p.a) x = float_to_e4m3(value(rng));
  p.a_scales.resize(fp8_act_scale_count(rows, k));
  for (auto& s : p.a_scales) s = scale(rng);
  p.b.resize(static_cast<std::size_t>(groups) * n * k);
  for (auto& x : p.b) x = float_to_e4m3(value(rng));
  p.b_scales.resize(fp8_weight_scale_count(groups, n, k));
  for (auto& s : p.b_scales) s = scale(rng);
  p.row_group.assign(rows, 0);
  return p;
}

std::vector<float> reference(const fp8_problem& p) {
  std::vector<float> a_deq(p.rows * p.k);
  for (std::int64_t r = 0; r < p.rows; ++r)
    for (std::int64_t c = 0; c < p.k; ++c)
      a_deq[r * p.k + c] = e4m3_to_float(p.a[r * p.k + c]) * p.a_scales[(c / 128) * p.ld() + r];
  std::vector<float> b_deq(p.b.size());
  for (std::int64_t g = 0; g < p.groups; ++g)
    for (std::int64_t j = 0; j < p.n; ++j)
      for (std::int64_t c = 0; c < p.k; ++c) {
        const std::int64_t i = (g * p.n + j) * p.k + c;
        b_deq[i] = e4m3_to_float(p.b[i]) * p.b_scales[(g * p.n_blocks() + j / 128) * p.k_blocks() + c / 128];
      }
  std::vector<float> out(p.rows * p.n, 0.0f);
  for (std::int64_t r = 0; r < p.rows; ++r) {
    const int g = p.row_group[r];
    if (g < 0) continue;
    for (std::int64_t j = 0; j < p.n; ++j) {
      double acc = 0;
      const float* x = &a_deq[r * p.k];
      const float* w = &b_deq[(g * p.n + j) * p.k];
      for (std::int64_t c = 0; c < p.k; ++c) acc += static_cast<double>(x[c]) * w[c];
      out[r * p.n + j] = static_cast<float>(acc);
    }
  }
  return out;
}

constexpr std::uint16_t poison = 0xC640; // bf16 -12288: marks rows a kernel must not write

// Rows with row_group >= 0 must match the reference; the others must still hold the poison.
void expect_matches(const fp8_problem& p, const std::vector<std::uint16_t>& d, const std::vector<float>& ref,
                    const std::string& what) {
  INFO(what);
  double err2 = 0, ref2 = 0, max_ref = 0;
  for (float r : ref) max_ref = std::max(max_ref, static_cast<double>(std::fabs(r)));
  std::int64_t bad = 0, touched = 0;
  for (std::int64_t r = 0; r < p.rows; ++r)
    for (std::int64_t j = 0; j < p.n; ++j) {
      const std::uint16_t raw = d[r * p.n + j];
      if (p.row_group[r] < 0) { touched += raw != poison; continue; }
      const float x = bf16_to_float(raw), y = ref[r * p.n + j];
      if (!std::isfinite(x) || std::fabs(x - y) > 1e-2 * std::fabs(y) + 2e-3 * max_ref) ++bad;
      err2 += (static_cast<double>(x) - y) * (static_cast<double>(x) - y);
      ref2 += static_cast<double>(y) * y;
    }
  const double rel = ref2 > 0 ? std::sqrt(err2 / ref2) : std::sqrt(err2);
  MESSAGE(what << ": rel_l2=" << rel << " bad=" << bad << " written padding=" << touched);
  CHECK(bad == 0);
  CHECK(rel < 5e-3);
  CHECK(touched == 0);
}

} // namespace
#endif // PETREL_HAVE_CUDA

#ifdef PETREL_HAVE_CUDA
#define PETREL_REQUIRE_GPU()                                          \
  if (!gpu_available()) {                                             \
    MESSAGE("no CUDA device: skipped (runs on the device machine)"); \
    CHECK(true);                                                      \
    return;                                                           \
  }
#endif

TEST_CASE("cuda quant: bf16 -> e4m3 with 1x128 scales matches the CPU reference") {
#ifndef PETREL_HAVE_CUDA
  MESSAGE("built without CUDA: skipped");
  CHECK(true);
#else
  PETREL_REQUIRE_GPU();
  const std::int64_t rows = 37, k = 384, ld = fp8_scale_ld(rows);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<std::uint16_t> x(rows * k);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < k; ++c) {
      const float magnitude = r == 3 ? 0.0f : std::ldexp(1.0f, static_cast<int>(r % 9) - 4); // row 3: all zero
      x[r * k + c] = float_to_bf16(u(rng) * magnitude);
    }
  device_buffer<std::uint16_t> dx(x);
  device_buffer<std::uint8_t> dq(rows * k);
  device_buffer<float> ds(fp8_act_scale_count(rows, k));
  auto st = quantize_bf16_to_fp8_1x128(dx.ptr, rows, k, dq.ptr, ds.ptr, nullptr);
  REQUIRE_MESSAGE(st.ok(), st.message);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  const auto q = dq.download();
  const auto s = ds.download();
  std::int64_t byte_mismatch = 0, scale_mismatch = 0;
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t kb = 0; kb < k / 128; ++kb) {
      float amax = 0;
      for (int c = 0; c < 128; ++c) amax = std::max(amax, std::fabs(bf16_to_float(x[r * k + kb * 128 + c])));
      const float scale = std::max(amax, 1e-4f) / 448.0f;
      scale_mismatch += s[kb * ld + r] != scale;
      for (int c = 0; c < 128; ++c) {
        const std::int64_t i = r * k + kb * 128 + c;
        byte_mismatch += q[i] != float_to_e4m3(bf16_to_float(x[i]) / scale);
      }
    }
  CHECK(scale_mismatch == 0);
  CHECK(byte_mismatch == 0);
  CHECK_FALSE(quantize_bf16_to_fp8_1x128(dx.ptr, rows, 100, dq.ptr, ds.ptr, nullptr).ok());
#endif
}

TEST_CASE("cuda gemm: dense fp8 (Petrel kernel, both tile widths, and cuBLASLt) vs the CPU reference") {
#ifndef PETREL_HAVE_CUDA
  MESSAGE("built without CUDA: skipped");
  CHECK(true);
#else
  PETREL_REQUIRE_GPU();
  struct shape { std::int64_t m, n, k; };
  for (const shape& sh : {shape{200, 144, 512}, shape{8, 272, 384}}) {
    const std::int64_t m = sh.m, n = sh.n, k = sh.k;
    fp8_problem p = make_problem(m, n, k, 1, static_cast<std::uint32_t>(m + n));
    const auto ref = reference(p);
    device_buffer<std::uint8_t> da(p.a), db(p.b);
    device_buffer<float> dsa(p.a_scales), dsb(p.b_scales);
    device_buffer<std::uint16_t> dd(m * n);
    for (int variant = 0; variant < 6; ++variant) {
      const int block_n = std::array<int, 3>{64, 128, 192}[variant % 3];
      const bool paired = variant < 3;
      set_grouped_gemm_paired_promotion(paired);
      set_grouped_gemm_block_n_override(block_n);
      REQUIRE(cudaMemset(dd.ptr, 0xFF, m * n * 2) == cudaSuccess);
      auto st = fp8_gemm_nt(da.ptr, dsa.ptr, m, db.ptr, dsb.ptr, n, k, dd.ptr, nullptr);
      REQUIRE_MESSAGE(st.ok(), st.message);
      REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
      expect_matches(p, dd.download(), ref, "fp8_gemm_nt m=" + std::to_string(m) + " block_n=" + std::to_string(block_n) + (paired ? " paired" : " serial"));
    }
    set_grouped_gemm_block_n_override(0);
  set_grouped_gemm_paired_promotion(true);
    cublaslt_fp8_gemm_nt plan(m, n, k);
    if (k % 512 != 0) { // cuBLASLt's weight-scale layout needs k/128 % 4 == 0: the plan must say so
      CHECK_FALSE(plan.ok());
      CHECK(plan.error().find("multiple of 512") != std::string::npos);
      continue;
    }
    REQUIRE_MESSAGE(plan.ok(), plan.error());
    REQUIRE(cudaMemset(dd.ptr, 0xFF, m * n * 2) == cudaSuccess);
    auto st = plan.run(da.ptr, dsa.ptr, db.ptr, dsb.ptr, dd.ptr, nullptr);
    REQUIRE_MESSAGE(st.ok(), st.message);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    auto d = dd.download();
    if (plan.output_transposed()) {
      MESSAGE("cuBLASLt wrote D as [n, m]");
      const auto t = d;
      for (std::int64_t r = 0; r < m; ++r)
        for (std::int64_t c = 0; c < n; ++c) d[r * n + c] = t[c * m + r];
    }
    expect_matches(p, d, ref, "cublaslt m=" + std::to_string(m));
  }
  CHECK_FALSE(fp8_gemm_nt(nullptr, nullptr, 16, nullptr, nullptr, 64, 100, nullptr, nullptr).ok());
#endif
}

TEST_CASE("cuda gemm: grouped contiguous layout with padding rows, an empty expert and a padding block") {
#ifndef PETREL_HAVE_CUDA
  MESSAGE("built without CUDA: skipped");
  CHECK(true);
#else
  PETREL_REQUIRE_GPU();
  const std::vector<int> counts = {130, 0, 60, 256};
  const int groups = static_cast<int>(counts.size());
  std::vector<int> m_indices;
  for (int g = 0; g < groups; ++g) {
    const int padded = (counts[g] + 127) / 128 * 128;
    for (int r = 0; r < padded; ++r) m_indices.push_back(r < counts[g] ? g : -1);
  }
  m_indices.resize(m_indices.size() + 128, -1); // a trailing all-padding block
  const std::int64_t m_total = static_cast<std::int64_t>(m_indices.size()), n = 256, k = 384;
  fp8_problem p = make_problem(m_total, n, k, groups, 11);
  p.row_group = m_indices;
  for (std::int64_t r = 0; r < m_total; ++r) // padding rows hold garbage, NaN included
    if (m_indices[r] < 0) for (std::int64_t c = 0; c < k; c += 7) p.a[r * k + c] = 0x7F;
  const auto ref = reference(p);
  device_buffer<std::uint8_t> da(p.a), db(p.b);
  device_buffer<float> dsa(p.a_scales), dsb(p.b_scales);
  device_buffer<int> didx(m_indices);
  device_buffer<std::uint16_t> dd(m_total * n);
  const std::vector<std::uint16_t> poisoned(m_total * n, poison);
  for (int variant = 0; variant < 6; ++variant) {
      const int block_n = std::array<int, 3>{64, 128, 192}[variant % 3];
      const bool paired = variant < 3;
      set_grouped_gemm_paired_promotion(paired);
    set_grouped_gemm_block_n_override(block_n);
    dd.upload(poisoned);
    auto st = m_grouped_fp8_gemm_nt_contiguous(da.ptr, dsa.ptr, m_total, didx.ptr, db.ptr, dsb.ptr, groups, n, k, dd.ptr, nullptr);
    REQUIRE_MESSAGE(st.ok(), st.message);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    expect_matches(p, dd.download(), ref, "contiguous block_n=" + std::to_string(block_n) + (paired ? " paired" : " serial"));
  }
  set_grouped_gemm_block_n_override(0);
  set_grouped_gemm_paired_promotion(true);
  CHECK_FALSE(m_grouped_fp8_gemm_nt_contiguous(da.ptr, dsa.ptr, 100, didx.ptr, db.ptr, dsb.ptr, groups, n, k, dd.ptr, nullptr).ok());
#endif
}

TEST_CASE("cuda gemm: grouped masked layout with device counts, an empty group and a partial last block") {
#ifndef PETREL_HAVE_CUDA
  MESSAGE("built without CUDA: skipped");
  CHECK(true);
#else
  PETREL_REQUIRE_GPU();
  const std::vector<int> counts = {150, 0, 192};
  const int groups = static_cast<int>(counts.size());
  const std::int64_t max_m = 192, n = 192, k = 512, rows = groups * max_m;
  fp8_problem p = make_problem(rows, n, k, groups, 23);
  for (std::int64_t r = 0; r < rows; ++r) p.row_group[r] = (r % max_m) < counts[r / max_m] ? static_cast<int>(r / max_m) : -1;
  const auto ref = reference(p);
  device_buffer<std::uint8_t> da(p.a), db(p.b);
  device_buffer<float> dsa(p.a_scales), dsb(p.b_scales);
  device_buffer<int> dcounts(counts);
  device_buffer<std::uint16_t> dd(rows * n);
  const std::vector<std::uint16_t> poisoned(rows * n, poison);
  for (int variant = 0; variant < 6; ++variant) {
      const int block_n = std::array<int, 3>{64, 128, 192}[variant % 3];
      const bool paired = variant < 3;
      set_grouped_gemm_paired_promotion(paired);
    set_grouped_gemm_block_n_override(block_n);
    dd.upload(poisoned);
    auto st = m_grouped_fp8_gemm_nt_masked(da.ptr, dsa.ptr, groups, max_m, dcounts.ptr, db.ptr, dsb.ptr, n, k, dd.ptr, nullptr);
    REQUIRE_MESSAGE(st.ok(), st.message);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    expect_matches(p, dd.download(), ref, "masked block_n=" + std::to_string(block_n) + (paired ? " paired" : " serial"));
  }
  set_grouped_gemm_block_n_override(0);
  set_grouped_gemm_paired_promotion(true);
#endif
}
