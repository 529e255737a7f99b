// MLA decode and prefill kernels (kernels/cuda/mla*) against plain fp32 references: a CPU one (double
// accumulation) at small shapes, the CUDA-core one (mla_reference.hpp) at real shapes.
// Compiles everywhere; without CUDA or without a GPU every case reports the skip and passes that check only.
#include <doctest/doctest.h>

#ifdef PETREL_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "tests/support/cuda_test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/mla.hpp"
#include "kernels/cuda/mla_reference.hpp"

namespace {

using namespace petrel::cuda;

using petrel::test::gpu_available;

using petrel::test::float_to_bf16;

using petrel::test::bf16_to_float;

constexpr std::uint16_t bf16_nan = 0x7FC1;
constexpr std::uint16_t bf16_poison = 0xFFFF; // NaN: an output element the kernel never wrote stays NaN

template <typename T>
struct device_buffer {
  T* ptr = nullptr;
  std::size_t count = 0;
  explicit device_buffer(std::size_t n) : count(n) {
    REQUIRE(cudaMalloc(reinterpret_cast<void**>(&ptr), std::max<std::size_t>(n, 1) * sizeof(T)) == cudaSuccess);
  }
  explicit device_buffer(const std::vector<T>& host) : device_buffer(host.size()) { upload(host); }
  ~device_buffer() { cudaFree(ptr); }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  void upload(const std::vector<T>& host) {
    REQUIRE(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess);
  }
  std::vector<T> download() const {
    std::vector<T> host(count);
    REQUIRE(cudaMemcpy(host.data(), ptr, count * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
    return host;
  }
};

std::vector<std::uint16_t> random_bf16(std::size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<std::uint16_t> v(n);
  for (auto& x : v) x = float_to_bf16(u(rng));
  return v;
}

// ‖out − ref‖ / ‖ref‖ over every element; every element must be finite (so written: poison is NaN).
void expect_close(const std::vector<std::uint16_t>& out, const std::vector<float>& ref, const std::string& what,
                  double tol = 1e-2) {
  INFO(what);
  REQUIRE(out.size() == ref.size());
  double err2 = 0, ref2 = 0;
  std::size_t non_finite = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    const double x = bf16_to_float(out[i]), y = ref[i];
    if (!std::isfinite(x)) { ++non_finite; continue; }
    err2 += (x - y) * (x - y);
    ref2 += y * y;
  }
  const double rel = ref2 > 0 ? std::sqrt(err2 / ref2) : std::sqrt(err2);
  MESSAGE(what << ": rel_l2=" << rel << " non-finite=" << non_finite << " of " << out.size());
  CHECK(non_finite == 0);
  CHECK(rel < tol);
}

// -- decode ------------------------------------------------------------------------------

struct decode_problem {
  int batch = 0, heads = 0, max_seqlen = 0, ld = 0, num_pages = 0;
  float scale = 0;
  std::vector<int> seqlens, block_table;
  std::vector<std::uint16_t> q, kv;
};

// Pages are a random permutation of a pool larger than needed; slots past each sequence's end hold NaN.
decode_problem make_decode(int batch, int heads, std::vector<int> seqlens, float scale, std::uint32_t seed) {
  decode_problem p;
  p.batch = batch;
  p.heads = heads;
  p.seqlens = std::move(seqlens);
  p.max_seqlen = *std::max_element(p.seqlens.begin(), p.seqlens.end());
  p.ld = (p.max_seqlen + mla_page_size - 1) / mla_page_size + 1; // one spare column
  p.scale = scale;
  std::mt19937 rng(seed);
  int used = 0;
  for (int s : p.seqlens) used += (s + mla_page_size - 1) / mla_page_size;
  p.num_pages = used + 3;
  std::vector<int> pool(p.num_pages);
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng);
  p.block_table.assign(static_cast<std::size_t>(batch) * p.ld, -1);
  int next = 0;
  for (int b = 0; b < batch; ++b)
    for (int t = 0; t < (p.seqlens[b] + mla_page_size - 1) / mla_page_size; ++t) p.block_table[b * p.ld + t] = pool[next++];
  p.q = random_bf16(static_cast<std::size_t>(batch) * heads * mla_qk_dim, rng);
  p.kv = random_bf16(static_cast<std::size_t>(p.num_pages) * mla_page_size * mla_qk_dim, rng);
  for (int b = 0; b < batch; ++b) {
    const int tiles = (p.seqlens[b] + mla_page_size - 1) / mla_page_size;
    const int pg = p.block_table[b * p.ld + tiles - 1];
    for (int slot = p.seqlens[b] - (tiles - 1) * mla_page_size; slot < mla_page_size; ++slot)
      for (int d = 0; d < mla_qk_dim; ++d) p.kv[(static_cast<std::size_t>(pg) * mla_page_size + slot) * mla_qk_dim + d] = bf16_nan;
  }
  return p;
}

std::vector<float> decode_reference_cpu(const decode_problem& p) {
  std::vector<float> out(static_cast<std::size_t>(p.batch) * p.heads * mla_latent_dim);
  for (int b = 0; b < p.batch; ++b) {
    const int n = p.seqlens[b];
    std::vector<const std::uint16_t*> rows(n);
    for (int t = 0; t < n; ++t)
      rows[t] = &p.kv[(static_cast<std::size_t>(p.block_table[b * p.ld + t / mla_page_size]) * mla_page_size + t % mla_page_size) * mla_qk_dim];
    for (int h = 0; h < p.heads; ++h) {
      const std::uint16_t* q = &p.q[(static_cast<std::size_t>(b) * p.heads + h) * mla_qk_dim];
      std::vector<double> s(n);
      double m = -1e300;
      for (int t = 0; t < n; ++t) {
        double acc = 0;
        for (int d = 0; d < mla_qk_dim; ++d) acc += static_cast<double>(bf16_to_float(q[d])) * bf16_to_float(rows[t][d]);
        s[t] = acc * p.scale;
        m = std::max(m, s[t]);
      }
      double sum = 0;
      for (auto& x : s) sum += (x = std::exp(x - m));
      float* o = &out[(static_cast<std::size_t>(b) * p.heads + h) * mla_latent_dim];
      for (int d = 0; d < mla_latent_dim; ++d) {
        double acc = 0;
        for (int t = 0; t < n; ++t) acc += s[t] * bf16_to_float(rows[t][d]);
        o[d] = static_cast<float>(acc / sum);
      }
    }
  }
  return out;
}

struct decode_buffers {
  device_buffer<std::uint16_t> q, kv, out;
  device_buffer<int> table, seqlens;
  device_buffer<std::uint8_t> workspace;
  explicit decode_buffers(const decode_problem& p)
      : q(p.q), kv(p.kv), out(static_cast<std::size_t>(p.batch) * p.heads * mla_latent_dim), table(p.block_table),
        seqlens(p.seqlens), workspace(mla_decode_workspace_bytes(p.batch, p.heads, p.max_seqlen)) {}
  kernel_status run(const decode_problem& p, cudaStream_t stream = nullptr) {
    return mla_decode_bf16(q.ptr, kv.ptr, table.ptr, p.ld, seqlens.ptr, p.batch, p.heads, p.max_seqlen, p.scale, out.ptr,
                           workspace.ptr, workspace.count, stream);
  }
  void poison_out() { REQUIRE(cudaMemset(out.ptr, 0xFF, out.count * 2) == cudaSuccess); }
};

std::vector<float> decode_reference_gpu(const decode_problem& p, decode_buffers& d) {
  device_buffer<float> ref(d.out.count);
  auto st = mla_decode_reference_f32(d.q.ptr, d.kv.ptr, d.table.ptr, p.ld, d.seqlens.ptr, p.batch, p.heads, p.max_seqlen,
                                     p.scale, ref.ptr, nullptr);
  REQUIRE_MESSAGE(st.ok(), st.message);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  return ref.download();
}

// -- prefill ------------------------------------------------------------------------------

struct prefill_problem {
  int heads = 0, num_seqs = 0, max_q = 0, max_k = 0;
  float scale = 0;
  std::vector<int> cu_q, cu_k;
  std::vector<std::uint16_t> q, k, v;
};

prefill_problem make_prefill(int heads, const std::vector<std::pair<int, int>>& lens, float scale, std::uint32_t seed) {
  prefill_problem p;
  p.heads = heads;
  p.num_seqs = static_cast<int>(lens.size());
  p.scale = scale;
  p.cu_q = {0};
  p.cu_k = {0};
  for (auto [lq, lk] : lens) {
    p.cu_q.push_back(p.cu_q.back() + lq);
    p.cu_k.push_back(p.cu_k.back() + lk);
    p.max_q = std::max(p.max_q, lq);
    p.max_k = std::max(p.max_k, lk);
  }
  std::mt19937 rng(seed);
  p.q = random_bf16(static_cast<std::size_t>(p.cu_q.back()) * heads * mla_prefill_qk_dim, rng);
  p.k = random_bf16(static_cast<std::size_t>(p.cu_k.back()) * heads * mla_prefill_qk_dim, rng);
  p.v = random_bf16(static_cast<std::size_t>(p.cu_k.back()) * heads * mla_prefill_v_dim, rng);
  return p;
}

std::vector<float> prefill_reference_cpu(const prefill_problem& p) {
  std::vector<float> out(static_cast<std::size_t>(p.cu_q.back()) * p.heads * mla_prefill_v_dim);
  for (int s = 0; s < p.num_seqs; ++s) {
    const int lq = p.cu_q[s + 1] - p.cu_q[s], lk = p.cu_k[s + 1] - p.cu_k[s];
    for (int i = 0; i < lq; ++i)
      for (int h = 0; h < p.heads; ++h) {
        const int n = std::min(lk, lk - lq + i + 1);
        const std::uint16_t* q = &p.q[(static_cast<std::size_t>(p.cu_q[s] + i) * p.heads + h) * mla_prefill_qk_dim];
        std::vector<double> sc(std::max(n, 0));
        double m = -1e300;
        for (int t = 0; t < n; ++t) {
          const std::uint16_t* k = &p.k[(static_cast<std::size_t>(p.cu_k[s] + t) * p.heads + h) * mla_prefill_qk_dim];
          double acc = 0;
          for (int d = 0; d < mla_prefill_qk_dim; ++d) acc += static_cast<double>(bf16_to_float(q[d])) * bf16_to_float(k[d]);
          sc[t] = acc * p.scale;
          m = std::max(m, sc[t]);
        }
        double sum = 0;
        for (auto& x : sc) sum += (x = std::exp(x - m));
        float* o = &out[(static_cast<std::size_t>(p.cu_q[s] + i) * p.heads + h) * mla_prefill_v_dim];
        for (int d = 0; d < mla_prefill_v_dim; ++d) {
          double acc = 0;
          for (int t = 0; t < n; ++t)
            acc += sc[t] * bf16_to_float(p.v[(static_cast<std::size_t>(p.cu_k[s] + t) * p.heads + h) * mla_prefill_v_dim + d]);
          o[d] = sum > 0 ? static_cast<float>(acc / sum) : 0.f;
        }
      }
  }
  return out;
}

struct prefill_buffers {
  device_buffer<std::uint16_t> q, k, v, out;
  device_buffer<int> cu_q, cu_k;
  explicit prefill_buffers(const prefill_problem& p)
      : q(p.q), k(p.k), v(p.v), out(static_cast<std::size_t>(p.cu_q.back()) * p.heads * mla_prefill_v_dim), cu_q(p.cu_q),
        cu_k(p.cu_k) {}
  kernel_status run(const prefill_problem& p) {
    REQUIRE(cudaMemset(out.ptr, 0xFF, out.count * 2) == cudaSuccess);
    return mla_prefill_bf16(q.ptr, k.ptr, v.ptr, cu_q.ptr, cu_k.ptr, p.num_seqs, p.max_q, p.max_k, p.heads, p.scale, out.ptr,
                            nullptr);
  }
};

} // namespace
#endif // PETREL_HAVE_CUDA

