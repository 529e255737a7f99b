// The cuda backend (kernels/cuda/cuda_backend.*) against the cpu backend: every op on random inputs at
// DeepSeek-V3 shapes, the allocator, the error classes, CUDA graph capture, and whole models (the Hugging Face
// golden fixtures, fortune-moe; with PETREL_CUDA_BIG=1 also a 2-layer model at full DeepSeek-V3 width).
// Compiles everywhere; without CUDA or without a GPU every case says so and passes.
// Each comparison prints a line "RESULT <what> rel_l2=<x> max_rel=<y>" (tools/device/run_cuda_bench.sh collects them).
#include <doctest/doctest.h>

#include <cstdlib>
#include <string>

#include "runtime/backend.hpp"

#ifdef PETREL_HAVE_CUDA
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <sys/wait.h>
#include <unistd.h>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>

#include "kernels/cuda/cuda_backend.hpp"
#include "model_graphs_check.hpp"
#include "runtime/generation.hpp"
#include "runtime/kv_cache.hpp"
#include "runtime/model.hpp"

using namespace petrel;
using petrel::kernels::cuda_backend;
namespace fs = std::filesystem;

namespace {

/// Repository root: PETREL_SOURCE_DIR from the environment (device runs), else the build's.
fs::path source_dir() {
  const char* e = std::getenv("PETREL_SOURCE_DIR");
  return fs::path(e && *e ? e : PETREL_SOURCE_DIR);
}

bool gpu_present() {
  static const bool yes = [] {
    std::string why;
    int n = kernels::cuda_device_count(&why);
    if (n == 0) MESSAGE("no CUDA device (", why, "): cuda backend tests skipped");
    return n > 0;
  }();
  return yes;
}

struct rig {
  std::unique_ptr<backend> cpu = make_backend("cpu");
  std::unique_ptr<backend> gpu = make_backend("cuda");
  cuda_backend& cuda() { return static_cast<cuda_backend&>(*gpu); }
};

rig& the_rig() {
  static rig r;
  return r;
}

std::mt19937_64& rng() {
  static std::mt19937_64 g(std::random_device{}());
  return g;
}

std::vector<float> randn(size_t n, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng());
  return v;
}

/// The same contents on both backends.
struct twin {
  device_buffer c, g;
  size_t bytes = 0;
  float* cf() const { return c.f32(); }
  float* gf() const { return g.f32(); }
  int32_t* ci() const { return c.i32(); }
  int32_t* gi() const { return g.i32(); }
};

template <typename T>
twin make_twin(const std::vector<T>& host) {
  rig& r = the_rig();
  twin t;
  t.bytes = host.size() * sizeof(T);
  t.c = r.cpu->allocate(t.bytes);
  t.g = r.gpu->allocate(t.bytes);
  r.cpu->copy_to_device(t.c.data(), host.data(), t.bytes);
  r.gpu->copy_to_device(t.g.data(), host.data(), t.bytes);
  return t;
}
twin make_twin_f(size_t n, float scale = 1.0f) { return make_twin(randn(n, scale)); }

template <typename T = float>
std::vector<T> cpu_vec(const twin& t) {
  std::vector<T> v(t.bytes / sizeof(T));
  std::memcpy(v.data(), t.c.data(), t.bytes);
  return v;
}
template <typename T = float>
std::vector<T> gpu_vec(const twin& t) {
  std::vector<T> v(t.bytes / sizeof(T));
  the_rig().gpu->copy_to_host(v.data(), t.g.data(), t.bytes);
  return v;
}

struct errors {
  double rel_l2 = 0, max_rel = 0; // ||d|| / ||ref||, max |d| / max |ref|
  bool finite = true;
};

errors compare(const std::vector<float>& ref, const std::vector<float>& got) {
  errors e;
  double dd = 0, rr = 0, md = 0, mr = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) e.finite = false;
    const double d = double(got[i]) - ref[i];
    dd += d * d;
    rr += double(ref[i]) * ref[i];
    md = std::max(md, std::fabs(d));
    mr = std::max(mr, std::fabs(double(ref[i])));
  }
  e.rel_l2 = rr > 0 ? std::sqrt(dd / rr) : std::sqrt(dd);
  e.max_rel = mr > 0 ? md / mr : md;
  return e;
}

/// Compares the twin's cpu and gpu contents; prints a RESULT line; checks rel_l2 <= tol.
errors check_twin(const char* what, const twin& t, double tol) {
  errors e = compare(cpu_vec(t), gpu_vec(t));
  std::printf("RESULT %s rel_l2=%.3g max_rel=%.3g\n", what, e.rel_l2, e.max_rel);
  const std::string name = what;
  CAPTURE(name);
  CHECK(e.finite);
  CHECK(e.rel_l2 <= tol);
  return e;
}

mat_view cview(const twin& t, int64_t r, int64_t c, int64_t ld) { return {t.cf(), r, c, ld}; }
mat_view gview(const twin& t, int64_t r, int64_t c, int64_t ld) { return {t.gf(), r, c, ld}; }

} // namespace

// -- ops at DeepSeek-V3 shapes ------------------------------------------------------------------------------

TEST_CASE("cuda backend: gemm (cuBLAS fp32, TF32 off) in every transpose, with ld and beta") {
  if (!gpu_present()) return;
  rig& r = the_rig();
  {
    // q_a_proj of 32 tokens: [32, 7168] x [1536, 7168]^T
    const int64_t M = 32, K = 7168, N = 1536;
    twin x = make_twin_f(size_t(M * K)), w = make_twin_f(size_t(N * K), 0.02f), y = make_twin_f(size_t(M * N));
    r.cpu->linear(cview(x, M, K, K), w.cf(), cview(y, M, N, N));
    r.gpu->linear(gview(x, M, K, K), w.gf(), gview(y, M, N, N));
    check_twin("gemm_linear_32x1536x7168", y, 1e-5);
  }
  const int64_t M = 96, N = 576, K = 512;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      const int64_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 5, ldc = N + 7;
      twin a = make_twin_f(size_t((ta ? K : M) * lda)), b = make_twin_f(size_t((tb ? N : K) * ldb)),
           c = make_twin_f(size_t(M * ldc));
      r.cpu->gemm(ta, tb, M, N, K, 0.75f, a.cf(), lda, b.cf(), ldb, 0.5f, c.cf(), ldc);
      r.gpu->gemm(ta, tb, M, N, K, 0.75f, a.gf(), lda, b.gf(), ldb, 0.5f, c.gf(), ldc);
      std::string what = "gemm_t" + std::to_string(ta) + std::to_string(tb);
      check_twin(what.c_str(), c, 1e-5);
    }
  twin c = make_twin_f(64 * 64);
  r.cpu->gemm(false, false, 64, 64, 0, 1.0f, nullptr, 1, nullptr, 64, 0.25f, c.cf(), 64);
  r.gpu->gemm(false, false, 64, 64, 0, 1.0f, nullptr, 1, nullptr, 64, 0.25f, c.gf(), 64);
  check_twin("gemm_k0", c, 0);
}

