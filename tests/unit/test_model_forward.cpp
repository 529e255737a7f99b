// The DeepSeek-V3 forward pass on the cpu backend, against an independent straightforward reference
// (full recompute, Hugging Face's rotate-half RoPE formulation, per-token router loop), plus the properties the
// serving path relies on: chunked prefill == one-shot, cached decode == recompute, a mixed batch == each
// sequence alone, pages freed at request end.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <thread>

#include "runtime/backend.hpp"
#include "runtime/generation.hpp"
#include "runtime/model.hpp"
#include "tests/unit/test_model_util.hpp"

using namespace petrel;

namespace {

using vec = std::vector<double>;

// y[out] = W[out, in] x[in]
vec matvec(const float* w, const vec& x, int64_t out) {
  vec y(size_t(out), 0.0);
  const int64_t in = int64_t(x.size());
  for (int64_t o = 0; o < out; ++o) {
    double s = 0;
    for (int64_t i = 0; i < in; ++i) s += double(w[o * in + i]) * x[size_t(i)];
    y[size_t(o)] = s;
  }
  return y;
}

vec rms(const vec& x, const float* w, double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  double inv = 1.0 / std::sqrt(ss / double(x.size()) + eps);
  vec y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * inv * w[i];
  return y;
}

double silu(double x) { return x / (1.0 + std::exp(-x)); }

vec swiglu(const mlp_weights& m, const vec& x) {
  vec gu = matvec(m.gate_up.f32(), x, 2 * m.inter);
  vec a(static_cast<size_t>(m.inter));
  for (int64_t i = 0; i < m.inter; ++i) a[size_t(i)] = silu(gu[size_t(i)]) * gu[size_t(m.inter + i)];
  return matvec(m.down.f32(), a, int64_t(x.size()));
}

// Hugging Face's interleaved RoPE: de-interleave (x0 x2 .. | x1 x3 ..), then rotate_half with cat(freqs, freqs).
// The result is a permutation of Petrel's pairwise rotation, which leaves q.k unchanged.
void rope_hf(double* x, int64_t dim, int64_t pos, const std::vector<float>& inv, double af) {
  int64_t half = dim / 2;
  vec d(static_cast<size_t>(dim));
  for (int64_t i = 0; i < half; ++i) {
    d[size_t(i)] = x[2 * i];
    d[size_t(half + i)] = x[2 * i + 1];
  }
  for (int64_t i = 0; i < half; ++i) {
    double ang = double(float(pos) * inv[size_t(i)]);
    double c = std::cos(ang) * af, s = std::sin(ang) * af;
    x[i] = d[size_t(i)] * c - d[size_t(half + i)] * s;
    x[half + i] = d[size_t(half + i)] * c + d[size_t(i)] * s;
  }
}

// Reference logits [L, V] for one sequence, recomputed from scratch.
std::vector<vec> reference_logits(const deepseek_model& m, const std::vector<int32_t>& ids) {
  const model_config& c = m.config();
  const model_weights& w = m.weights();
  const int64_t L = int64_t(ids.size()), H = c.hidden_size, nh = c.num_attention_heads, nope = c.qk_nope_head_dim,
                rope = c.qk_rope_head_dim, vd = c.v_head_dim, lora = c.kv_lora_rank, qk = nope + rope;
  const auto inv = c.rope_inv_freq();
  const double af = c.rope_attention_factor(), scale = c.softmax_scale(), eps = c.rms_norm_eps;
  std::vector<vec> x(static_cast<size_t>(L));
  for (int64_t t = 0; t < L; ++t) x[size_t(t)] = vec(w.embed.f32() + ids[size_t(t)] * H, w.embed.f32() + (ids[size_t(t)] + 1) * H);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const layer_weights& lw = w.layers[size_t(l)];
    std::vector<vec> q(static_cast<size_t>(L)), kv(static_cast<size_t>(L)), kpe(static_cast<size_t>(L));
    for (int64_t t = 0; t < L; ++t) {
      vec hn = rms(x[size_t(t)], lw.input_norm.f32(), eps);
      q[size_t(t)] = c.q_lora_rank > 0
                         ? matvec(lw.q_b.f32(), rms(matvec(lw.q_a.f32(), hn, c.q_lora_rank), lw.q_a_norm.f32(), eps), nh * qk)
                         : matvec(lw.q.f32(), hn, nh * qk);
      vec ckv = matvec(lw.kv_a.f32(), hn, lora + rope);
      vec lat = rms(vec(ckv.begin(), ckv.begin() + lora), lw.kv_a_norm.f32(), eps);
      kv[size_t(t)] = matvec(lw.kv_b.f32(), lat, nh * (nope + vd));
      kpe[size_t(t)] = vec(ckv.begin() + lora, ckv.end());
      rope_hf(kpe[size_t(t)].data(), rope, t, inv, af);
      for (int64_t h = 0; h < nh; ++h) rope_hf(q[size_t(t)].data() + h * qk + nope, rope, t, inv, af);
    }
    for (int64_t t = 0; t < L; ++t) {
      vec attn(size_t(nh * vd), 0.0);
      for (int64_t h = 0; h < nh; ++h) {
        vec s(static_cast<size_t>(t + 1));
        double mx = -1e300;
        for (int64_t j = 0; j <= t; ++j) {
          double d = 0;
          for (int64_t i = 0; i < nope; ++i) d += q[size_t(t)][size_t(h * qk + i)] * kv[size_t(j)][size_t(h * (nope + vd) + i)];
          for (int64_t i = 0; i < rope; ++i) d += q[size_t(t)][size_t(h * qk + nope + i)] * kpe[size_t(j)][size_t(i)];
          s[size_t(j)] = d * scale;
          mx = std::max(mx, s[size_t(j)]);
        }
        double sum = 0;
        for (auto& v : s) sum += (v = std::exp(v - mx));
        for (int64_t j = 0; j <= t; ++j)
          for (int64_t i = 0; i < vd; ++i)
            attn[size_t(h * vd + i)] += s[size_t(j)] / sum * kv[size_t(j)][size_t(h * (nope + vd) + nope + i)];
      }
      vec o = matvec(lw.o.f32(), attn, H);
      for (int64_t i = 0; i < H; ++i) x[size_t(t)][size_t(i)] += o[size_t(i)];
    }
    for (int64_t t = 0; t < L; ++t) {
      vec hn = rms(x[size_t(t)], lw.post_attn_norm.f32(), eps);
      vec y(size_t(H), 0.0);
      if (!lw.moe) {
        y = swiglu(lw.dense, hn);
      } else {
        const int64_t E = c.n_routed_experts, G = c.n_group, per = E / G;
        vec lg = matvec(lw.router.f32(), hn, E), s(static_cast<size_t>(E)), ch(static_cast<size_t>(E));
        for (int64_t e = 0; e < E; ++e) {
          s[size_t(e)] = 1.0 / (1.0 + std::exp(-lg[size_t(e)]));
          ch[size_t(e)] = s[size_t(e)] + lw.router_bias.f32()[e];
        }
        std::vector<std::pair<double, int64_t>> gs;
        for (int64_t g = 0; g < G; ++g) {
          vec v(ch.begin() + g * per, ch.begin() + (g + 1) * per);
          std::sort(v.rbegin(), v.rend());
          gs.push_back({v[0] + (per > 1 ? v[1] : 0.0), g});
        }
        std::stable_sort(gs.begin(), gs.end(), [](auto& a, auto& b) { return a.first > b.first; });
        std::vector<std::pair<double, int64_t>> cand;
        for (int64_t gi = 0; gi < c.topk_group; ++gi)
          for (int64_t e = gs[size_t(gi)].second * per; e < (gs[size_t(gi)].second + 1) * per; ++e) cand.push_back({ch[size_t(e)], e});
        std::stable_sort(cand.begin(), cand.end(), [](auto& a, auto& b) { return a.first > b.first; });
        double tot = 0;
        for (int64_t k = 0; k < c.num_experts_per_tok; ++k) tot += s[size_t(cand[size_t(k)].second)];
        for (int64_t k = 0; k < c.num_experts_per_tok; ++k) {
          int64_t e = cand[size_t(k)].second;
          double wt = s[size_t(e)] / (c.norm_topk_prob ? tot + 1e-20 : 1.0) * c.routed_scaling_factor;
          vec ye = swiglu(lw.experts[size_t(e)], hn);
          for (int64_t i = 0; i < H; ++i) y[size_t(i)] += wt * ye[size_t(i)];
        }
        if (lw.shared.inter > 0) {
          vec ys = swiglu(lw.shared, hn);
          for (int64_t i = 0; i < H; ++i) y[size_t(i)] += ys[size_t(i)];
        }
      }
      for (int64_t i = 0; i < H; ++i) x[size_t(t)][size_t(i)] += y[size_t(i)];
    }
  }
  std::vector<vec> out(static_cast<size_t>(L));
  for (int64_t t = 0; t < L; ++t) out[size_t(t)] = matvec(w.lm_head(), rms(x[size_t(t)], w.final_norm.f32(), eps), c.vocab_size);
  return out;
}

