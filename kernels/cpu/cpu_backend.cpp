// cpu backend: host memory, OpenBLAS GEMMs, fp32 loops for the rest.
// Bounds: GEMMs are compute bound in OpenBLAS; norms, rope, gathers are memory bound and tiny next to them.
#include "kernels/cpu/cpu_backend.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include <cblas.h>

namespace petrel::kernels {

cpu_backend::cpu_backend() {
  if (!std::getenv("OPENBLAS_NUM_THREADS")) openblas_set_num_threads(1);
}

void cpu_backend::set_num_threads(int threads) { openblas_set_num_threads(threads < 1 ? 1 : threads); }

// -- memory --------------------------------------------------------------------------------------------

device_buffer cpu_backend::allocate(size_t bytes) {
  size_t rounded = (std::max<size_t>(bytes, 1) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded);
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, rounded);
  return device_buffer(this, p, bytes);
}

void cpu_backend::deallocate(void* ptr, size_t) { std::free(ptr); }
void cpu_backend::copy_to_device(void* dst, const void* src, size_t bytes) {
  if (bytes) std::memcpy(dst, src, bytes);
}
void cpu_backend::copy_to_host(void* dst, const void* src, size_t bytes) {
  if (bytes) std::memcpy(dst, src, bytes);
}
void cpu_backend::copy_device(void* dst, const void* src, size_t bytes) {
  if (bytes) std::memmove(dst, src, bytes);
}
void cpu_backend::fill_zero(void* dst, size_t bytes) {
  if (bytes) std::memset(dst, 0, bytes);
}

// -- dense math ----------------------------------------------------------------------------------------

void cpu_backend::gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                       int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    return;
  }
  // Few rows (decode): sgemm would pack the whole weight matrix for each call, which costs more than the math.
  // A matrix-vector product per row streams the weights once per row instead.
  static const int64_t small_m = [] {
    const char* e = std::getenv("PETREL_CPU_GEMV_ROWS");
    return e ? std::atoll(e) : 4;
  }();
  if (!trans_a && m <= small_m) {
    for (int64_t i = 0; i < m; ++i)
      cblas_sgemv(CblasRowMajor, trans_b ? CblasNoTrans : CblasTrans, int(trans_b ? n : k), int(trans_b ? k : n), alpha,
                  b, int(ldb), a + i * lda, 1, beta, c + i * ldc, 1);
    return;
  }
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, int(m),
              int(n), int(k), alpha, a, int(lda), b, int(ldb), beta, c, int(ldc));
}

void cpu_backend::embedding(const int32_t* ids, int64_t n, const float* table, int64_t hidden, float* out) {
  for (int64_t t = 0; t < n; ++t)
    std::memcpy(out + t * hidden, table + int64_t(ids[t]) * hidden, sizeof(float) * hidden);
}

void cpu_backend::rmsnorm(const mat_view& x, const float* w, float eps, const mat_view& out) {
  for (int64_t r = 0; r < x.rows; ++r) {
    const float* xr = x.data + r * x.ld;
    float* yr = out.data + r * out.ld;
    double ss = 0.0;
    for (int64_t i = 0; i < x.cols; ++i) ss += double(xr[i]) * xr[i];
    float inv = 1.0f / std::sqrt(float(ss / double(x.cols)) + eps);
    for (int64_t i = 0; i < x.cols; ++i) yr[i] = w[i] * (xr[i] * inv);
  }
}

void cpu_backend::copy_mat(const mat_view& src, const mat_view& dst) {
  for (int64_t r = 0; r < src.rows; ++r)
    std::memcpy(dst.data + r * dst.ld, src.data + r * src.ld, sizeof(float) * src.cols);
}

void cpu_backend::add_inplace(const mat_view& x, const mat_view& y) {
  for (int64_t r = 0; r < x.rows; ++r) {
    float* xr = x.data + r * x.ld;
    const float* yr = y.data + r * y.ld;
    for (int64_t i = 0; i < x.cols; ++i) xr[i] += yr[i];
  }
}