TEST_CASE("cuda backend: embedding, rmsnorm (in place and strided), copy_mat, add_inplace, silu_mul") {
  if (!gpu_present()) return;
  rig& r = the_rig();
  const int64_t H = 7168, T = 64, V = 2048;
  std::vector<int32_t> ids(T);
  for (auto& i : ids) i = int32_t(rng()() % V);
  twin id = make_twin(ids), table = make_twin_f(size_t(V * H)), x = make_twin_f(size_t(T * H));
  r.cpu->embedding(id.ci(), T, table.cf(), H, x.cf());
  r.gpu->embedding(id.gi(), T, table.gf(), H, x.gf());
  check_twin("embedding_7168", x, 0);

  twin w = make_twin_f(size_t(H)), y = make_twin_f(size_t(T * H));
  r.cpu->rmsnorm(cview(x, T, H, H), w.cf(), 1e-6f, cview(y, T, H, H));
  r.gpu->rmsnorm(gview(x, T, H, H), w.gf(), 1e-6f, gview(y, T, H, H));
  check_twin("rmsnorm_7168", y, 1e-6);
  r.cpu->rmsnorm(cview(x, T, H, H), w.cf(), 1e-6f, cview(x, T, H, H));
  r.gpu->rmsnorm(gview(x, T, H, H), w.gf(), 1e-6f, gview(x, T, H, H));
  check_twin("rmsnorm_inplace_7168", x, 1e-6);
  // The latent half of a [T, 576] kv_a output, normed in place (what the model does).
  twin ckv = make_twin_f(size_t(T * 576)), w512 = make_twin_f(512);
  r.cpu->rmsnorm(cview(ckv, T, 512, 576), w512.cf(), 1e-6f, cview(ckv, T, 512, 576));
  r.gpu->rmsnorm(gview(ckv, T, 512, 576), w512.gf(), 1e-6f, gview(ckv, T, 512, 576));
  check_twin("rmsnorm_strided_512_of_576", ckv, 1e-6);

  twin d = make_twin_f(size_t(T * 700));
  r.cpu->copy_mat(cview(ckv, T, 64, 576).col_slice(512, 64), cview(d, T, 64, 700).col_slice(11, 64));
  r.gpu->copy_mat(gview(ckv, T, 64, 576).col_slice(512, 64), gview(d, T, 64, 700).col_slice(11, 64));
  check_twin("copy_mat_strided", d, 0);

  twin a = make_twin_f(size_t(T * H)), b = make_twin_f(size_t(T * H));
  r.cpu->add_inplace(cview(a, T, H, H), cview(b, T, H, H));
  r.gpu->add_inplace(gview(a, T, H, H), gview(b, T, H, H));
  check_twin("add_inplace_7168", a, 0);

  for (int64_t inter : {int64_t(2048), int64_t(18432)}) {
    const int64_t R = inter == 2048 ? 256 : 16;
    twin gu = make_twin_f(size_t(R * 2 * inter), 3.0f), o = make_twin_f(size_t(R * inter));
    r.cpu->silu_mul(cview(gu, R, 2 * inter, 2 * inter), inter, cview(o, R, inter, inter));
    r.gpu->silu_mul(gview(gu, R, 2 * inter, 2 * inter), inter, gview(o, R, inter, inter));
    check_twin(inter == 2048 ? "silu_mul_2048" : "silu_mul_18432", o, 1e-6);
  }
}

TEST_CASE("cuda backend: rope_cos_sin (YaRN positions up to 160k) and interleaved rope on 128 heads") {
  if (!gpu_present()) return;
  rig& r = the_rig();
  const int64_t T = 64, rope = 64, heads = 128, qk = 192;
  std::vector<int32_t> pos(T);
  for (auto& p : pos) p = int32_t(rng()() % 163840);
  pos[0] = 0;
  std::vector<float> inv(rope / 2);
  for (int64_t i = 0; i < rope / 2; ++i) inv[size_t(i)] = std::pow(10000.0f, -2.0f * float(i) / float(rope)) / 3.0f;
  twin p = make_twin(pos), f = make_twin(inv), cs = make_twin_f(size_t(T * rope));
  r.cpu->rope_cos_sin(p.ci(), T, f.cf(), rope, 1.25f, cs.cf());
  r.gpu->rope_cos_sin(p.gi(), T, f.gf(), rope, 1.25f, cs.gf());
  check_twin("rope_cos_sin", cs, 1e-6);
  // Same table on both sides from here, so that the rotation alone is compared.
  r.gpu->copy_to_device(cs.gf(), cs.cf(), cs.bytes);
  twin q = make_twin_f(size_t(T * heads * qk));
  r.cpu->rope_interleaved(cview(q, T, heads * qk, heads * qk), heads, qk, 128, rope, cs.cf());
  r.gpu->rope_interleaved(gview(q, T, heads * qk, heads * qk), heads, qk, 128, rope, cs.gf());
  check_twin("rope_interleaved_q_128x192", q, 1e-6);
  twin ckv = make_twin_f(size_t(T * 576));
  r.cpu->rope_interleaved(cview(ckv, T, 576, 576), 1, 576, 512, rope, cs.cf());
  r.gpu->rope_interleaved(gview(ckv, T, 576, 576), 1, 576, 512, rope, cs.gf());
  check_twin("rope_interleaved_kpe", ckv, 1e-6);
}

namespace {
/// A pool of `pages` pages x `layers` layers x 64 slots x 576 floats on both backends, random contents.
struct twin_pool {
  twin buf;
  kv_pool_geometry cg, gg;
  twin_pool(int32_t layers, int32_t pages, int32_t entry = 576, int32_t ps = 64) {
    kv_pool_geometry g;
    g.num_layers = layers;
    g.page_size = ps;
    g.entry_floats = entry;
    g.num_pages = pages;
    buf = make_twin_f(size_t(g.floats_per_page() * pages));
    cg = gg = g;
    cg.base = buf.cf();
    gg.base = buf.gf();
  }
};
} // namespace