struct fixture {
  std::unique_ptr<backend> be = make_backend("cpu");
  std::unique_ptr<deepseek_model> model;
  explicit fixture(nlohmann::json cfg_json = test::tiny_config_json(), float stddev = 0.15f) {
    model_config cfg = model_config::from_json(cfg_json);
    model_weights w = make_dummy_weights(cfg, *be, 42, stddev);
    // A non-zero correction bias, so that routing exercises it.
    for (auto& l : w.layers)
      if (l.moe)
        for (int64_t e = 0; e < cfg.n_routed_experts; ++e) l.router_bias.f32()[e] = 0.05f * float((e * 7) % 5) - 0.1f;
    model = std::make_unique<deepseek_model>(cfg, std::move(w), *be);
  }
};

std::vector<int32_t> prompt_of(int64_t n, int32_t vocab, uint32_t seed = 3) {
  std::vector<int32_t> p(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p[size_t(i)] = int32_t((seed * 2654435761u + uint32_t(i) * 40503u) % uint32_t(vocab));
  return p;
}

double max_abs(std::span<const float> a) {
  double m = 0;
  for (float v : a) m = std::max(m, double(std::fabs(v)));
  return m;
}

} // namespace

TEST_CASE("forward matches an independent reference (prefill rows and cached decode)") {
  for (bool q_lora : {true, false}) {
    CAPTURE(q_lora);
    auto j = test::tiny_config_json();
    if (!q_lora) j["q_lora_rank"] = nullptr;
    fixture f(j);
    const model_config& c = f.model->config();
    auto ids = prompt_of(20, int32_t(c.vocab_size));
    auto ref = reference_logits(*f.model, ids);
    kv_pool kv(*f.be, c, 8, 4);
    kv_page_table t;
    REQUIRE(kv.reserve(t, 20));
    step_result out;
    // 12 prompt tokens in one prefill step, then 8 decode steps through the cache.
    sequence_step s{std::span<const int32_t>(ids).subspan(0, 12), 0, t.pages, true};
    f.model->forward({&s, 1}, kv, out);
    double worst = 0, scale = 0;
    for (int64_t r = 0; r < 12; ++r)
      for (int64_t v = 0; v < c.vocab_size; ++v) {
        worst = std::max(worst, std::fabs(out.row(r)[size_t(v)] - ref[size_t(r)][size_t(v)]));
        scale = std::max(scale, std::fabs(ref[size_t(r)][size_t(v)]));
      }
    for (int64_t p = 12; p < 20; ++p) {
      sequence_step d{std::span<const int32_t>(ids).subspan(size_t(p), 1), p, t.pages, false};
      f.model->forward({&d, 1}, kv, out);
      for (int64_t v = 0; v < c.vocab_size; ++v) worst = std::max(worst, std::fabs(out.last(0)[size_t(v)] - ref[size_t(p)][size_t(v)]));
    }
    CHECK(scale > 0.5); // the weights are large enough for the check to mean something
    CHECK(worst <= 1e-4 * scale);
  }
}