#ifdef PETREL_HAVE_CUDA
#define PETREL_REQUIRE_GPU()                                          \
  if (!gpu_available()) {                                             \
    MESSAGE("no CUDA device: skipped (runs on the device machine)"); \
    CHECK(true);                                                      \
    return;                                                           \
  }
#define PETREL_SKIP_WITHOUT_CUDA()
#else
#define PETREL_SKIP_WITHOUT_CUDA()          \
  MESSAGE("built without CUDA: skipped");   \
  CHECK(true);                              \
  return;
#endif

TEST_CASE("cuda mla decode: ragged small batch, partial head block, shuffled pages, NaN past the end") {
  PETREL_SKIP_WITHOUT_CUDA()
#ifdef PETREL_HAVE_CUDA
  PETREL_REQUIRE_GPU()
  for (float scale : {0.0417f, 0.25f}) {
    auto p = make_decode(5, 16, {1, 64, 65, 300, 2}, scale, 7);
    decode_buffers d(p);
    d.poison_out();
    auto st = d.run(p);
    REQUIRE_MESSAGE(st.ok(), st.message);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    expect_close(d.out.download(), decode_reference_cpu(p), "decode heads=16 scale=" + std::to_string(scale));
  }
#endif
}

TEST_CASE("cuda mla decode: 128 heads, two long sequences (split-KV + combine) vs the CPU reference") {
  PETREL_SKIP_WITHOUT_CUDA()
#ifdef PETREL_HAVE_CUDA
  PETREL_REQUIRE_GPU()
  auto p = make_decode(2, 128, {1000, 4096}, 0.1f, 11);
  MESSAGE("workspace bytes: " << mla_decode_workspace_bytes(p.batch, p.heads, p.max_seqlen));
  CHECK(mla_decode_workspace_bytes(p.batch, p.heads, p.max_seqlen) > 0);
  decode_buffers d(p);
  d.poison_out();
  auto st = d.run(p);
  REQUIRE_MESSAGE(st.ok(), st.message);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  expect_close(d.out.download(), decode_reference_cpu(p), "decode split batch=2 heads=128");
#endif
}