TEST_CASE("cuda backend: kv_store and kv_gather on a paged 576-float latent pool") {
  if (!gpu_present()) return;
  rig& r = the_rig();
  twin_pool pool(3, 16);
  const int64_t n = 200;
  std::vector<int32_t> slots(16 * 64);
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), rng());
  slots.resize(n);
  twin s = make_twin(slots), src = make_twin_f(size_t(n * 600)), dst = make_twin_f(size_t(n * 576));
  r.cpu->kv_store(pool.cg, 1, s.ci(), n, cview(src, n, 576, 600));
  r.gpu->kv_store(pool.gg, 1, s.gi(), n, gview(src, n, 576, 600));
  check_twin("kv_store_pool", pool.buf, 0);
  std::shuffle(slots.begin(), slots.end(), rng());
  twin s2 = make_twin(slots);
  r.cpu->kv_gather(pool.cg, 2, s2.ci(), n, cview(dst, n, 576, 576));
  r.gpu->kv_gather(pool.gg, 2, s2.gi(), n, gview(dst, n, 576, 576));
  check_twin("kv_gather", dst, 0);
}

TEST_CASE("cuda backend: MLA prefill attention, 128 heads, nope 128 + rope 64, v 128, causal with a cached prefix") {
  if (!gpu_present()) return;
  rig& r = the_rig();
  const int64_t heads = 128, nope = 128, rope = 64, vd = 128, qk = nope + rope, kvw = nope + vd;
  const float scale = 1.0f / std::sqrt(float(qk)) * 1.7f;
  // pad 1: an odd leading dimension for q (the scalar, unaligned kernel variant).
  for (auto [n, start, pad] : {std::tuple<int64_t, int64_t, int64_t>{100, 0, 0}, {37, 91, 0}, {1, 300, 0}, {50, 20, 1}}) {
    const int64_t ctx = start + n, ldq = heads * qk + pad;
    twin q = make_twin_f(size_t(n * ldq)), kv = make_twin_f(size_t(ctx * heads * kvw)),
         pe = make_twin_f(size_t(ctx * 576)), out = make_twin_f(size_t(n * heads * vd));
    twin scratch = make_twin_f(size_t(n * ctx));
    r.cpu->mla_prefill_attention(cview(q, n, heads * qk, ldq), cview(kv, ctx, heads * kvw, heads * kvw),
                                 cview(pe, ctx, rope, 576).col_slice(0, rope), cview(out, n, heads * vd, heads * vd),
                                 heads, nope, rope, vd, start, scale, scratch.cf());
    r.gpu->mla_prefill_attention(gview(q, n, heads * qk, ldq), gview(kv, ctx, heads * kvw, heads * kvw),
                                 gview(pe, ctx, rope, 576).col_slice(0, rope), gview(out, n, heads * vd, heads * vd),
                                 heads, nope, rope, vd, start, scale, scratch.gf());
    std::string what = "mla_prefill_n" + std::to_string(n) + "_start" + std::to_string(start) + (pad ? "_unaligned" : "");
    check_twin(what.c_str(), out, 1e-5);
  }
}

TEST_CASE("cuda backend: MLA decode attention, 128 heads, kv_lora 512 + rope 64, paged, split KV") {
  if (!gpu_present()) return;
  rig& r = the_rig();
  const int64_t heads = 128, lora = 512, entry = 576;
  const float scale = 0.1f;
  int variant = 0;
  for (std::vector<int32_t> ctx : {std::vector<int32_t>{1, 63, 64, 65, 700, 1500}, std::vector<int32_t>(48, 0),
                                   std::vector<int32_t>{5, 130, 333}}) {
    const int64_t pad = variant++ == 2 ? 1 : 0; // odd q_abs leading dimension: the scalar kernel variant
    if (ctx[0] == 0)
      for (auto& c : ctx) c = int32_t(1 + rng()() % 2048);
    const int32_t B = int32_t(ctx.size());
    int32_t total_pages = 0, max_ctx = 0;
    for (int32_t c : ctx) {
      total_pages += (c + 63) / 64;
      max_ctx = std::max(max_ctx, c);
    }
    twin_pool pool(2, total_pages + 3);
    std::vector<int32_t> perm(static_cast<size_t>(total_pages + 3));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng());
    std::vector<int32_t> pages, offs{0};
    for (int32_t c : ctx) {
      for (int32_t k = 0; k < (c + 63) / 64; ++k) pages.push_back(perm[pages.size()]);
      offs.push_back(int32_t(pages.size()));
    }
    twin pg = make_twin(pages), po = make_twin(offs), cl = make_twin(ctx);
    const int64_t ldq = heads * entry + pad;
    twin q = make_twin_f(size_t(B * ldq)), out = make_twin_f(size_t(B * heads * lora));
    twin scratch = make_twin_f(size_t(heads * max_ctx));
    decode_attention_batch cb{pg.ci(), po.ci(), cl.ci(), B, max_ctx}, gb{pg.gi(), po.gi(), cl.gi(), B, max_ctx};
    r.cpu->mla_decode_attention(pool.cg, 1, cb, cview(q, B, heads * entry, ldq),
                                cview(out, B, heads * lora, heads * lora), heads, lora, scale, scratch.cf());
    r.gpu->mla_decode_attention(pool.gg, 1, gb, gview(q, B, heads * entry, ldq),
                                gview(out, B, heads * lora, heads * lora), heads, lora, scale, scratch.gf());
    std::string what = "mla_decode_batch" + std::to_string(B) + "_maxctx" + std::to_string(max_ctx) +
                       (pad ? "_unaligned" : "");
    check_twin(what.c_str(), out, 1e-5);
  }
}

TEST_CASE("cuda backend: noaux_tc routing, 256 experts in 8 groups, top-4 groups, top-8 (ties included)") {
  if (!gpu_present()) return;
  rig& r = the_rig();
  route_params p;
  p.num_experts = 256;
  p.n_group = 8;
  p.topk_group = 4;
  p.top_k = 8;
  p.norm_topk_prob = true;
  p.routed_scaling_factor = 2.5f;
  const int64_t T = 256;
  for (int ties = 0; ties < 2; ++ties) {
    std::vector<float> logits = randn(size_t(T * p.num_experts), 2.0f);
    if (ties)
      for (auto& l : logits) l = std::round(l * 2.0f) / 2.0f; // many equal scores: the lower index must win
    twin lg = make_twin(logits), bias = make_twin_f(size_t(p.num_experts), ties ? 0.0f : 0.1f);
    twin ids = make_twin(std::vector<int32_t>(size_t(T * p.top_k), -1)), w = make_twin_f(size_t(T * p.top_k));
    r.cpu->route_noaux_tc(cview(lg, T, p.num_experts, p.num_experts), bias.cf(), p, ids.ci(), w.cf());
    r.gpu->route_noaux_tc(gview(lg, T, p.num_experts, p.num_experts), bias.gf(), p, ids.gi(), w.gf());
    CHECK(cpu_vec<int32_t>(ids) == gpu_vec<int32_t>(ids));
    check_twin(ties ? "route_weights_ties" : "route_weights", w, 1e-6);
  }
}