TEST_CASE("chunked prefill equals one-shot prefill, at any chunk size and page size") {
  fixture f;
  const model_config& c = f.model->config();
  auto ids = prompt_of(37, int32_t(c.vocab_size), 11);
  generate_options one;
  one.max_new_tokens = 6;
  one.prompt_logits = true;
  kv_pool kv64(*f.be, c, 4, 64);
  generate_result ref = generate(*f.model, kv64, ids, one);
  double scale = max_abs(ref.prompt_logits);
  for (int32_t page : {4, 16}) {
    for (int64_t chunk : {1, 5, 16, 36}) {
      CAPTURE(page);
      CAPTURE(chunk);
      kv_pool kv(*f.be, c, 16, page);
      generate_options o = one;
      o.prefill_chunk = chunk;
      generate_result r = generate(*f.model, kv, ids, o);
      CHECK(r.output_ids == ref.output_ids);
      REQUIRE(r.prompt_logits.size() == ref.prompt_logits.size());
      double worst = 0;
      for (size_t i = 0; i < r.prompt_logits.size(); ++i)
        worst = std::max(worst, double(std::fabs(r.prompt_logits[i] - ref.prompt_logits[i])));
      CHECK(worst <= 1e-5 * scale);
      CHECK(kv.allocator().free_count() == kv.num_pages()); // pages freed at request end
    }
  }
}