void cpu_backend::silu_mul(const mat_view& gu, int64_t inter, const mat_view& out) {
  for (int64_t r = 0; r < gu.rows; ++r) {
    const float* g = gu.data + r * gu.ld;
    const float* u = g + inter;
    float* o = out.data + r * out.ld;
    for (int64_t i = 0; i < inter; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

void cpu_backend::rope_cos_sin(const int32_t* positions, int64_t n, const float* inv_freq, int64_t rope_dim,
                               float af, float* cs) {
  int64_t half = rope_dim / 2;
  for (int64_t r = 0; r < n; ++r) {
    float* row = cs + r * rope_dim;
    for (int64_t i = 0; i < half; ++i) {
      float angle = float(positions[r]) * inv_freq[i]; // fp32 product, as the reference computes it
      row[i] = std::cos(angle) * af;
      row[half + i] = std::sin(angle) * af;
    }
  }
}

void cpu_backend::rope_interleaved(const mat_view& x, int64_t heads, int64_t head_stride, int64_t offset,
                                   int64_t rope_dim, const float* cs) {
  int64_t half = rope_dim / 2;
  for (int64_t r = 0; r < x.rows; ++r) {
    const float* c = cs + r * rope_dim;
    const float* s = c + half;
    for (int64_t h = 0; h < heads; ++h) {
      float* p = x.data + r * x.ld + h * head_stride + offset;
      for (int64_t i = 0; i < half; ++i) {
        float x0 = p[2 * i], x1 = p[2 * i + 1];
        p[2 * i] = x0 * c[i] - x1 * s[i];
        p[2 * i + 1] = x1 * c[i] + x0 * s[i];
      }
    }
  }
}

// -- MLA -------------------------------------------------------------------------------------------------

void cpu_backend::kv_store(const kv_pool_geometry& pool, int32_t layer, const int32_t* slots, int64_t n,
                           const mat_view& src) {
  for (int64_t i = 0; i < n; ++i) {
    if (slots[i] < 0) continue; // padding row
    float* dst = pool.entry(slots[i] / pool.page_size, layer, slots[i] % pool.page_size);
    std::memcpy(dst, src.data + i * src.ld, sizeof(float) * pool.entry_floats);
  }
}

void cpu_backend::kv_gather(const kv_pool_geometry& pool, int32_t layer, const int32_t* slots, int64_t n,
                            const mat_view& dst) {
  for (int64_t i = 0; i < n; ++i) {
    const float* src = pool.entry(slots[i] / pool.page_size, layer, slots[i] % pool.page_size);
    std::memcpy(dst.data + i * dst.ld, src, sizeof(float) * pool.entry_floats);
  }
}

namespace {

// Softmax of row[0..valid) scaled by `scale`; entries from `valid` to `len` become 0.
void softmax_row(float* row, int64_t valid, int64_t len, float scale) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < valid; ++j) mx = std::max(mx, row[j] * scale);
  float sum = 0.0f;
  for (int64_t j = 0; j < valid; ++j) {
    float e = std::exp(row[j] * scale - mx);
    row[j] = e;
    sum += e;
  }
  float inv = 1.0f / sum;
  for (int64_t j = 0; j < valid; ++j) row[j] *= inv;
  for (int64_t j = valid; j < len; ++j) row[j] = 0.0f;
}

} // namespace

void cpu_backend::mla_prefill_attention(const mat_view& q, const mat_view& kv, const mat_view& k_pe,
                                        const mat_view& out, int64_t heads, int64_t nope, int64_t rope,
                                        int64_t v_dim, int64_t start, float scale, float* s) {
  const int64_t n = q.rows;
  const int64_t qk = nope + rope, kvw = nope + v_dim;
  // Query rows in blocks: block [i0, i1) needs keys 0 .. start+i1-1 only, which halves a causal prompt's work.
  constexpr int64_t block = 64;
  for (int64_t i0 = 0; i0 < n; i0 += block) {
    const int64_t bn = std::min(block, n - i0), keys = start + i0 + bn;
    for (int64_t h = 0; h < heads; ++h) {
      const float* qh = q.data + i0 * q.ld + h * qk;
      const float* kh = kv.data + h * kvw;
      // S = Q_nope K_nope^T + Q_pe K_pe^T  [bn, keys]
      gemm(false, true, bn, keys, nope, 1.0f, qh, q.ld, kh, kv.ld, 0.0f, s, keys);
      gemm(false, true, bn, keys, rope, 1.0f, qh + nope, q.ld, k_pe.data, k_pe.ld, 1.0f, s, keys);
      for (int64_t i = 0; i < bn; ++i) softmax_row(s + i * keys, start + i0 + i + 1, keys, scale);
      // O_h = P V_h  [bn, v]
      gemm(false, false, bn, v_dim, keys, 1.0f, s, keys, kh + nope, kv.ld, 0.0f, out.data + i0 * out.ld + h * v_dim,
           out.ld);
    }
  }
}

void cpu_backend::mla_decode_attention(const kv_pool_geometry& pool, int32_t layer, const decode_attention_batch& b,
                                       const mat_view& q_abs, const mat_view& out_lat, int64_t heads,
                                       int64_t kv_lora, float scale, float* s) {
  const int64_t entry = pool.entry_floats, ps = pool.page_size;
  for (int32_t bi = 0; bi < b.batch; ++bi) {
    const int64_t ctx = b.ctx_lens[bi];
    const int32_t* pages = b.pages + b.page_offsets[bi];
    const int64_t npages = (ctx + ps - 1) / ps;
    const float* qb = q_abs.data + bi * q_abs.ld; // [heads, entry]
    float* ob = out_lat.data + bi * out_lat.ld;    // [heads, kv_lora]
    // Scores [heads, ctx]: one GEMM per page against the page's contiguous [slots, entry] block of this layer.
    for (int64_t j = 0; j < npages; ++j) {
      int64_t rows = std::min(ps, ctx - j * ps);
      const float* kp = pool.entry(pages[j], layer, 0);
      gemm(false, true, heads, rows, entry, 1.0f, qb, entry, kp, entry, 0.0f, s + j * ps, ctx);
    }
    for (int64_t h = 0; h < heads; ++h) softmax_row(s + h * ctx, ctx, ctx, scale);
    for (int64_t j = 0; j < npages; ++j) {
      int64_t rows = std::min(ps, ctx - j * ps);
      const float* kp = pool.entry(pages[j], layer, 0);
      gemm(false, false, heads, kv_lora, rows, 1.0f, s + j * ps, ctx, kp, entry, j == 0 ? 0.0f : 1.0f, ob, kv_lora);
    }
  }
}

// -- MoE -------------------------------------------------------------------------------------------------

void cpu_backend::route_noaux_tc(const mat_view& logits, const float* bias, const route_params& p, int32_t* ids,
                                 float* weights) {
  const int64_t E = p.num_experts, G = std::max(1, p.n_group), per_group = E / G;
  std::vector<float> sig(E), choice(E), group_score(G);
  std::vector<int32_t> order(std::max<int64_t>(E, G));
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < logits.rows; ++t) {
    const float* l = logits.data + t * logits.ld;
    for (int64_t e = 0; e < E; ++e) {
      sig[e] = 1.0f / (1.0f + std::exp(-l[e]));
      choice[e] = sig[e] + (bias ? bias[e] : 0.0f);
    }
    // A group's score is the sum of its two best biased scores (its only one when a group has one expert).
    for (int64_t g = 0; g < G; ++g) {
      float best = neg_inf, second = neg_inf;
      for (int64_t e = g * per_group; e < (g + 1) * per_group; ++e) {
        float c = choice[e];
        if (c > best) {
          second = best;
          best = c;
        } else if (c > second) {
          second = c;
        }
      }
      group_score[g] = per_group >= 2 ? best + second : best;
    }
    // Keep the topk_group best groups (lower index wins ties); mask the rest with -inf.
    for (int64_t g = 0; g < G; ++g) order[g] = int32_t(g);
    std::stable_sort(order.begin(), order.begin() + G,
                     [&](int32_t a, int32_t b2) { return group_score[a] > group_score[b2]; });
    for (int64_t gi = p.topk_group; gi < G; ++gi)
      for (int64_t e = order[gi] * per_group; e < (order[gi] + 1) * per_group; ++e) choice[e] = neg_inf;
    for (int64_t e = 0; e < E; ++e) order[e] = int32_t(e);
    std::partial_sort(order.begin(), order.begin() + p.top_k, order.begin() + E, [&](int32_t a, int32_t b2) {
      return choice[a] > choice[b2] || (choice[a] == choice[b2] && a < b2);
    });
    float sum = 0.0f;
    for (int32_t k = 0; k < p.top_k; ++k) sum += sig[order[k]];
    float norm = p.norm_topk_prob ? 1.0f / (sum + 1e-20f) : 1.0f;
    for (int32_t k = 0; k < p.top_k; ++k) {
      ids[t * p.top_k + k] = order[k];
      weights[t * p.top_k + k] = sig[order[k]] * norm * p.routed_scaling_factor;
    }
  }
}