TEST_CASE("cuda backend: gather_rows, scatter_rows, scatter_add_rows (repeated rows, in order) and moe_permute") {
  if (!gpu_present()) return;
  rig& r = the_rig();
  const int64_t H = 7168, T = 64, K = 8, n = T * K;
  std::vector<int32_t> rows(static_cast<size_t>(n));
  for (auto& x : rows) x = int32_t(rng()() % T);
  twin rw = make_twin(rows), src = make_twin_f(size_t(n * H)), wts = make_twin_f(size_t(n));
  twin dst = make_twin_f(size_t(T * H));
  r.cpu->scatter_add_rows(cview(src, n, H, H), rw.ci(), wts.cf(), n, cview(dst, T, H, H));
  r.gpu->scatter_add_rows(gview(src, n, H, H), rw.gi(), wts.gf(), n, gview(dst, T, H, H));
  check_twin("scatter_add_rows_512_to_64", dst, 1e-6);
  r.cpu->scatter_add_rows(cview(src, n, H, H), rw.ci(), nullptr, n, cview(dst, T, H, H));
  r.gpu->scatter_add_rows(gview(src, n, H, H), rw.gi(), nullptr, n, gview(dst, T, H, H));
  check_twin("scatter_add_rows_unweighted", dst, 1e-6);
  // Same inputs twice: bitwise the same answer (no atomics).
  twin once = make_twin_f(size_t(T * H)), again = make_twin_f(size_t(T * H));
  r.gpu->copy_device(again.gf(), once.gf(), once.bytes);
  r.gpu->scatter_add_rows(gview(src, n, H, H), rw.gi(), wts.gf(), n, gview(once, T, H, H));
  r.gpu->scatter_add_rows(gview(src, n, H, H), rw.gi(), wts.gf(), n, gview(again, T, H, H));
  CHECK(gpu_vec(once) == gpu_vec(again));

  twin g = make_twin_f(size_t(n * H));
  r.cpu->gather_rows(cview(dst, T, H, H), rw.ci(), n, cview(g, n, H, H));
  r.gpu->gather_rows(gview(dst, T, H, H), rw.gi(), n, gview(g, n, H, H));
  check_twin("gather_rows", g, 0);
  std::vector<int32_t> uniq(static_cast<size_t>(n));
  std::iota(uniq.begin(), uniq.end(), 0);
  std::shuffle(uniq.begin(), uniq.end(), rng());
  twin u = make_twin(uniq), s = make_twin_f(size_t(n * H));
  r.cpu->scatter_rows(cview(g, n, H, H), u.ci(), n, cview(s, n, H, H));
  r.gpu->scatter_rows(gview(g, n, H, H), u.gi(), n, gview(s, n, H, H));
  check_twin("scatter_rows", s, 0);

  // moe_permute against the host counting sort of runtime/model.cpp.
  const int64_t E = 256;
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (auto& x : ids) x = int32_t(rng()() % 40); // few experts: many rows per expert
  std::vector<float> w = randn(size_t(n));
  std::vector<int32_t> off(size_t(E + 1), 0), want_rows(static_cast<size_t>(n));
  std::vector<float> want_w(static_cast<size_t>(n));
  for (int32_t e : ids) off[size_t(e) + 1]++;
  for (int64_t e = 0; e < E; ++e) off[size_t(e + 1)] += off[size_t(e)];
  std::vector<int32_t> cur(off.begin(), off.end() - 1);
  for (int64_t i = 0; i < n; ++i) {
    int32_t pos = cur[size_t(ids[size_t(i)])]++;
    want_rows[size_t(pos)] = int32_t(i / K);
    want_w[size_t(pos)] = w[size_t(i)];
  }
  twin di = make_twin(ids), dw = make_twin(w), doff = make_twin(std::vector<int32_t>(size_t(E + 1), -1)),
       drows = make_twin(std::vector<int32_t>(size_t(n), -1)), dpw = make_twin_f(size_t(n));
  the_rig().cuda().moe_permute(di.gi(), dw.gf(), T, K, E, doff.gi(), drows.gi(), dpw.gf());
  CHECK(gpu_vec<int32_t>(doff) == off);
  CHECK(gpu_vec<int32_t>(drows) == want_rows);
  CHECK(gpu_vec(dpw) == want_w);
}