TEST_CASE("decode through the cache equals full recompute (within 1e-4 relative)") {
  fixture f;
  const model_config& c = f.model->config();
  auto ids = prompt_of(9, int32_t(c.vocab_size), 5);
  kv_pool kv(*f.be, c, 16, 4);
  generate_options o;
  o.max_new_tokens = 12;
  generate_result r = generate(*f.model, kv, ids, o);
  // Recompute: the whole sequence (prompt + generated) in one prefill, logits of every position.
  std::vector<int32_t> all = ids;
  all.insert(all.end(), r.output_ids.begin(), r.output_ids.end() - 1);
  kv_page_table t;
  REQUIRE(kv.reserve(t, int64_t(all.size())));
  sequence_step s{all, 0, t.pages, true};
  step_result full;
  f.model->forward({&s, 1}, kv, full);
  for (size_t k = 0; k < r.output_ids.size(); ++k) {
    auto row = full.row(int64_t(ids.size() + k) - 1);
    CHECK(argmax(row) == r.output_ids[k]);
  }
  // And the logits of a cached decode step equal the recompute's row.
  kv_page_table t2;
  REQUIRE(kv.reserve(t2, int64_t(all.size())));
  sequence_step pre{std::span<const int32_t>(all).subspan(0, all.size() - 1), 0, t2.pages, false};
  step_result o1;
  f.model->forward({&pre, 1}, kv, o1);
  sequence_step dec{std::span<const int32_t>(all).subspan(all.size() - 1, 1), int64_t(all.size() - 1), t2.pages, false};
  f.model->forward({&dec, 1}, kv, o1);
  auto want = full.row(int64_t(all.size()) - 1);
  double worst = 0, scale = max_abs(want);
  for (size_t v = 0; v < want.size(); ++v) worst = std::max(worst, double(std::fabs(o1.last(0)[v] - want[v])));
  CHECK(worst <= 1e-4 * scale);
  kv.release(t);
  kv.release(t2);
  CHECK(kv.allocator().free_count() == 16);
}