TEST_CASE("cuda mla decode: real shapes (batch 64 and 132, 128 heads, ragged up to 2048, seqlen 1) vs the fp32 CUDA reference") {
  PETREL_SKIP_WITHOUT_CUDA()
#ifdef PETREL_HAVE_CUDA
  PETREL_REQUIRE_GPU()
  for (int batch : {64, 132, 9}) {
    std::mt19937 rng(batch);
    std::uniform_int_distribution<int> len(1, 2048);
    std::vector<int> seqlens(batch);
    for (auto& s : seqlens) s = len(rng);
    seqlens[0] = 1;
    seqlens[batch - 1] = 2048;
    auto p = make_decode(batch, 128, seqlens, 0.1352f, 100 + batch);
    decode_buffers d(p);
    d.poison_out();
    auto st = d.run(p);
    REQUIRE_MESSAGE(st.ok(), st.message);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    expect_close(d.out.download(), decode_reference_gpu(p, d), "decode batch=" + std::to_string(batch) + " heads=128");
  }
#endif
}

TEST_CASE("cuda mla decode: a captured CUDA graph replays with new sequence lengths") {
  PETREL_SKIP_WITHOUT_CUDA()
#ifdef PETREL_HAVE_CUDA
  PETREL_REQUIRE_GPU()
  auto p = make_decode(6, 128, {1024, 1024, 1024, 1024, 1024, 1024}, 0.1f, 21);
  decode_buffers d(p);
  cudaStream_t stream;
  REQUIRE(cudaStreamCreate(&stream) == cudaSuccess);
  cudaGraph_t graph;
  REQUIRE(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal) == cudaSuccess);
  auto st = d.run(p, stream);
  REQUIRE(cudaStreamEndCapture(stream, &graph) == cudaSuccess);
  REQUIRE_MESSAGE(st.ok(), st.message);
  cudaGraphExec_t exec;
  REQUIRE(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess);
  for (const std::vector<int>& lens : {std::vector<int>{1024, 1, 500, 64, 65, 999}, std::vector<int>{3, 1024, 1, 128, 700, 2}}) {
    p.seqlens = lens;
    d.seqlens.upload(lens);
    d.poison_out();
    REQUIRE(cudaGraphLaunch(exec, stream) == cudaSuccess);
    REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
    expect_close(d.out.download(), decode_reference_gpu(p, d), "decode graph replay");
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
#endif
}