TEST_CASE("cuda backend: device-side MoE (moe_permute + grouped_expert_ffn + scatter_add) matches the host path, "
          "eager and replayed from a CUDA graph") {
  if (!gpu_present()) return;
  rig& r = the_rig();
  cuda_backend& cu = r.cuda();
  const int64_t H = 7168, I = 512, E = 8, T = 32, K = 4, n = T * K;
  std::vector<twin> gate_up, down;
  std::vector<const float*> gu_ptrs, dn_ptrs;
  for (int64_t e = 0; e < E; ++e) {
    gate_up.push_back(make_twin_f(size_t(2 * I * H), 0.02f));
    down.push_back(make_twin_f(size_t(H * I), 0.02f));
    gu_ptrs.push_back(gate_up.back().gf());
    dn_ptrs.push_back(down.back().gf());
  }
  device_buffer dgu = cu.allocate(E * sizeof(float*)), ddn = cu.allocate(E * sizeof(float*));
  cu.copy_to_device(dgu.data(), gu_ptrs.data(), E * sizeof(float*));
  cu.copy_to_device(ddn.data(), dn_ptrs.data(), E * sizeof(float*));
  twin hidden = make_twin_f(size_t(T * H));
  // Device-side buffers of the graph-safe path, sized for the bucket (n rows).
  device_buffer ids = cu.allocate(n * 4), wts = cu.allocate(n * 4), offs = cu.allocate((E + 1) * 4),
                prow = cu.allocate(n * 4), pw = cu.allocate(n * 4), x = cu.allocate(n * H * 4),
                gu = cu.allocate(n * 2 * I * 4), act = cu.allocate(n * I * 4), y = cu.allocate(n * H * 4),
                out = cu.allocate(T * H * 4);
  auto device_moe = [&] {
    cu.moe_permute(ids.i32(), wts.f32(), T, K, E, offs.i32(), prow.i32(), pw.f32());
    cu.gather_rows(mat_view(hidden.gf(), T, H), prow.i32(), n, x.mat(n, H));
    cu.grouped_expert_ffn(offs.i32(), E, reinterpret_cast<const float* const*>(dgu.data()),
                          reinterpret_cast<const float* const*>(ddn.data()), H, I, n, x.mat(n, H), gu.f32(), act.f32(),
                          y.mat(n, H));
    cu.fill_zero(out.data(), out.bytes());
    cu.scatter_add_rows(y.mat(n, H), prow.i32(), pw.f32(), n, out.mat(T, H));
  };
  auto host_moe = [&](const std::vector<int32_t>& hid, const std::vector<float>& hw) {
    // runtime/model.cpp's local_moe_experts on the cpu backend.
    std::vector<int64_t> off(size_t(E + 1), 0);
    for (int32_t e : hid) off[size_t(e) + 1]++;
    for (int64_t e = 0; e < E; ++e) off[size_t(e + 1)] += off[size_t(e)];
    std::vector<int64_t> cur(off.begin(), off.end() - 1);
    std::vector<int32_t> rows(static_cast<size_t>(n));
    std::vector<float> w(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      int64_t pos = cur[size_t(hid[size_t(i)])]++;
      rows[size_t(pos)] = int32_t(i / K);
      w[size_t(pos)] = hw[size_t(i)];
    }
    std::vector<float> xc(static_cast<size_t>(n * H)), guc(size_t(n * 2 * I)), ac(size_t(n * I)), yc(size_t(n * H)),
        oc(size_t(T * H), 0.0f);
    r.cpu->gather_rows(mat_view(hidden.cf(), T, H), rows.data(), n, mat_view(xc.data(), n, H));
    for (int64_t e = 0; e < E; ++e)
      if (off[size_t(e + 1)] > off[size_t(e)])
        r.cpu->linear(mat_view(xc.data(), n, H).row_slice(off[size_t(e)], off[size_t(e + 1)] - off[size_t(e)]),
                      gate_up[size_t(e)].cf(),
                      mat_view(guc.data(), n, 2 * I).row_slice(off[size_t(e)], off[size_t(e + 1)] - off[size_t(e)]));
    r.cpu->silu_mul(mat_view(guc.data(), n, 2 * I), I, mat_view(ac.data(), n, I));
    for (int64_t e = 0; e < E; ++e)
      if (off[size_t(e + 1)] > off[size_t(e)])
        r.cpu->linear(mat_view(ac.data(), n, I).row_slice(off[size_t(e)], off[size_t(e + 1)] - off[size_t(e)]),
                      down[size_t(e)].cf(),
                      mat_view(yc.data(), n, H).row_slice(off[size_t(e)], off[size_t(e + 1)] - off[size_t(e)]));
    r.cpu->scatter_add_rows(mat_view(yc.data(), n, H), rows.data(), w.data(), n, mat_view(oc.data(), T, H));
    return oc;
  };
  auto draw = [&](std::vector<int32_t>& hid, std::vector<float>& hw, bool skewed) {
    hid.assign(size_t(n), 0);
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int32_t> all(static_cast<size_t>(E));
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng());
      if (skewed) std::sort(all.begin(), all.begin() + K); // experts 0.. get most rows, some none
      for (int64_t k = 0; k < K; ++k) hid[size_t(t * K + k)] = skewed && t % 3 ? int32_t(k) : all[size_t(k)];
    }
    hw = randn(size_t(n));
    cu.copy_to_device(ids.data(), hid.data(), n * 4);
    cu.copy_to_device(wts.data(), hw.data(), n * 4);
  };
  std::vector<int32_t> hid;
  std::vector<float> hw;
  draw(hid, hw, false);
  device_moe(); // sizes every workspace before the capture
  std::vector<float> got(static_cast<size_t>(T * H));
  cu.copy_to_host(got.data(), out.data(), got.size() * 4);
  errors e = compare(host_moe(hid, hw), got);
  std::printf("RESULT moe_device_path_eager rel_l2=%.3g max_rel=%.3g\n", e.rel_l2, e.max_rel);
  CHECK(e.rel_l2 <= 1e-5);
  cu.begin_capture();
  device_moe();
  int g = cu.end_capture();
  for (bool skewed : {false, true}) {
    draw(hid, hw, skewed);
    cu.fill_zero(out.data(), out.bytes());
    cu.replay_graph(g);
    cu.copy_to_host(got.data(), out.data(), got.size() * 4);
    e = compare(host_moe(hid, hw), got);
    std::printf("RESULT moe_device_path_graph%s rel_l2=%.3g max_rel=%.3g\n", skewed ? "_skewed" : "", e.rel_l2,
                e.max_rel);
    CHECK(e.rel_l2 <= 1e-5);
  }
  cu.destroy_graph(g);
}

// -- memory, errors, graphs -------------------------------------------------------------------------------------

TEST_CASE("cuda backend: caching allocator reuses freed blocks by size class, zero-fills, keeps stats") {
  if (!gpu_present()) return;
  cuda_backend be(0);
  CHECK(cuda_backend::size_class(1) == 512);
  CHECK(cuda_backend::size_class(1000) == 1024);
  CHECK(cuda_backend::size_class((1 << 20) + 1) == size_t(2) << 20);
  void* first = nullptr;
  {
    device_buffer a = be.allocate(1000);
    first = a.data();
    std::vector<float> ones(250, 1.0f);
    be.copy_to_device(a.data(), ones.data(), 1000);
  }
  auto s0 = be.allocator_stats();
  CHECK(s0.bytes_in_use == 0);
  CHECK(s0.bytes_cached == 1024);
  device_buffer b = be.allocate(900); // same class: the freed block comes back, zeroed
  CHECK(b.data() == first);
  std::vector<float> back(225, 7.0f);
  be.copy_to_host(back.data(), b.data(), 900);
  CHECK(std::all_of(back.begin(), back.end(), [](float v) { return v == 0.0f; }));
  auto s1 = be.allocator_stats();
  CHECK(s1.cache_hits == 1);
  CHECK(s1.device_mallocs == 1);
  CHECK(s1.bytes_in_use == 1024);
  CHECK(s1.peak_bytes_in_use >= 1024);
  device_buffer c = be.allocate(5 << 20);
  CHECK(be.allocator_stats().bytes_reserved == 1024 + (size_t(6) << 20));
  c.release();
  be.release_cached_memory();
  CHECK(be.allocator_stats().bytes_reserved == 1024);
}

TEST_CASE("cuda backend: recoverable errors throw and leave the device usable") {
  if (!gpu_present()) return;
  cuda_backend be(0);
  CHECK_THROWS_AS(be.allocate(size_t(1) << 50), kernels::cuda_oom_error);
  CHECK_THROWS_AS(be.gemm(false, false, -1, 4, 4, 1.0f, nullptr, 4, nullptr, 4, 0.0f, nullptr, 4),
                  std::invalid_argument);
  CHECK_THROWS_AS(make_backend("cuda:99"), std::invalid_argument);
  CHECK_THROWS_AS(make_backend("cuda:x"), std::invalid_argument);
  CHECK_THROWS_AS(make_backend("cudax"), std::invalid_argument);
  device_buffer a = be.allocate(64 * sizeof(float));
  std::vector<float> v(64, 2.0f), back(64);
  be.copy_to_device(a.data(), v.data(), 256);
  be.add_inplace(a.mat(8, 8), a.mat(8, 8));
  be.copy_to_host(back.data(), a.data(), 256);
  CHECK(back[63] == 4.0f);
}