TEST_CASE("a mixed batch (prefill chunks + decodes) gives each sequence the logits it gets alone") {
  fixture f;
  const model_config& c = f.model->config();
  kv_pool kv(*f.be, c, 64, 4);
  auto a = prompt_of(10, int32_t(c.vocab_size), 1), b = prompt_of(7, int32_t(c.vocab_size), 2),
       d = prompt_of(13, int32_t(c.vocab_size), 3);
  kv_page_table ta, tb, td;
  REQUIRE(kv.reserve(ta, 11));
  REQUIRE(kv.reserve(tb, 8));
  REQUIRE(kv.reserve(td, 13));
  step_result out;
  // a and b prefilled alone first.
  sequence_step sa{std::span<const int32_t>(a).subspan(0, 9), 0, ta.pages, false};
  sequence_step sb{std::span<const int32_t>(b).subspan(0, 6), 0, tb.pages, false};
  f.model->forward({&sa, 1}, kv, out);
  f.model->forward({&sb, 1}, kv, out);
  // Batch: decode a, prefill d's first chunk (6 tokens), decode b.
  std::vector<sequence_step> batch = {{std::span<const int32_t>(a).subspan(9, 1), 9, ta.pages, false},
                                      {std::span<const int32_t>(d).subspan(0, 6), 0, td.pages, false},
                                      {std::span<const int32_t>(b).subspan(6, 1), 6, tb.pages, false}};
  f.model->forward(batch, kv, out);
  std::vector<std::vector<float>> got = {{out.last(0).begin(), out.last(0).end()},
                                         {out.last(1).begin(), out.last(1).end()},
                                         {out.last(2).begin(), out.last(2).end()}};
  // Second mixed step: d's second chunk alongside a decode of a.
  std::vector<sequence_step> batch2 = {{std::span<const int32_t>(d).subspan(6, 7), 6, td.pages, false},
                                       {std::span<const int32_t>(a).subspan(10, 0), 10, ta.pages, false}};
  batch2.pop_back();
  f.model->forward(batch2, kv, out);
  std::vector<float> got_d2(out.last(0).begin(), out.last(0).end());
  auto alone = [&](const std::vector<int32_t>& ids, size_t n) {
    kv_pool k2(*f.be, c, 8, 4);
    kv_page_table t;
    REQUIRE(k2.reserve(t, int64_t(n)));
    sequence_step s{std::span<const int32_t>(ids).subspan(0, n), 0, t.pages, false};
    step_result o;
    f.model->forward({&s, 1}, k2, o);
    return std::vector<float>(o.last(0).begin(), o.last(0).end());
  };
  auto close = [](const std::vector<float>& x, const std::vector<float>& y) {
    double w = 0, s = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      w = std::max(w, double(std::fabs(x[i] - y[i])));
      s = std::max(s, double(std::fabs(y[i])));
    }
    return w <= 1e-4 * s;
  };
  CHECK(close(got[0], alone(a, 10)));
  CHECK(close(got[1], alone(d, 6)));
  CHECK(close(got[2], alone(b, 7)));
  CHECK(close(got_d2, alone(d, 13)));
  // Routing counts: every MoE layer routed top_k experts per token of the last step (alone(d, 13)); dense layer 0 none.
  const auto& rc = f.model->routing_counts();
  REQUIRE(rc.size() == size_t(c.num_hidden_layers * c.n_routed_experts));
  CHECK(std::accumulate(rc.begin(), rc.begin() + c.n_routed_experts, int64_t(0)) == 0);
  CHECK(std::accumulate(rc.begin() + c.n_routed_experts, rc.begin() + 2 * c.n_routed_experts, int64_t(0)) ==
        13 * c.num_experts_per_tok);
}

TEST_CASE("forward rejects bad input with a clear message") {
  fixture f;
  kv_pool kv(*f.be, f.model->config(), 2, 4);
  kv_page_table t;
  REQUIRE(kv.reserve(t, 4));
  std::vector<int32_t> ids = {1, 2, 3, 4, 5};
  step_result out;
  sequence_step s{ids, 0, t.pages, false};
  CHECK_THROWS_WITH_AS(f.model->forward({&s, 1}, kv, out), doctest::Contains("page table holds 4"), std::invalid_argument);
  std::vector<int32_t> bad = {1, 600};
  sequence_step s2{bad, 0, t.pages, false};
  CHECK_THROWS_WITH_AS(f.model->forward({&s2, 1}, kv, out), doctest::Contains("token id 600"), std::invalid_argument);
}

