// Layer kernels (kernels/cuda/layer_ops) against plain CPU references on random inputs.
// Compiles everywhere; without CUDA or without a GPU every case reports the skip and passes that check only.
#include <doctest/doctest.h>

#ifdef PETREL_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "tests/support/cuda_test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kernels/cuda/fp8_layout.hpp"
#include "kernels/cuda/layer_ops.hpp"

namespace {

using namespace petrel::cuda;

using petrel::test::gpu_available;

// -- number formats ---------------------------------------------------------------------------

std::uint16_t f2bf(float v) { return petrel::test::float_to_bf16(v); }
float bf2f(std::uint16_t b) { return petrel::test::bf16_to_float(b); }
float rbf(float v) { return bf2f(f2bf(v)); }

using petrel::test::e4m3_to_float;
using petrel::test::float_to_e4m3;

// The 1x128 quantisation of fp8_layout.hpp, on the CPU: bytes [rows, n], scales [n/128][ld(rows)].
void quantize_cpu(const std::vector<float>& x, std::int64_t rows, int n, std::vector<std::uint8_t>& q,
                  std::vector<float>& s) {
  const std::int64_t ld = fp8_scale_ld(rows);
  q.assign(rows * n, 0);
  s.assign((n / 128) * ld, 0.0f);
  for (std::int64_t r = 0; r < rows; ++r)
    for (int b = 0; b < n / 128; ++b) {
      float amax = 0;
      for (int i = 0; i < 128; ++i) amax = std::max(amax, std::fabs(x[r * n + b * 128 + i]));
      const float scale = std::max(amax, fp8_amax_floor) / fp8_e4m3_max;
      s[b * ld + r] = scale;
      for (int i = 0; i < 128; ++i) q[r * n + b * 128 + i] = float_to_e4m3(x[r * n + b * 128 + i] / scale);
    }
}

// -- device buffers ---------------------------------------------------------------------------

template <typename T>
struct dbuf {
  T* ptr = nullptr;
  std::size_t count = 0;
  explicit dbuf(std::size_t n) : count(n) { REQUIRE(cudaMalloc(reinterpret_cast<void**>(&ptr), std::max<std::size_t>(n, 1) * sizeof(T)) == cudaSuccess); }
  explicit dbuf(const std::vector<T>& h) : dbuf(h.size()) { up(h); }
  ~dbuf() { cudaFree(ptr); }
  void up(const std::vector<T>& h) { REQUIRE(cudaMemcpy(ptr, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess); }
  void poison() { REQUIRE(cudaMemset(ptr, 0x7F, count * sizeof(T)) == cudaSuccess); }
  std::vector<T> down() const {
    std::vector<T> h(count);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    REQUIRE(cudaMemcpy(h.data(), ptr, count * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
    return h;
  }
};

std::vector<std::uint16_t> random_bf16(std::size_t n, std::mt19937& rng, float lo = -2.0f, float hi = 2.0f) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<std::uint16_t> v(n);
  for (auto& x : v) x = f2bf(d(rng));
  return v;
}

void require_ok(const kernel_status& s) {
  INFO(s.message);
  REQUIRE(s.ok());
}

} // namespace

#define SKIP_WITHOUT_GPU()                                   \
  if (!gpu_available()) {                                    \
    MESSAGE("no CUDA device: layer-op checks skipped");      \
    CHECK(true);                                             \
    return;                                                  \
  }

TEST_CASE("rmsnorm_bf16: residual add, bf16 and fused fp8 outputs match the CPU") {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(11);
  for (int n : {7168, 512}) {
    const std::int64_t rows = 37, x_ld = n == 512 ? 2112 : n;
    auto x = random_bf16(rows * x_ld, rng), res = random_bf16(rows * n, rng), w = random_bf16(n, rng, 0.5f, 1.5f);
    dbuf<std::uint16_t> dx(x), dres(res), dw(w), dout(rows * n);
    dbuf<std::uint8_t> dq(rows * n);
    dbuf<float> ds(fp8_act_scale_count(rows, n));
    dout.poison();
    const bool add = n == 7168;
    require_ok(rmsnorm_bf16(dx.ptr, x_ld, dres.ptr, add, dw.ptr, rows, n, 1e-6f, dout.ptr, n, dq.ptr, ds.ptr, nullptr));
    auto out = dout.down();
    auto new_res = dres.down();
    double worst = 0;
    std::vector<float> gpu_out(rows * n);
    for (std::int64_t r = 0; r < rows; ++r) {
      std::vector<float> v(n);
      double ss = 0;
      for (int i = 0; i < n; ++i) {
        v[i] = bf2f(x[r * x_ld + i]);
        if (add) v[i] = rbf(v[i] + bf2f(res[r * n + i]));
        REQUIRE(bf2f(new_res[r * n + i]) == v[i]);
        ss += double(v[i]) * v[i];
      }
      const float rstd = float(1.0 / std::sqrt(ss / n + 1e-6));
      for (int i = 0; i < n; ++i) {
        const float ref = rbf(bf2f(w[i]) * rbf(v[i] * rstd));
        const float got = bf2f(out[r * n + i]);
        gpu_out[r * n + i] = got;
        worst = std::max(worst, double(std::fabs(got - ref)) / (std::fabs(ref) + 1e-2));
      }
    }
    MESSAGE("rmsnorm n=" << n << " worst relative error " << worst);
    CHECK(worst < 1.6e-2);  // at most about one bf16 ulp apart (rsqrtf vs double sqrt)
    std::vector<std::uint8_t> q_ref;
    std::vector<float> s_ref;
    quantize_cpu(gpu_out, rows, n, q_ref, s_ref);
    auto q = dq.down();
    auto s = ds.down();
    CHECK(q == q_ref);
    for (std::int64_t b = 0; b < n / 128; ++b)
      for (std::int64_t r = 0; r < rows; ++r) REQUIRE(s[b * fp8_scale_ld(rows) + r] == s_ref[b * fp8_scale_ld(rows) + r]);
  }
}

TEST_CASE("rope_interleaved_bf16: pairs rotate by the YaRN table, in place and out of place") {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(12);
  const int rows = 9, heads = 3, hs = 192, rope = 64, max_pos = 5000;
  std::vector<float> inv(rope / 2);
  for (int i = 0; i < rope / 2; ++i) inv[i] = float(1.0 / std::pow(10000.0, 2.0 * i / rope)) * (i > 20 ? 0.025f : 1.0f);
  auto table = rope_cos_sin_table(inv, max_pos, 1.0f);
  std::vector<int> pos(rows);
  for (int r = 0; r < rows; ++r) pos[r] = (r * 557) % max_pos;
  auto x = random_bf16(rows * heads * hs, rng);
  dbuf<std::uint16_t> dx(x), dout(rows * heads * rope);
  dbuf<int> dpos(pos);
  dbuf<float> dtab(table);
  // out of place: x[:, h, 128:192] -> out[:, h, 0:64]; then in place on x
  require_ok(rope_interleaved_bf16(dx.ptr + 128, heads * hs, hs, dout.ptr, heads * rope, rope, rows, heads, rope, dpos.ptr,
                                   dtab.ptr, max_pos, nullptr));
  require_ok(rope_interleaved_bf16(dx.ptr + 128, heads * hs, hs, dx.ptr + 128, heads * hs, hs, rows, heads, rope, dpos.ptr,
                                   dtab.ptr, max_pos, nullptr));
  auto out = dout.down();
  auto xin = dx.down();
  // the scalar path (a row stride that is no multiple of 8) computes the same bytes as the 16-byte path
  dbuf<std::uint16_t> dx2(x), dout2(rows * (heads * rope + 2));
  require_ok(rope_interleaved_bf16(dx2.ptr + 128, heads * hs, hs, dout2.ptr, heads * rope + 2, rope, rows, heads, rope,
                                   dpos.ptr, dtab.ptr, max_pos, nullptr));
  auto out2 = dout2.down();
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < heads * rope; ++i) REQUIRE(out2[r * (heads * rope + 2) + i] == out[r * heads * rope + i]);
  double worst = 0;
  for (int r = 0; r < rows; ++r)
    for (int h = 0; h < heads; ++h) {
      for (int d = 0; d < 128; ++d) REQUIRE(xin[(r * heads + h) * hs + d] == x[(r * heads + h) * hs + d]);
      for (int i = 0; i < rope / 2; ++i) {
        const double angle = double(float(pos[r]) * inv[i]);
        const double c = std::cos(angle), s = std::sin(angle);
        const double x0 = bf2f(x[(r * heads + h) * hs + 128 + 2 * i]), x1 = bf2f(x[(r * heads + h) * hs + 128 + 2 * i + 1]);
        const double r0 = x0 * c - x1 * s, r1 = x1 * c + x0 * s;
        for (int k = 0; k < 2; ++k) {
          const double ref = k == 0 ? r0 : r1;
          const double got = bf2f(out[(r * heads + h) * rope + 2 * i + k]);
          REQUIRE(got == bf2f(xin[(r * heads + h) * hs + 128 + 2 * i + k]));
          worst = std::max(worst, std::fabs(got - ref) / (std::fabs(ref) + 1e-2));
        }
      }
    }
  MESSAGE("rope worst relative error " << worst);
  CHECK(worst < 1e-2);
}

TEST_CASE("swiglu_bf16: silu(gate)*up with fused fp8, skipping padding rows and masked rows") {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(13);
  const std::int64_t rows = 256;
  const int n = 384;
  auto gu = random_bf16(rows * 2 * n, rng, -4.0f, 4.0f);
  std::vector<int> expert(rows);
  for (std::int64_t r = 0; r < rows; ++r) expert[r] = (r % 128) < 100 ? int(r / 128) : -1;
  dbuf<std::uint16_t> dgu(gu), dout(rows * n);
  dbuf<std::uint8_t> dq(rows * n);
  dbuf<float> ds(fp8_act_scale_count(rows, n));
  dbuf<int> dexp(expert);
  dout.poison();
  dq.poison();
  require_ok(swiglu_bf16(dgu.ptr, rows, n, dout.ptr, dq.ptr, ds.ptr, dexp.ptr, nullptr, 0, nullptr));
  auto out = dout.down();
  auto q = dq.down();
  double worst = 0;
  std::vector<float> got_rows;
  std::vector<std::int64_t> valid;
  for (std::int64_t r = 0; r < rows; ++r) {
    if (expert[r] < 0) {
      REQUIRE(out[r * n] == 0x7F7F);  // untouched
      REQUIRE(q[r * n] == 0x7F);
      continue;
    }
    valid.push_back(r);
    for (int i = 0; i < n; ++i) {
      const double g = bf2f(gu[r * 2 * n + i]), u = bf2f(gu[r * 2 * n + n + i]);
      const double ref = g / (1.0 + std::exp(-g)) * u;
      const double got = bf2f(out[r * n + i]);
      worst = std::max(worst, std::fabs(got - ref) / (std::fabs(ref) + 1e-2));
    }
  }
  MESSAGE("swiglu worst relative error " << worst);
  CHECK(worst < 1e-2);
  // fp8 bytes and scales equal the CPU quantisation of the GPU's bf16 result
  std::vector<float> all(rows * n);
  for (std::int64_t i = 0; i < rows * n; ++i) all[i] = bf2f(out[i]);
  std::vector<std::uint8_t> q_ref;
  std::vector<float> s_ref;
  quantize_cpu(all, rows, n, q_ref, s_ref);
  auto s = ds.down();
  for (auto r : valid) {
    for (int i = 0; i < n; ++i) REQUIRE(q[r * n + i] == q_ref[r * n + i]);
    for (int b = 0; b < n / 128; ++b) REQUIRE(s[b * fp8_scale_ld(rows) + r] == s_ref[b * fp8_scale_ld(rows) + r]);
  }
  // masked layout: 4 groups of 64 rows, counts 0, 5, 64, 17
  std::vector<int> counts = {0, 5, 64, 17};
  dbuf<int> dcounts(counts);
  dout.poison();
  require_ok(swiglu_bf16(dgu.ptr, rows, n, dout.ptr, nullptr, nullptr, nullptr, dcounts.ptr, 64, nullptr));
  out = dout.down();
  for (std::int64_t r = 0; r < rows; ++r) {
    const bool live = (r % 64) < counts[r / 64];
    CHECK_MESSAGE((out[r * n + 7] != 0x7F7F) == live, "row " << r);
  }
}

TEST_CASE("swiglu_bf16: more rows than one grid holds (the GPU expert plane's contiguous layout of a big prefill)") {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(17);
  const std::int64_t rows = 65535 + 4100; // two launches
  const int n = 128;
  auto gu = random_bf16(rows * 2 * n, rng, -4.0f, 4.0f);
  dbuf<std::uint16_t> dgu(gu), dout(rows * n);
  dbuf<std::uint8_t> dq(rows * n);
  dbuf<float> ds(fp8_act_scale_count(rows, n));
  dout.poison();
  require_ok(swiglu_bf16(dgu.ptr, rows, n, dout.ptr, dq.ptr, ds.ptr, nullptr, nullptr, 0, nullptr));
  const auto out = dout.down();
  const auto sc = ds.down();
  double worst = 0;
  for (std::int64_t r : {std::int64_t(0), std::int64_t(65534), std::int64_t(65535), std::int64_t(65536), rows - 1})
    for (int i = 0; i < n; ++i) {
      const double g = bf2f(gu[r * 2 * n + i]), u = bf2f(gu[r * 2 * n + n + i]);
      const double ref = g / (1.0 + std::exp(-g)) * u;
      worst = std::max(worst, std::fabs(bf2f(out[r * n + i]) - ref) / (std::fabs(ref) + 1e-2));
    }
  CHECK(worst < 1e-2);
  CHECK(sc[rows - 1] > 0.0f); // the last row's scale was written by the second launch
}

namespace {
// DESIGN.md's noaux_tc semantics on the CPU (double sums, -inf group mask).
void route_cpu(const std::vector<float>& logits, const std::vector<float>& bias, int tokens, int experts, int groups,
               int topk_group, int top_k, float scaling, std::vector<int>& ids, std::vector<float>& w) {
  ids.assign(tokens * top_k, -1);
  w.assign(tokens * top_k, 0);
  const int gs = experts / groups;
  for (int t = 0; t < tokens; ++t) {
    std::vector<float> s(experts), c(experts);
    for (int e = 0; e < experts; ++e) {
      s[e] = 1.0f / (1.0f + std::exp(-logits[t * experts + e]));
      c[e] = s[e] + bias[e];
    }
    std::vector<std::pair<float, int>> gscore;
    for (int g = 0; g < groups; ++g) {
      std::vector<float> v(c.begin() + g * gs, c.begin() + (g + 1) * gs);
      std::partial_sort(v.begin(), v.begin() + 2, v.end(), std::greater<float>());
      gscore.push_back({v[0] + v[1], g});
    }
    std::stable_sort(gscore.begin(), gscore.end(), [](auto a, auto b) { return a.first > b.first; });
    std::vector<bool> kept(groups, false);
    for (int g = 0; g < topk_group; ++g) kept[gscore[g].second] = true;
    std::vector<std::pair<float, int>> cand;
    for (int e = 0; e < experts; ++e) cand.push_back({kept[e / gs] ? c[e] : -INFINITY, e});
    std::stable_sort(cand.begin(), cand.end(), [](auto a, auto b) { return a.first > b.first; });
    double sum = 0;
    for (int j = 0; j < top_k; ++j) sum += s[cand[j].second];
    for (int j = 0; j < top_k; ++j) {
      ids[t * top_k + j] = cand[j].second;
      w[t * top_k + j] = float(s[cand[j].second] / (sum + 1e-20) * scaling);
    }
  }
}
} // namespace

TEST_CASE("noaux_tc_route: DeepSeek-V3 grouped top-k matches the CPU reference") {
  SKIP_WITHOUT_GPU();
  struct cfg { int experts, groups, topk_group, top_k; };
  for (cfg c : {cfg{256, 8, 4, 8}, cfg{64, 8, 3, 6}, cfg{32, 4, 2, 4}}) {
    std::mt19937 rng(14 + c.experts);
    std::normal_distribution<float> d(0.0f, 2.0f);
    std::uniform_real_distribution<float> b(-0.3f, 0.3f);
    const int tokens = 300;
    std::vector<float> logits(tokens * c.experts), bias(c.experts);
    for (auto& v : logits) v = d(rng);
    for (auto& v : bias) v = b(rng);
    dbuf<float> dl(logits), db(bias), dw(tokens * c.top_k);
    dbuf<int> di(tokens * c.top_k);
    require_ok(noaux_tc_route(dl.ptr, db.ptr, tokens, c.experts, c.groups, c.topk_group, c.top_k, true, 2.5f, di.ptr, dw.ptr, nullptr));
    std::vector<int> ids_ref;
    std::vector<float> w_ref;
    route_cpu(logits, bias, tokens, c.experts, c.groups, c.topk_group, c.top_k, 2.5f, ids_ref, w_ref);
    auto ids = di.down();
    auto w = dw.down();
    int mismatched = 0;
    double worst = 0;
    for (int i = 0; i < tokens * c.top_k; ++i) {
      if (ids[i] != ids_ref[i]) ++mismatched;
      worst = std::max(worst, double(std::fabs(w[i] - w_ref[i])) / std::fabs(w_ref[i]));
    }
    MESSAGE("route experts=" << c.experts << ": " << mismatched << " id mismatches, worst weight error " << worst);
    CHECK(mismatched == 0);
    CHECK(worst < 1e-5);
    float sum0 = 0;
    for (int j = 0; j < c.top_k; ++j) sum0 += w[j];
    CHECK(sum0 == doctest::Approx(2.5).epsilon(1e-5));
  }
  // bad shapes are refused, not crashed
  CHECK_FALSE(noaux_tc_route(nullptr, nullptr, 1, 48, 8, 4, 8, true, 1.0f, nullptr, nullptr, nullptr).ok());
  CHECK_FALSE(noaux_tc_route(nullptr, nullptr, 1, 256, 8, 9, 8, true, 1.0f, nullptr, nullptr, nullptr).ok());
}

TEST_CASE("moe_permute_contiguous + moe_combine_bf16: every pair lands in its expert's aligned segment, combine sums") {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(15);
  const int tokens = 150, top_k = 8, k = 256, L = 5, hidden = 256;
  std::uniform_int_distribution<int> pick(-3, L - 1);
  std::vector<int> topk(tokens * top_k);
  for (auto& e : topk) e = std::max(pick(rng), -1);
  std::vector<std::uint8_t> x(tokens * k);
  for (auto& v : x) v = static_cast<std::uint8_t>(rng() % 0x7E);
  std::vector<float> xs(fp8_act_scale_count(tokens, k));
  for (auto& v : xs) v = float(rng() % 1000 + 1) * 1e-3f;
  const std::int64_t cap = moe_contiguous_capacity(tokens * top_k, L);
  dbuf<std::uint8_t> dx(x), da(cap * k);
  dbuf<float> dxs(xs), das(fp8_act_scale_count(cap, k));
  dbuf<int> dtopk(topk), dmi(cap), dpr(tokens * top_k), dws(moe_permute_workspace_ints(L));
  require_ok(moe_permute_contiguous(dx.ptr, dxs.ptr, tokens, k, dtopk.ptr, top_k, L, cap, da.ptr, das.ptr, dmi.ptr, dpr.ptr,
                                    dws.ptr, nullptr));
  auto a = da.down();
  auto as = das.down();
  auto mi = dmi.down();
  auto pr = dpr.down();
  auto ws = dws.down();
  CHECK(ws[0] == 0);
  std::vector<int> count(L, 0);
  for (int e : topk) if (e >= 0) ++count[e];
  // segments: experts in id order, each starting at a multiple of 128
  std::int64_t start = 0;
  for (int e = 0; e < L; ++e) {
    for (std::int64_t r = start; r < start + count[e]; ++r) REQUIRE(mi[r] == e);
    const std::int64_t end = start + (count[e] + 127) / 128 * 128;
    for (std::int64_t r = start + count[e]; r < end; ++r) REQUIRE(mi[r] == -1);
    start = end;
  }
  for (std::int64_t r = start; r < cap; ++r) REQUIRE(mi[r] == -1);
  std::set<int> used;
  for (int p = 0; p < tokens * top_k; ++p) {
    if (topk[p] < 0) { REQUIRE(pr[p] == -1); continue; }
    const int row = pr[p];
    REQUIRE(row >= 0);
    REQUIRE(mi[row] == topk[p]);
    REQUIRE(used.insert(row).second);
    const int t = p / top_k;
    REQUIRE(std::equal(a.begin() + std::int64_t(row) * k, a.begin() + std::int64_t(row + 1) * k, x.begin() + std::int64_t(t) * k));
    for (int b = 0; b < k / 128; ++b) REQUIRE(as[b * fp8_scale_ld(cap) + row] == xs[b * fp8_scale_ld(tokens) + t]);
  }
  // combine: out[t] = sum_j w * Y[row] + shared[t]
  auto y = random_bf16(cap * hidden, rng), shared = random_bf16(tokens * hidden, rng);
  std::vector<float> w(tokens * top_k);
  for (auto& v : w) v = float(rng() % 1000) * 1e-3f;
  dbuf<std::uint16_t> dy(y), dsh(shared), dout(tokens * hidden);
  dbuf<float> dw(w);
  require_ok(moe_combine_bf16(dy.ptr, dpr.ptr, dw.ptr, tokens, top_k, hidden, dsh.ptr, dout.ptr, nullptr));
  auto out = dout.down();
  double worst = 0;
  for (int t = 0; t < tokens; ++t)
    for (int c = 0; c < hidden; ++c) {
      double ref = bf2f(shared[t * hidden + c]);
      for (int j = 0; j < top_k; ++j)
        if (pr[t * top_k + j] >= 0) ref += double(w[t * top_k + j]) * bf2f(y[std::int64_t(pr[t * top_k + j]) * hidden + c]);
      worst = std::max(worst, std::fabs(bf2f(out[t * hidden + c]) - ref) / (std::fabs(ref) + 1e-1));
    }
  MESSAGE("combine worst relative error " << worst);
  CHECK(worst < 1e-2);
}

TEST_CASE("moe_permute_masked: per-expert counts, rows inside each expert's block, overflow dropped and flagged") {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(16);
  const int tokens = 40, top_k = 8, k = 128, L = 4, max_m = 64;
  std::vector<int> topk(tokens * top_k, -1);
  for (int p = 0; p < tokens * top_k; ++p) {
    if (p % 3 == 0) topk[p] = 0;            // 107 pairs for expert 0: overflows max_m
    else if (p % 7 == 1) topk[p] = 2;
    else if (p % 11 == 2) topk[p] = 3;
  }
  std::vector<std::uint8_t> x(tokens * k);
  for (auto& v : x) v = static_cast<std::uint8_t>(rng() % 0x7E);
  std::vector<float> xs(fp8_act_scale_count(tokens, k), 0.5f);
  dbuf<std::uint8_t> dx(x), da(L * max_m * k);
  dbuf<float> dxs(xs), das(fp8_act_scale_count(L * max_m, k));
  dbuf<int> dtopk(topk), dm(L), dpr(tokens * top_k), dws(moe_permute_workspace_ints(L));
  require_ok(moe_permute_masked(dx.ptr, dxs.ptr, tokens, k, dtopk.ptr, top_k, L, max_m, da.ptr, das.ptr, dm.ptr, dpr.ptr,
                                dws.ptr, nullptr));
  auto m = dm.down();
  auto pr = dpr.down();
  auto a = da.down();
  auto ws = dws.down();
  std::vector<int> count(L, 0);
  for (int e : topk) if (e >= 0) ++count[e];
  REQUIRE(count[0] > max_m);
  for (int e = 0; e < L; ++e) CHECK(m[e] == std::min(count[e], max_m));
  CHECK(ws[0] == 1);
  std::vector<int> placed(L, 0);
  std::set<int> used;
  for (int p = 0; p < tokens * top_k; ++p) {
    if (pr[p] < 0) continue;
    const int e = topk[p];
    REQUIRE(e >= 0);
    REQUIRE(pr[p] / max_m == e);
    REQUIRE(pr[p] % max_m < m[e]);
    REQUIRE(used.insert(pr[p]).second);
    ++placed[e];
    REQUIRE(std::equal(a.begin() + std::int64_t(pr[p]) * k, a.begin() + std::int64_t(pr[p] + 1) * k, x.begin() + (p / top_k) * k));
  }
  for (int e = 0; e < L; ++e) CHECK(placed[e] == m[e]);

  // more pairs than the one-CTA path takes: the three-launch path, same contract
  const int tokens2 = 2100;
  std::vector<int> topk2(tokens2 * top_k, -1);
  for (int p = 0; p < tokens2 * top_k; ++p)
    if (p % 97 == 0) topk2[p] = (p / 97) % L;
  std::vector<std::uint8_t> x2(std::size_t(tokens2) * k);
  for (auto& v : x2) v = static_cast<std::uint8_t>(rng() % 0x7E);
  std::vector<float> xs2(fp8_act_scale_count(tokens2, k), 0.25f);
  dbuf<std::uint8_t> dx2(x2);
  dbuf<float> dxs2(xs2);
  dbuf<int> dtopk2(topk2), dpr2(tokens2 * top_k);
  require_ok(moe_permute_masked(dx2.ptr, dxs2.ptr, tokens2, k, dtopk2.ptr, top_k, L, max_m, da.ptr, das.ptr, dm.ptr, dpr2.ptr,
                                dws.ptr, nullptr));
  m = dm.down();
  auto pr2 = dpr2.down();
  a = da.down();
  std::vector<int> count2(L, 0);
  for (int e : topk2) if (e >= 0) ++count2[e];
  for (int e = 0; e < L; ++e) CHECK(m[e] == std::min(count2[e], max_m));
  int placed2 = 0;
  for (int p = 0; p < tokens2 * top_k; ++p) {
    if (pr2[p] < 0) continue;
    ++placed2;
    REQUIRE(pr2[p] / max_m == topk2[p]);
    REQUIRE(std::equal(a.begin() + std::int64_t(pr2[p]) * k, a.begin() + std::int64_t(pr2[p] + 1) * k,
                       x2.begin() + std::int64_t(p / top_k) * k));
  }
  int expect2 = 0;
  for (int e = 0; e < L; ++e) expect2 += std::min(count2[e], max_m);
  CHECK(placed2 == expect2);
}

TEST_CASE("argmax_bf16: greedy ids over a full vocabulary, ties to the lower id") {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(17);
  const int rows = 3, vocab = 129280;
  auto logits = random_bf16(rows * vocab, rng, -5.0f, 5.0f);
  logits[0 * vocab + 77777] = f2bf(9.0f);
  logits[1 * vocab + 129279] = f2bf(9.5f);
  logits[2 * vocab + 5000] = f2bf(8.0f);
  logits[2 * vocab + 90000] = f2bf(8.0f);
  dbuf<std::uint16_t> dl(logits);
  dbuf<int> di(rows);
  require_ok(argmax_bf16(dl.ptr, rows, vocab, vocab, di.ptr, nullptr));
  auto ids = di.down();
  CHECK(ids[0] == 77777);
  CHECK(ids[1] == 129279);
  CHECK(ids[2] == 5000);
}

TEST_CASE("MLA pieces: K/V assembly, latent cache store, masked softmax") {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(18);
  const int T = 6, H = 4, nope = 128, rope = 64, vd = 128, lat_ld = 576;
  auto kvb = random_bf16(T * H * (nope + vd), rng), lat = random_bf16(T * lat_ld, rng);
  dbuf<std::uint16_t> dkvb(kvb), dlat(lat), dk(T * H * (nope + rope)), dv(T * H * vd);
  require_ok(mla_assemble_kv_bf16(dkvb.ptr, dlat.ptr, lat_ld, 512, T, H, nope, rope, vd, dk.ptr, dv.ptr, nullptr));
  auto k = dk.down();
  auto v = dv.down();
  for (int t = 0; t < T; ++t)
    for (int h = 0; h < H; ++h) {
      for (int d = 0; d < nope; ++d) REQUIRE(k[(t * H + h) * 192 + d] == kvb[(t * H + h) * 256 + d]);
      for (int d = 0; d < rope; ++d) REQUIRE(k[(t * H + h) * 192 + nope + d] == lat[t * lat_ld + 512 + d]);
      for (int d = 0; d < vd; ++d) REQUIRE(v[(t * H + h) * vd + d] == kvb[(t * H + h) * 256 + nope + d]);
    }
  std::vector<int> slots = {70, 3, -1, 64, 0, 127};
  dbuf<int> dslots(slots);
  dbuf<std::uint16_t> cache(128 * 576);
  cache.poison();
  require_ok(kv_cache_store_bf16(dlat.ptr, lat_ld, T, dslots.ptr, 576, cache.ptr, nullptr));
  auto c = cache.down();
  for (int t = 0; t < T; ++t) {
    if (slots[t] < 0) continue;
    for (int d = 0; d < 576; ++d) REQUIRE(c[slots[t] * 576 + d] == lat[t * lat_ld + d]);
  }
  CHECK(c[1 * 576] == 0x7F7F);
  // softmax: causal period 5 (rows 0..9 = two heads of 5 queries), 5 columns
  auto s = random_bf16(10 * 8, rng, -3.0f, 3.0f);
  dbuf<std::uint16_t> ds(s);
  require_ok(masked_softmax_bf16(ds.ptr, 10, 5, 8, 0.7f, 5, 0, 0, nullptr));
  auto p = ds.down();
  for (int r = 0; r < 10; ++r) {
    const int limit = r % 5 + 1;
    double m = -1e30, sum = 0;
    for (int j = 0; j < limit; ++j) m = std::max(m, 0.7 * bf2f(s[r * 8 + j]));
    for (int j = 0; j < limit; ++j) sum += std::exp(0.7 * bf2f(s[r * 8 + j]) - m);
    for (int j = 0; j < 5; ++j) {
      const double ref = j < limit ? std::exp(0.7 * bf2f(s[r * 8 + j]) - m) / sum : 0.0;
      CHECK(std::fabs(bf2f(p[r * 8 + j]) - ref) < 4e-3);
    }
    CHECK(p[r * 8 + 6] == s[r * 8 + 6]);  // past cols: untouched
  }
}

TEST_CASE("layer ops refuse bad shapes with a message") {
  SKIP_WITHOUT_GPU();
  auto s = rmsnorm_bf16(nullptr, 100, nullptr, false, nullptr, 1, 100, 1e-6f, nullptr, 100, nullptr, nullptr, nullptr);
  CHECK_FALSE(s.ok());
  CHECK(s.message.find("rmsnorm_bf16") != std::string::npos);
  CHECK_FALSE(swiglu_bf16(nullptr, 4, 100, nullptr, nullptr, nullptr, nullptr, nullptr, 0, nullptr).ok());
  CHECK_FALSE(moe_permute_contiguous(nullptr, nullptr, 1, 128, nullptr, 8, 4, 100, nullptr, nullptr, nullptr, nullptr,
                                     nullptr, nullptr).ok());
  CHECK(moe_contiguous_capacity(4608, 9) == 5760);
}

#endif

#include <cstdio>
#include <string>
#include <sys/wait.h>

#include "tests/support/process.hpp"

#ifndef PETREL_HAVE_CUDA
// Without CUDA in the build, bench-rank says so instead of pretending to run.
TEST_CASE("bench-rank in a build without CUDA exits 1 naming the missing backend") {
  const std::string cmd = petrel::test::petrel_binary() + " bench-rank --preset decode-ep72 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  REQUIRE(p);
  std::string out;
  char buf[256];
  while (size_t n = fread(buf, 1, sizeof buf, p))
    out.append(buf, n);
  const int status = ::pclose(p);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 1);
  CHECK(out.find("no CUDA backend") != std::string::npos);
}
#else
// The benchmark that strings these kernels into a DeepSeek-V3 rank checks its flags before touching a GPU.
TEST_CASE("bench-rank refuses bad settings with exit code 2 (no GPU needed)") {
  auto rc = [](const std::string& args) {
    const std::string cmd = petrel::test::petrel_binary() + " bench-rank " + args + " >/dev/null 2>&1";
    const int status = std::system(cmd.c_str());
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  };
  CHECK(rc("--preset prefill-ep99") == 2);
  CHECK(rc("--preset decode-ep72 --tokens 100") == 2);     // a prefill flag on decode
  CHECK(rc("--preset prefill-ep32 --tokens 1000 --prompts 3") == 2);
  CHECK(rc("--preset prefill-ep32 --imbalance 0.5") == 2);
  CHECK(rc("--preset prefill-ep32 --imbalance nofile") == 2);
  CHECK(rc("--preset decode-ep72 --a2a-model bandwidth=3") == 2);
  CHECK(rc("--preset decode-ep72 --graphs maybe") == 2);
  CHECK(rc("--preset decode-ep72 --layers 62") == 2);
  CHECK(rc("") != 0);  // --preset is required
}
#endif