TEST_CASE("cuda backend: a sticky error (illegal address) ends the process with exit code 86") {
  if (!gpu_present()) return;
  if (std::getenv("PETREL_CUDABE_STICKY_CHILD")) {
    // The child: read far outside any allocation, then wait for the fault.
    cuda_backend be(0);
    device_buffer src = be.allocate(4096), idx = be.allocate(sizeof(int32_t)), dst = be.allocate(4096);
    int32_t far = 1 << 30;
    be.copy_to_device(idx.data(), &far, sizeof far);
    be.gather_rows(mat_view(src.f32(), 1, 1024, 1024 * 1024), idx.i32(), 1, dst.mat(1, 1024));
    be.synchronize();
    std::printf("child: no fault?\n");
    std::_Exit(0);
  }
  std::string cmd = "PETREL_CUDABE_STICKY_CHILD=1 /proc/" + std::to_string(::getpid()) +
                    "/exe -tc='*sticky error*' 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p);
  std::string out;
  char buf[4096];
  while (size_t k = fread(buf, 1, sizeof buf, p)) out.append(buf, k);
  int status = pclose(p);
  MESSAGE("child said: ", out);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == kernels::cuda_sticky_exit_code);
  CHECK(out.find("sticky CUDA error") != std::string::npos);
}

TEST_CASE("cuda backend: a captured graph replays the same ops on new inputs") {
  if (!gpu_present()) return;
  cuda_backend be(0);
  const int64_t T = 8, H = 7168, I = 2048;
  auto up = [&](const std::vector<float>& h) {
    device_buffer b = be.allocate(h.size() * sizeof(float));
    be.copy_to_device(b.data(), h.data(), h.size() * sizeof(float));
    return b;
  };
  device_buffer x = up(randn(size_t(T * H))), w = up(randn(size_t(H))), wg = up(randn(size_t(2 * I * H), 0.02f));
  device_buffer hn = be.allocate(sizeof(float) * T * H), gu = be.allocate(sizeof(float) * T * 2 * I),
                act = be.allocate(sizeof(float) * T * I);
  auto step = [&] {
    be.rmsnorm(x.mat(T, H), w.f32(), 1e-6f, hn.mat(T, H));
    be.linear(hn.mat(T, H), wg.f32(), gu.mat(T, 2 * I));
    be.silu_mul(gu.mat(T, 2 * I), I, act.mat(T, I));
  };
  be.begin_capture();
  CHECK_THROWS_AS(be.copy_to_device(x.data(), nullptr, 4), kernels::cuda_error);
  step();
  int g = be.end_capture();
  for (int round = 0; round < 3; ++round) {
    std::vector<float> in = randn(size_t(T * H));
    be.copy_to_device(x.data(), in.data(), in.size() * sizeof(float));
    step();
    std::vector<float> eager(static_cast<size_t>(T * I)), replay(size_t(T * I));
    be.copy_to_host(eager.data(), act.data(), eager.size() * sizeof(float));
    be.fill_zero(act.data(), act.bytes());
    be.replay_graph(g);
    be.copy_to_host(replay.data(), act.data(), replay.size() * sizeof(float));
    CHECK(eager == replay);
  }
  be.destroy_graph(g);

  // The bucketed helper: eager, then captured (and replayed), then replayed; same numbers as eager each time.
  for (int call = 0; call < 4; ++call) {
    std::vector<float> in = randn(size_t(T * H));
    be.copy_to_device(x.data(), in.data(), in.size() * sizeof(float));
    step();
    std::vector<float> eager(size_t(T * I)), replay(size_t(T * I));
    be.copy_to_host(eager.data(), act.data(), eager.size() * sizeof(float));
    be.fill_zero(act.data(), act.bytes());
    const bool from_graph = be.run_step_graph(42, step);
    CHECK(from_graph == (call > 0));
    be.copy_to_host(replay.data(), act.data(), replay.size() * sizeof(float));
    CHECK(eager == replay);
  }
  be.clear_step_graphs();
}

// -- whole models -------------------------------------------------------------------------------------------------

namespace {

struct model_result {
  double worst_rel = 0;
  bool ids_match = false;
};

/// Runs a Hugging Face fixture (tests/data/golden/<name>) on the cuda backend like test_model_golden does on cpu.
void run_golden(const fs::path& dir) {
  nlohmann::json g = nlohmann::json::parse(std::ifstream(dir / "golden.json"));
  auto input = g.at("input_ids").get<std::vector<int32_t>>();
  auto greedy = g.at("greedy_ids").get<std::vector<int32_t>>();
  const int64_t P = g.at("prompt_len").get<int64_t>(), V = g.at("vocab_size").get<int64_t>();
  std::vector<float> ref(static_cast<size_t>(P * V));
  std::ifstream(dir / "logits.bin", std::ios::binary).read(reinterpret_cast<char*>(ref.data()),
                                                            std::streamsize(ref.size() * sizeof(float)));
  auto be = make_backend("cuda");
  auto model = deepseek_model::load(dir, *be);
  double ref_max = 0;
  for (float v : ref) ref_max = std::max(ref_max, double(std::fabs(v)));
  for (int64_t chunk : {int64_t(0), int64_t(7)}) {
    kv_pool kv(*be, model->config(), 64, 16);
    generate_options o;
    o.max_new_tokens = int64_t(greedy.size());
    o.prompt_logits = true;
    o.prefill_chunk = chunk;
    generate_result r = generate(*model, kv, input, o);
    REQUIRE(r.prompt_logits.size() == ref.size());
    double worst = 0;
    for (size_t i = 0; i < ref.size(); ++i) worst = std::max(worst, double(std::fabs(r.prompt_logits[i] - ref[i])));
    std::printf("RESULT golden_%s_chunk%d max_rel=%.3g greedy_match=%d\n", dir.filename().c_str(), int(chunk),
                worst / ref_max, int(r.output_ids == greedy));
    CHECK(worst <= 1e-3 * ref_max);
    CHECK(r.output_ids == greedy);
  }
}

} // namespace

TEST_CASE("cuda backend: the Hugging Face golden fixtures end to end (logits and greedy ids)") {
  if (!gpu_present()) return;
  fs::path root = source_dir() / "tests/data/golden";
  int ran = 0;
  if (fs::is_directory(root))
    for (auto& e : fs::directory_iterator(root))
      if (fs::exists(e.path() / "golden.json")) {
        CAPTURE(e.path().filename().string());
        run_golden(e.path());
        ++ran;
      }
  MESSAGE(ran, " golden fixtures run on cuda");
}