TEST_CASE("router noaux_tc: hand-computed cases") {
  auto be = make_backend("cpu");
  SUBCASE("group selection uses the sum of the two best biased scores") {
    // s = sigmoid(logits); c = s + bias. Groups {0,1} {2,3} {4,5} {6,7}.
    std::vector<float> logits = {2, -1, 0, 0, 1, 3, 0, 0};
    std::vector<float> bias = {0, 0.5f, 0, 0, 0, 0, 0, 0};
    // c = .881 .769 | .5 .5 | .731 .953 | .5 .5 -> group scores 1.650, 1.0, 1.684, 1.0 -> keep groups 2 and 0.
    // Best two of the kept: expert 5 (.953) then expert 0 (.881).
    route_params p{8, 4, 2, 2, true, 2.5f};
    int32_t ids[2];
    float w[2];
    be->route_noaux_tc(mat_view(logits.data(), 1, 8), bias.data(), p, ids, w);
    CHECK(ids[0] == 5);
    CHECK(ids[1] == 0);
    double s5 = 1 / (1 + std::exp(-3.0)), s0 = 1 / (1 + std::exp(-2.0));
    CHECK(w[0] == doctest::Approx(s5 / (s5 + s0) * 2.5).epsilon(1e-6)); // unbiased s, normalised, scaled
    CHECK(w[1] == doctest::Approx(s0 / (s5 + s0) * 2.5).epsilon(1e-6));
  }
  SUBCASE("dropped groups are masked with -inf, not 0") {
    // c = 0.1 -0.2 | -0.3 -0.4: keep group 0 only. With 0.0 masking expert 2 (0 > -0.2) would win slot 2.
    std::vector<float> logits = {0, 0, 0, 0};
    std::vector<float> bias = {-0.4f, -0.7f, -0.8f, -0.9f};
    route_params p{4, 2, 1, 2, false, 1.0f};
    int32_t ids[2];
    float w[2];
    be->route_noaux_tc(mat_view(logits.data(), 1, 4), bias.data(), p, ids, w);
    CHECK(ids[0] == 0);
    CHECK(ids[1] == 1);
    CHECK(w[0] == doctest::Approx(0.5)); // no normalisation: the raw sigmoid
    CHECK(w[1] == doctest::Approx(0.5));
  }
}

TEST_CASE("page allocator: all-or-nothing, frees, rejects double free; pool layout is page-major") {
  kv_page_allocator a(5);
  auto p = a.allocate(3);
  REQUIRE(p);
  CHECK(a.free_count() == 2);
  CHECK_FALSE(a.allocate(3));
  CHECK(a.free_count() == 2);
  a.free(*p);
  CHECK(a.free_count() == 5);
  CHECK_THROWS_AS(a.free(*p), std::invalid_argument);
  auto q = a.allocate(2);
  REQUIRE(q);
  std::vector<int32_t> dup = {(*q)[0], (*q)[0]};
  CHECK_THROWS_AS(a.free(dup), std::invalid_argument);
  CHECK(a.free_count() == 3); // the failed free changed nothing
  a.free(*q);

  auto be = make_backend("cpu");
  model_config c = model_config::from_json(test::tiny_config_json());
  kv_pool pool(*be, c, 3, 16);
  CHECK(pool.bytes_per_page() == size_t(3 * 16 * 40 * 4));
  CHECK(pool.total_bytes() == 3 * pool.bytes_per_page());
  CHECK(static_cast<char*>(pool.page_ptr(2)) - static_cast<char*>(pool.base()) == ptrdiff_t(2 * pool.bytes_per_page()));
  CHECK(pool.geometry().entry(1, 2, 5) ==
        static_cast<float*>(pool.base()) + (1 * 3 * 16 + 2 * 16 + 5) * 40);
  kv_page_table t;
  CHECK(pool.reserve(t, 33));
  CHECK(t.pages.size() == 3);
  kv_page_table t2;
  CHECK_FALSE(pool.reserve(t2, 1));
  pool.release(t);
  CHECK(pool.allocator().free_count() == 3);
  CHECK(t.pages.empty());
}