TEST_CASE("cuda mla decode: every page count from 1 to 9 in one split (both warpgroups' tails) vs the CPU reference") {
  PETREL_SKIP_WITHOUT_CUDA()
#ifdef PETREL_HAVE_CUDA
  PETREL_REQUIRE_GPU()
  // batch 72 x 128 heads runs unsplit: sequence b has 1 + b % 9 pages, the last one partial for odd b.
  std::vector<int> seqlens(72);
  for (int b = 0; b < 72; ++b) seqlens[b] = 64 * (1 + b % 9) - (b % 2 ? 17 + b % 40 : 0);
  auto p = make_decode(72, 128, seqlens, 0.1352f, 31);
  MESSAGE("workspace bytes (0 = unsplit): " << mla_decode_workspace_bytes(p.batch, p.heads, p.max_seqlen));
  decode_buffers d(p);
  d.poison_out();
  auto st = d.run(p);
  REQUIRE_MESSAGE(st.ok(), st.message);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  expect_close(d.out.download(), decode_reference_gpu(p, d), "decode page counts 1..9");
#endif
}

TEST_CASE("cuda mla decode: bad arguments are refused with a message") {
  PETREL_SKIP_WITHOUT_CUDA()
#ifdef PETREL_HAVE_CUDA
  PETREL_REQUIRE_GPU()
  auto p = make_decode(1, 128, {4096}, 0.1f, 3);
  decode_buffers d(p);
  auto st = mla_decode_bf16(d.q.ptr, d.kv.ptr, d.table.ptr, 2, d.seqlens.ptr, 1, 128, 4096, 0.1f, d.out.ptr, d.workspace.ptr,
                            d.workspace.count, nullptr);
  CHECK_FALSE(st.ok());
  CHECK(st.message.find("block_table_ld") != std::string::npos);
  st = mla_decode_bf16(d.q.ptr, d.kv.ptr, d.table.ptr, p.ld, d.seqlens.ptr, 1, 128, 4096, 0.1f, d.out.ptr, nullptr, 0, nullptr);
  CHECK_FALSE(st.ok());
  CHECK(st.message.find("workspace") != std::string::npos);
  st = mla_decode_bf16(d.q.ptr, d.kv.ptr, d.table.ptr, p.ld, d.seqlens.ptr, 1, 0, 4096, 0.1f, d.out.ptr, nullptr, 0, nullptr);
  CHECK_FALSE(st.ok());
#endif
}