TEST_CASE("cuda backend: fortune-moe greedy continuations match the reference and the cpu backend") {
  if (!gpu_present()) return;
  fs::path dir = source_dir() / "tests/data/fortune-moe";
  if (!fs::exists(dir / "model.safetensors")) return;
  auto ref = nlohmann::json::parse(std::ifstream(dir / "reference_bpb.json"));
  auto gbe = make_backend("cuda");
  auto cbe = make_backend("cpu");
  auto gm = deepseek_model::load(dir, *gbe);
  auto cm = deepseek_model::load(dir, *cbe);
  kv_pool gkv(*gbe, gm->config(), 64, 16), ckv(*cbe, cm->config(), 64, 16);
  int matched = 0, total = 0;
  double worst = 0;
  for (auto& g : ref.at("greedy")) {
    auto prompt = g.at("prompt_ids").get<std::vector<int32_t>>();
    auto want = g.at("greedy_ids").get<std::vector<int32_t>>();
    generate_options o;
    o.max_new_tokens = int64_t(want.size());
    o.prompt_logits = true;
    generate_result gr = generate(*gm, gkv, prompt, o), cr = generate(*cm, ckv, prompt, o);
    CHECK(gr.output_ids == want);
    matched += gr.output_ids == want;
    ++total;
    worst = std::max(worst, compare(cr.prompt_logits, gr.prompt_logits).max_rel);
  }
  std::printf("RESULT fortune_moe greedy_match=%d/%d max_rel_vs_cpu=%.3g\n", matched, total, worst);
  CHECK(worst <= 1e-4);
}

TEST_CASE("cuda backend: a 2-layer model at DeepSeek-V3 width against cpu (PETREL_CUDA_BIG=1)") {
  if (!gpu_present()) return;
  if (!std::getenv("PETREL_CUDA_BIG")) {
    MESSAGE("set PETREL_CUDA_BIG=1 to run the full-width model comparison (6 GiB of fp32 weights per backend)");
    return;
  }
  fs::path dir = fs::temp_directory_path() / ("petrel_cudabe_big_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "config.json") << R"({
    "model_type": "deepseek_v3", "vocab_size": 4096, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 2, "num_attention_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 16, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "first_k_dense_replace": 1, "norm_topk_prob": true,
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false,
    "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                     "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}})";
  auto gbe = make_backend("cuda");
  auto cbe = make_backend("cpu");
  cbe->set_num_threads(int(std::max(1L, sysconf(_SC_NPROCESSORS_ONLN))));
  auto gm = deepseek_model::load(dir, *gbe, true, 7);
  auto cm = deepseek_model::load(dir, *cbe, true, 7);
  const int64_t batch = 4, prompt = 40;
  kv_pool gkv(*gbe, gm->config(), 16, 64), ckv(*cbe, cm->config(), 16, 64);
  std::vector<std::vector<int32_t>> toks(batch), pages(batch);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < prompt + b; ++t) toks[size_t(b)].push_back(int32_t(rng()() % 4096));
    pages[size_t(b)] = {int32_t(2 * b), int32_t(2 * b + 1)};
  }
  // One mixed prefill step, then three batched decode steps fed with the cpu's greedy tokens.
  double worst = 0;
  int argmax_agree = 0, rows = 0;
  std::vector<int64_t> pos(batch, 0);
  for (int step = 0; step < 4; ++step) {
    std::vector<sequence_step> sb(batch);
    std::vector<std::vector<int32_t>> in(batch);
    for (int64_t b = 0; b < batch; ++b) {
      in[size_t(b)] = step == 0 ? toks[size_t(b)] : std::vector<int32_t>{toks[size_t(b)].back()};
      sb[size_t(b)].tokens = in[size_t(b)];
      sb[size_t(b)].start_pos = pos[size_t(b)];
      sb[size_t(b)].pages = pages[size_t(b)];
    }
    step_result gr, cr;
    auto t0 = std::chrono::steady_clock::now();
    gm->forward(sb, gkv, gr);
    auto t1 = std::chrono::steady_clock::now();
    cm->forward(sb, ckv, cr);
    auto t2 = std::chrono::steady_clock::now();
    errors e = compare(cr.logits, gr.logits);
    worst = std::max(worst, e.max_rel);
    for (int64_t b = 0; b < batch; ++b) {
      auto c = cr.last(size_t(b)), g = gr.last(size_t(b));
      const int32_t ca = int32_t(std::max_element(c.begin(), c.end()) - c.begin());
      const int32_t ga = int32_t(std::max_element(g.begin(), g.end()) - g.begin());
      argmax_agree += ca == ga;
      ++rows;
      pos[size_t(b)] += int64_t(in[size_t(b)].size());
      toks[size_t(b)].push_back(ca);
    }
    std::printf("RESULT big_model_step%d rel_l2=%.3g max_rel=%.3g cuda_ms=%.1f cpu_ms=%.1f\n", step, e.rel_l2,
                e.max_rel, std::chrono::duration<double, std::milli>(t1 - t0).count(),
                std::chrono::duration<double, std::milli>(t2 - t1).count());
    CHECK(e.rel_l2 <= 1e-4);
  }
  std::printf("RESULT big_model argmax_agree=%d/%d worst_max_rel=%.3g\n", argmax_agree, rows, worst);
  CHECK(argmax_agree == rows);
  fs::remove_all(dir);
}

// -- timings (PETREL_CUDA_BENCH=1) ------------------------------------------------------------------------------