void cpu_backend::gather_rows(const mat_view& src, const int32_t* rows, int64_t n, const mat_view& dst) {
  for (int64_t i = 0; i < n; ++i)
    std::memcpy(dst.data + i * dst.ld, src.data + int64_t(rows[i]) * src.ld, sizeof(float) * src.cols);
}

void cpu_backend::scatter_rows(const mat_view& src, const int32_t* rows, int64_t n, const mat_view& dst) {
  for (int64_t i = 0; i < n; ++i)
    std::memcpy(dst.data + int64_t(rows[i]) * dst.ld, src.data + i * src.ld, sizeof(float) * src.cols);
}

void cpu_backend::scatter_add_rows(const mat_view& src, const int32_t* rows, const float* w, int64_t n,
                                   const mat_view& dst) {
  for (int64_t i = 0; i < n; ++i) {
    float* d = dst.data + int64_t(rows[i]) * dst.ld;
    const float* s = src.data + i * src.ld;
    float wi = w ? w[i] : 1.0f;
    for (int64_t c = 0; c < src.cols; ++c) d[c] += wi * s[c];
  }
}

// -- graph-safe MoE (host loops here; the cuda backend keeps everything on the device) ------------------------

void cpu_backend::moe_permute(const int32_t* ids, const float* w, int64_t tokens, int64_t top_k, int64_t E,
                              int32_t* offsets, int32_t* rows, float* pw) {
  const int64_t n = tokens * top_k;
  std::fill(offsets, offsets + E + 1, 0);
  for (int64_t i = 0; i < n; ++i) offsets[ids[i] + 1]++;
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  std::vector<int32_t> cursor(offsets, offsets + E);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t pos = cursor[size_t(ids[i])]++;
    rows[pos] = int32_t(i / top_k);
    if (w && pw) pw[pos] = w[i];
  }
}

void cpu_backend::grouped_expert_ffn(const int32_t* offsets, int64_t E, const float* const* gate_up_w,
                                     const float* const* down_w, int64_t hidden, int64_t inter, int64_t max_rows,
                                     const mat_view& x, float* gu, float* act, const mat_view& y) {
  mat_view g(gu, max_rows, 2 * inter), a(act, max_rows, inter);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = offsets[e], cnt = std::min<int64_t>(offsets[e + 1], max_rows) - r0;
    if (cnt <= 0) continue;
    linear(x.row_slice(r0, cnt).col_slice(0, hidden), gate_up_w[e], g.row_slice(r0, cnt));
    silu_mul(g.row_slice(r0, cnt), inter, a.row_slice(r0, cnt));
    linear(a.row_slice(r0, cnt), down_w[e], y.row_slice(r0, cnt).col_slice(0, hidden));
  }
}

void cpu_backend::expert_histogram(const int32_t* ids, int64_t n, int64_t top_k, const int32_t* valid, int32_t* counts) {
  const int64_t lim = std::min<int64_t>(n, int64_t(*valid) * top_k);
  for (int64_t i = 0; i < lim; ++i) counts[ids[i]]++;
}

} // namespace petrel::kernels