TEST_CASE("the routed-expert seam: a replacement moe_experts is called per MoE layer and sees the routing") {
  fixture f;
  const model_config& c = f.model->config();
  struct counting_experts : moe_experts {
    local_moe_experts inner;
    std::vector<int32_t> layers;
    int64_t rows = 0;
    counting_experts(backend& be, const model_config& c, const model_weights& w) : inner(be, c, w) {}
    void run(int32_t layer, const mat_view& hidden, const moe_routing& r, const mat_view& out) override {
      layers.push_back(layer);
      rows += r.tokens;
      inner.run(layer, hidden, r, out);
    }
  };
  auto ids = prompt_of(11, int32_t(c.vocab_size), 9);
  kv_pool kv(*f.be, c, 8, 4);
  generate_options o;
  o.max_new_tokens = 3;
  o.prompt_logits = true;
  generate_result before = generate(*f.model, kv, ids, o);
  auto seam = std::make_shared<counting_experts>(*f.be, c, f.model->weights());
  f.model->set_moe_experts(seam);
  generate_result after = generate(*f.model, kv, ids, o);
  CHECK(after.output_ids == before.output_ids);
  CHECK(after.prompt_logits == before.prompt_logits);
  // 3 steps (prefill + 2 decodes) x 2 MoE layers.
  CHECK(seam->layers == std::vector<int32_t>{1, 2, 1, 2, 1, 2});
  CHECK(seam->rows == 2 * (11 + 1 + 1));
}

TEST_CASE("forward is callable from several threads, one model instance each") {
  fixture f1, f2;
  const model_config& c = f1.model->config();
  auto ids = prompt_of(30, int32_t(c.vocab_size), 4);
  generate_options o;
  o.max_new_tokens = 8;
  kv_pool k0(*f1.be, c, 8, 16);
  auto want = generate(*f1.model, k0, ids, o).output_ids;
  std::vector<int32_t> got1, got2;
  std::thread t1([&] {
    kv_pool kv(*f1.be, c, 8, 16);
    for (int i = 0; i < 5; ++i) got1 = generate(*f1.model, kv, ids, o).output_ids;
  });
  std::thread t2([&] {
    kv_pool kv(*f2.be, c, 8, 16);
    for (int i = 0; i < 5; ++i) got2 = generate(*f2.model, kv, ids, o).output_ids;
  });
  t1.join();
  t2.join();
  CHECK(got1 == want);
  CHECK(got2 == want);
}

TEST_CASE("KV moves as whole pages: decoding from copied pages in another pool continues identically") {
  fixture f;
  const model_config& c = f.model->config();
  auto ids = prompt_of(21, int32_t(c.vocab_size), 6);
  generate_options o;
  o.max_new_tokens = 6;
  kv_pool ref_pool(*f.be, c, 8, 4);
  auto want = generate(*f.model, ref_pool, ids, o).output_ids;

  // Prefill on the "prefill side".
  kv_pool src(*f.be, c, 16, 4);
  kv_page_table ts;
  REQUIRE(src.reserve(ts, 21));
  step_result out;
  sequence_step s{ids, 0, ts.pages, false};
  f.model->forward({&s, 1}, src, out);
  int32_t first = argmax(out.last(0));
  // The "decode side" takes different page numbers; each page is one contiguous byte range.
  kv_pool dst(*f.be, c, 16, 4);
  auto burn = dst.allocator().allocate(5); // so that the destination pages differ from the source ones
  REQUIRE(burn);
  kv_page_table td;
  REQUIRE(dst.reserve(td, 21 + 6));
  for (size_t i = 0; i < ts.pages.size(); ++i)
    std::memcpy(dst.page_ptr(td.pages[i]), src.page_ptr(ts.pages[i]), src.bytes_per_page());
  const std::vector<int32_t> src_pages = ts.pages;
  src.release(ts);
  std::vector<int32_t> got = {first};
  for (int64_t pos = 21; int64_t(got.size()) < o.max_new_tokens; ++pos) {
    sequence_step d{std::span<const int32_t>(&got.back(), 1), pos, td.pages, false};
    f.model->forward({&d, 1}, dst, out);
    got.push_back(argmax(out.last(0)));
  }
  CHECK(std::vector<int32_t>(td.pages.begin(), td.pages.begin() + std::ptrdiff_t(src_pages.size())) != src_pages);
  CHECK(got == want);
}