TEST_CASE("cuda backend: timings of the attention ops and a GEMM (PETREL_CUDA_BENCH=1)") {
  if (!gpu_present() || !std::getenv("PETREL_CUDA_BENCH")) return;
  cuda_backend& be = the_rig().cuda();
  auto time_ms = [&](auto&& fn, int iters) {
    fn();
    be.synchronize();
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) fn();
    be.synchronize();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / iters;
  };
  auto buf = [&](size_t floats) {
    std::vector<float> h = randn(floats);
    device_buffer b = be.allocate(floats * sizeof(float));
    be.copy_to_device(b.data(), h.data(), floats * sizeof(float));
    return b;
  };
  const int64_t heads = 128, lora = 512, entry = 576;
  for (int64_t B : {64, 128}) {
    for (int64_t ctx : {2048, 4096}) {
      const int64_t per = ctx / 64, P = B * per;
      kv_pool_geometry g{nullptr, 1, 64, int32_t(entry), int32_t(P)};
      device_buffer pool = buf(size_t(g.floats_per_page() * P));
      g.base = pool.f32();
      std::vector<int32_t> pages(static_cast<size_t>(P)), offs, lens(static_cast<size_t>(B), static_cast<int32_t>(ctx));
      std::iota(pages.begin(), pages.end(), 0);
      for (int64_t b = 0; b <= B; ++b) offs.push_back(int32_t(b * per));
      device_buffer dp = be.allocate(pages.size() * 4), doff = be.allocate(offs.size() * 4), dl = be.allocate(B * 4);
      be.copy_to_device(dp.data(), pages.data(), pages.size() * 4);
      be.copy_to_device(doff.data(), offs.data(), offs.size() * 4);
      be.copy_to_device(dl.data(), lens.data(), lens.size() * 4);
      device_buffer q = buf(size_t(B * heads * entry)), o = buf(size_t(B * heads * lora));
      decode_attention_batch db{dp.i32(), doff.i32(), dl.i32(), int32_t(B), int32_t(ctx)};
      double ms = time_ms([&] {
        be.mla_decode_attention(g, 0, db, q.mat(B, heads * entry), o.mat(B, heads * lora), heads, lora, 0.1f, nullptr);
      }, 5);
      const double bytes = double(B) * ctx * entry * 4, flops = double(B) * ctx * heads * (entry + lora) * 2;
      std::printf("RESULT bench_mla_decode_fp32 batch=%ld ctx=%ld ms=%.3f GBps=%.0f TFLOPS=%.2f\n", long(B), long(ctx),
                  ms, bytes / ms / 1e6, flops / ms / 1e9);
    }
  }
  {
    const int64_t n = 1024, nope = 128, rope = 64, vd = 128;
    device_buffer q = buf(size_t(n * heads * 192)), kv = buf(size_t(n * heads * 256)), pe = buf(size_t(n * 64)),
                  o = buf(size_t(n * heads * vd));
    double ms = time_ms([&] {
      be.mla_prefill_attention(q.mat(n, heads * 192), kv.mat(n, heads * 256), pe.mat(n, 64), o.mat(n, heads * vd),
                               heads, nope, rope, vd, 0, 0.1f, nullptr);
    }, 3);
    const double flops = double(n) * n / 2 * heads * (192 + 128) * 2;
    std::printf("RESULT bench_mla_prefill_fp32 n=%ld ms=%.3f TFLOPS=%.2f\n", long(n), ms, flops / ms / 1e9);
  }
  for (bool tf32 : {false, true}) {
    const int64_t M = 4096, N = 7168, K = 2048;
    device_buffer a = buf(size_t(M * K)), w = buf(size_t(N * K)), c = buf(size_t(M * N));
    be.set_allow_tf32(tf32);
    double ms = time_ms([&] { be.linear(a.mat(M, K), w.f32(), c.mat(M, N)); }, 5);
    std::printf("RESULT bench_gemm_fp32%s M=%ld N=%ld K=%ld ms=%.3f TFLOPS=%.1f\n", tf32 ? "_tf32" : "", long(M),
                long(N), long(K), ms, 2.0 * M * N * K / ms / 1e9);
  }
  be.set_allow_tf32(false);
}

// -- the decode step under CUDA graphs (runtime/model.cpp forward_graph) ---------------------------------------

TEST_CASE("cuda backend: decode steps replayed from CUDA graphs give the eager logits (fortune-moe, golden)") {
  if (!gpu_present()) return;
  auto be = make_backend("cuda");
  const std::vector<int> prompts{5, 30, 62, 17, 9};
  // Bucket 8 (ctx bound 64, then 128), bucket 2, bucket 1, then bucket 8 again: captures, replays, new buckets.
  const std::vector<std::vector<int>> rounds{{0, 1, 2, 3, 4}, {1, 3}, {2}, {0, 1, 2, 3, 4}};
  for (const char* rel : {"tests/data/fortune-moe", "tests/data/golden/tiny_fp32", "tests/data/golden/yarn"}) {
    fs::path dir = source_dir() / rel;
    if (!fs::exists(dir / "config.json")) continue;
    CAPTURE(std::string(rel));
    graphs_check::outcome o = graphs_check::run(*be, dir, prompts, rounds, 6, false);
    std::printf("RESULT decode_graphs_%s steps=%d replayed=%d bitwise=%d max_rel=%.3g\n",
                fs::path(rel).filename().c_str(), o.steps, o.replayed, int(o.bitwise), o.worst_rel);
    CHECK(o.fixed_layout == o.steps);
    CHECK(o.replayed >= o.steps / 2);
    CHECK(o.worst_rel <= 1e-5);
  }
}

TEST_CASE("cuda backend: decode step time, eager vs CUDA graph replay (PETREL_CUDA_BENCH=1)") {
  if (!gpu_present() || !std::getenv("PETREL_CUDA_BENCH")) return;
  fs::path dir = source_dir() / "tests/data/fortune-moe";
  if (!fs::exists(dir / "config.json")) return;
  auto be = make_backend("cuda");
  auto m = deepseek_model::load(dir, *be);
  const int32_t ps = 16, per_seq = 8, prompt = 40;
  for (int B : {1, 8, 32, 128}) {
    kv_pool kv(*be, m->config(), B * per_seq, ps);
    std::vector<std::vector<int32_t>> pages(static_cast<size_t>(B)), toks(static_cast<size_t>(B));
    std::vector<sequence_step> pre, dec;
    std::vector<int32_t> next(static_cast<size_t>(B));
    for (int i = 0; i < B; ++i) {
      for (int32_t p = 0; p < per_seq; ++p) pages[size_t(i)].push_back(i * per_seq + p);
      for (int k = 0; k < prompt; ++k) toks[size_t(i)].push_back(int32_t((i * 131 + k * 7) % 250));
      next[size_t(i)] = int32_t((i * 17) % 250);
    }
    for (int i = 0; i < B; ++i) pre.push_back(sequence_step{toks[size_t(i)], 0, pages[size_t(i)], false});
    for (int i = 0; i < B; ++i)
      dec.push_back(sequence_step{std::span<const int32_t>(&next[size_t(i)], 1), prompt, pages[size_t(i)], false});
    step_result r;
    m->set_decode_graphs(false);
    m->forward(pre, kv, r);
    auto time_steps = [&](int iters) {
      for (int i = 0; i < 3; ++i) m->forward(dec, kv, r); // warm-up (and capture)
      auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < iters; ++i) m->forward(dec, kv, r); // the same position each time: same work
      return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / iters;
    };
    const double eager = time_steps(50);
    CHECK(m->last_step_mode() == 0);
    m->set_decode_graphs(true);
    const double graph = time_steps(50);
    CHECK(m->last_step_mode() == 2);
    std::printf("RESULT bench_decode_step fortune-moe B=%d eager_ms=%.3f graph_ms=%.3f speedup=%.2f\n", B, eager,
                graph, eager / graph);
  }
}

#else

TEST_CASE("cuda backend: not built (no CUDA in this build)") {
  CHECK_THROWS_AS(petrel::make_backend("cuda"), std::invalid_argument);
  MESSAGE("built without CUDA: the cuda backend tests are skipped");
}

#endif