TEST_CASE("cuda mla prefill: varlen causal (chunked: len_k > len_q, length 1, partial tiles) vs the CPU reference") {
  PETREL_SKIP_WITHOUT_CUDA()
#ifdef PETREL_HAVE_CUDA
  PETREL_REQUIRE_GPU()
  auto p = make_prefill(3, {{1, 1}, {5, 5}, {130, 130}, {70, 200}, {129, 300}, {1, 77}}, 0.0722f, 5);
  prefill_buffers d(p);
  auto st = d.run(p);
  REQUIRE_MESSAGE(st.ok(), st.message);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  expect_close(d.out.download(), prefill_reference_cpu(p), "prefill small");
#endif
}

TEST_CASE("cuda mla prefill: 16 heads, 1024 + 777 tokens vs the fp32 CUDA reference") {
  PETREL_SKIP_WITHOUT_CUDA()
#ifdef PETREL_HAVE_CUDA
  PETREL_REQUIRE_GPU()
  auto p = make_prefill(16, {{1024, 1024}, {777, 777}, {300, 1500}}, 0.1352f, 9);
  prefill_buffers d(p);
  auto st = d.run(p);
  REQUIRE_MESSAGE(st.ok(), st.message);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  device_buffer<float> ref(d.out.count);
  st = mla_prefill_reference_f32(d.q.ptr, d.k.ptr, d.v.ptr, d.cu_q.ptr, d.cu_k.ptr, p.num_seqs, p.max_q, p.max_k, p.heads,
                                 p.scale, ref.ptr, nullptr);
  REQUIRE_MESSAGE(st.ok(), st.message);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  expect_close(d.out.download(), ref.download(), "prefill 16 heads");
#endif
}
