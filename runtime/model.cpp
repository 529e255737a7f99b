#include "runtime/model.hpp"

#include <algorithm>
#include <cstdlib>
#include <stdexcept>

#include <unistd.h>

#include "runtime/safetensors.hpp"

namespace petrel {

// -- local_moe_experts ------------------------------------------------------------------------------------

local_moe_experts::local_moe_experts(backend& be, const model_config& cfg, const model_weights& w)
    : be_(be), cfg_(cfg), w_(w) {}

void local_moe_experts::run(int32_t layer, const mat_view& hidden, const moe_routing& r, const mat_view& out) {
  const int64_t E = cfg_.n_routed_experts, H = cfg_.hidden_size, I = cfg_.moe_intermediate_size;
  const int64_t n = r.tokens * r.top_k;
  const layer_weights& L = w_.layers[size_t(layer)];
  // Counting sort of the (token, k) pairs by expert: rows of one expert become contiguous.
  offsets_.assign(size_t(E + 1), 0);
  for (int64_t i = 0; i < n; ++i) offsets_[size_t(r.topk_ids_host[i]) + 1]++;
  for (int64_t e = 0; e < E; ++e) offsets_[size_t(e + 1)] += offsets_[size_t(e)];
  rows_host_.resize(size_t(n));
  weights_host_.resize(size_t(n));
  std::vector<int64_t>& fill = offsets_; // reuse: walk a copy of the starts
  cursor_.assign(fill.begin(), fill.end() - 1);
  std::vector<int64_t>& cursor = cursor_;
  for (int64_t i = 0; i < n; ++i) {
    int64_t pos = cursor[size_t(r.topk_ids_host[i])]++;
    rows_host_[size_t(pos)] = int32_t(i / r.top_k);
    weights_host_[size_t(pos)] = r.topk_weights_host[i];
  }
  grow_buffer(be_, rows_dev_, sizeof(int32_t) * size_t(std::max<int64_t>(n, 1)));
  grow_buffer(be_, weights_dev_, sizeof(float) * size_t(std::max<int64_t>(n, 1)));
  be_.copy_to_device(rows_dev_.data(), rows_host_.data(), sizeof(int32_t) * size_t(n));
  be_.copy_to_device(weights_dev_.data(), weights_host_.data(), sizeof(float) * size_t(n));
  grow_buffer(be_, x_, sizeof(float) * size_t(n * H));
  grow_buffer(be_, gate_up_, sizeof(float) * size_t(n * 2 * I));
  grow_buffer(be_, act_, sizeof(float) * size_t(n * I));
  grow_buffer(be_, y_, sizeof(float) * size_t(n * H));
  mat_view x(x_.f32(), n, H), gu(gate_up_.f32(), n, 2 * I), act(act_.f32(), n, I), y(y_.f32(), n, H);
  be_.gather_rows(hidden, rows_dev_.i32(), n, x);
  for (int64_t e = 0; e < E; ++e) {
    int64_t a = fill[size_t(e)], cnt = fill[size_t(e + 1)] - a;
    if (cnt == 0) continue;
    be_.linear(x.row_slice(a, cnt), L.experts[size_t(e)].gate_up.f32(), gu.row_slice(a, cnt));
  }
  be_.silu_mul(gu, I, act);
  for (int64_t e = 0; e < E; ++e) {
    int64_t a = fill[size_t(e)], cnt = fill[size_t(e + 1)] - a;
    if (cnt == 0) continue;
    be_.linear(act.row_slice(a, cnt), L.experts[size_t(e)].down.f32(), y.row_slice(a, cnt));
  }
  if (out.contiguous())
    be_.fill_zero(out.data, sizeof(float) * size_t(out.rows * out.cols));
  else
    for (int64_t t = 0; t < out.rows; ++t) be_.fill_zero(out.data + t * out.ld, sizeof(float) * size_t(out.cols));
  be_.scatter_add_rows(y, rows_dev_.i32(), weights_dev_.f32(), n, out);
}

// -- deepseek_model ---------------------------------------------------------------------------------------

namespace {
struct scratch_buffer {
  device_buffer buf;
  float* ensure(backend& be, size_t floats) {
    grow_buffer(be, buf, sizeof(float) * std::max<size_t>(floats, 1));
    return buf.f32();
  }
};
} // namespace

/// Everything one forward pass plans and writes, apart from the weights and the KV pool: two of these let two
/// micro-batches be in flight on one model.
struct forward_scratch {
  // -- per-step plan (host) ------------------------------------------------------------------------
  struct prefill_seq {
    int64_t row0, n, start;
    int64_t ctx_slot_off; // into the ctx-slot section of ints
  };
  std::vector<prefill_seq> prefill;
  std::vector<int32_t> decode_rows;
  bool pure_decode = false;
  int64_t tokens = 0, max_ctx = 0;
  std::vector<int32_t> host_ints; // ids | positions | slots | decode rows | pages | offs | ctx | ctx slots
  int64_t off_ids = 0, off_pos = 0, off_slots = 0, off_drows = 0, off_pages = 0, off_poffs = 0, off_ctx = 0,
          off_ctx_slots = 0;
  std::vector<int32_t> logit_rows;
  std::vector<int32_t> topk_ids_host;
  std::vector<float> topk_w_host;

  // -- scratch (backend) ---------------------------------------------------------------------------
  scratch_buffer ints, x, hn, q_a, q, ckv, attn, tmp_h, ffn_a, ffn_b, ffn_c, lat, kvb, scores, qd, qabs, olat, od,
      cos_sin, topk_ids, topk_w, logits_dev, final_h;
  // Device-side MoE of the fixed-layout (graph) decode step.
  scratch_buffer moe_off, moe_rows, moe_w, moe_x, moe_gu, moe_act, moe_y;
  int64_t off_valid = 0; // the number of real sequences (graph step)
};

deepseek_model::deepseek_model(model_config cfg, model_weights weights, backend& be)
    : cfg_(std::move(cfg)), w_(std::move(weights)), be_(be) {
  experts_ = std::make_shared<local_moe_experts>(be_, cfg_, w_);
  routing_counts_.assign(size_t(cfg_.num_hidden_layers * cfg_.n_routed_experts), 0);
  softmax_scale_ = float(cfg_.softmax_scale());
  rope_af_ = float(cfg_.rope_attention_factor());
  route_.num_experts = int32_t(cfg_.n_routed_experts);
  route_.n_group = int32_t(cfg_.n_group);
  route_.topk_group = int32_t(cfg_.topk_group);
  route_.top_k = int32_t(cfg_.num_experts_per_tok);
  route_.norm_topk_prob = cfg_.norm_topk_prob;
  route_.routed_scaling_factor = float(cfg_.routed_scaling_factor);
  for (auto& s : scratch_) s = std::make_unique<forward_scratch>();
  // On by default where the backend has graphs (cuda); PETREL_DECODE_GRAPHS=0 or 1 overrides.
  decode_graphs_ = be_.supports_graphs();
  if (const char* e = std::getenv("PETREL_DECODE_GRAPHS")) decode_graphs_ = std::string(e) == "1";
}

deepseek_model::~deepseek_model() = default;

std::unique_ptr<deepseek_model> deepseek_model::load(const std::filesystem::path& dir, backend& be, bool dummy,
                                                     uint64_t seed) {
  model_config cfg = model_config::load(dir);
  if (be.name() == "cpu") {
    // fp32 weights live in host memory: refuse up front rather than die in the middle of loading.
    const double need = double(cfg.parameter_count()) * sizeof(float);
    const double have = double(sysconf(_SC_PHYS_PAGES)) * double(sysconf(_SC_PAGE_SIZE));
    if (have > 0 && need > have)
      throw model_load_error(dir.string() + ": the model needs " + std::to_string(int64_t(need / (1 << 30))) +
                             " GiB of fp32 weights but this machine has " + std::to_string(int64_t(have / (1 << 30))) +
                             " GiB of memory");
  }
  model_weights w = dummy ? make_dummy_weights(cfg, be, seed) : load_weights(cfg, checkpoint::open(dir), be);
  return std::make_unique<deepseek_model>(std::move(cfg), std::move(w), be);
}

void deepseek_model::mlp(forward_scratch& s, const mlp_weights& m, const mat_view& x, const mat_view& out) {
  const int64_t T = x.rows, I = m.inter;
  mat_view gu(s.ffn_a.ensure(be_, size_t(T * 2 * I)), T, 2 * I);
  mat_view act(s.ffn_b.ensure(be_, size_t(T * I)), T, I);
  be_.linear(x, m.gate_up.f32(), gu);
  be_.silu_mul(gu, I, act);
  be_.linear(act, m.down.f32(), out);
}

void deepseek_model::route(forward_scratch& s, int32_t layer, const mat_view& hn, moe_routing& r) {
  const layer_weights& L = w_.layers[size_t(layer)];
  const int64_t T = hn.rows, E = cfg_.n_routed_experts, K = cfg_.num_experts_per_tok;
  int32_t* ids = reinterpret_cast<int32_t*>(s.topk_ids.ensure(be_, size_t(T * K)));
  float* wts = s.topk_w.ensure(be_, size_t(T * K));
  s.topk_ids_host.resize(size_t(T * K));
  s.topk_w_host.resize(size_t(T * K));
  if (T > 0) {
    mat_view logits(s.ffn_c.ensure(be_, size_t(T * std::max(E, cfg_.hidden_size))), T, E);
    be_.linear(hn, L.router.f32(), logits);
    be_.route_noaux_tc(logits, L.router_bias.f32(), route_, ids, wts);
    be_.copy_to_host(s.topk_ids_host.data(), ids, sizeof(int32_t) * size_t(T * K));
    be_.copy_to_host(s.topk_w_host.data(), wts, sizeof(float) * size_t(T * K));
    int64_t* counts = routing_counts_.data() + layer * E;
    for (int32_t id : s.topk_ids_host) counts[id]++;
  }
  r = moe_routing{ids, wts, s.topk_ids_host.data(), s.topk_w_host.data(), T, K};
}

void deepseek_model::attention(forward_scratch& s, int32_t layer, const mat_view& hn, kv_pool& kv,
                               const mat_view& attn) {
  const layer_weights& L = w_.layers[size_t(layer)];
  const int64_t T = hn.rows, heads = cfg_.num_attention_heads, nope = cfg_.qk_nope_head_dim,
                rope = cfg_.qk_rope_head_dim, vd = cfg_.v_head_dim, lora = cfg_.kv_lora_rank, qk = nope + rope,
                entry = lora + rope, kvw = nope + vd;
  const int32_t* dints = s.ints.buf.i32();
  const float* cos_sin = s.cos_sin.buf.f32();
  const kv_pool_geometry& g = kv.geometry();

  // Queries [T, heads*qk].
  mat_view q(s.q.buf.f32(), T, heads * qk);
  if (cfg_.q_lora_rank > 0) {
    mat_view qa(s.q_a.buf.f32(), T, cfg_.q_lora_rank);
    be_.linear(hn, L.q_a.f32(), qa);
    be_.rmsnorm(qa, L.q_a_norm.f32(), float(cfg_.rms_norm_eps), qa);
    be_.linear(qa, L.q_b.f32(), q);
  } else {
    be_.linear(hn, L.q.f32(), q);
  }
  be_.rope_interleaved(q, heads, qk, nope, rope, cos_sin);

  // Latent KV of the new tokens: [RMSNorm(c_kv) | rope(k_pe)], stored into the pages.
  mat_view ckv(s.ckv.buf.f32(), T, entry);
  be_.linear(hn, L.kv_a.f32(), ckv);
  be_.rmsnorm(ckv.col_slice(0, lora), L.kv_a_norm.f32(), float(cfg_.rms_norm_eps), ckv.col_slice(0, lora));
  be_.rope_interleaved(ckv, 1, entry, lora, rope, cos_sin);
  be_.kv_store(g, layer, dints + s.off_slots, T, ckv);

  // Prefill sequences: naive MLA over (cached + new) latents expanded through kv_b_proj.
  for (const forward_scratch::prefill_seq& p : s.prefill) {
    const int64_t ctx = p.start + p.n;
    mat_view lat;
    if (p.start == 0) {
      lat = ckv.row_slice(p.row0, p.n);
    } else {
      lat = mat_view(s.lat.buf.f32(), ctx, entry);
      be_.kv_gather(g, layer, dints + s.off_ctx_slots + p.ctx_slot_off, ctx, lat);
    }
    mat_view kvb(s.kvb.buf.f32(), ctx, heads * kvw);
    be_.linear(lat.col_slice(0, lora), L.kv_b.f32(), kvb);
    be_.mla_prefill_attention(q.row_slice(p.row0, p.n), kvb, lat.col_slice(lora, rope), attn.row_slice(p.row0, p.n),
                              heads, nope, rope, vd, p.start, softmax_scale_, s.scores.buf.f32());
  }

  // Decode sequences: absorbed MLA straight from the pages.
  const int64_t B = int64_t(s.decode_rows.size());
  if (B > 0) {
    mat_view qd = q;
    if (!s.pure_decode) {
      qd = mat_view(s.qd.buf.f32(), B, heads * qk);
      be_.gather_rows(q, dints + s.off_drows, B, qd);
    }
    mat_view qabs(s.qabs.buf.f32(), B, heads * entry);
    const float* kvb_w = L.kv_b.f32();
    for (int64_t h = 0; h < heads; ++h) {
      // q_nope_h [B, nope] x W_UK_h [nope, lora] -> the latent half of the absorbed query.
      be_.gemm(false, false, B, lora, nope, 1.0f, qd.data + h * qk, qd.ld, kvb_w + h * kvw * lora, lora, 0.0f,
               qabs.data + h * entry, qabs.ld);
      be_.copy_mat(qd.col_slice(h * qk + nope, rope), qabs.col_slice(h * entry + lora, rope));
    }
    decode_attention_batch db;
    db.pages = dints + s.off_pages;
    db.page_offsets = dints + s.off_poffs;
    db.ctx_lens = dints + s.off_ctx;
    db.batch = int32_t(B);
    db.max_ctx = int32_t(s.max_ctx);
    mat_view olat(s.olat.buf.f32(), B, heads * lora);
    be_.mla_decode_attention(g, layer, db, qabs, olat, heads, lora, softmax_scale_, s.scores.buf.f32());
    mat_view od = s.pure_decode ? attn : mat_view(s.od.buf.f32(), B, heads * vd);
    for (int64_t h = 0; h < heads; ++h) {
      // out_lat_h [B, lora] x W_UV_h^T [lora, v]
      be_.gemm(false, true, B, vd, lora, 1.0f, olat.data + h * lora, olat.ld, kvb_w + (h * kvw + nope) * lora, lora,
               0.0f, od.data + h * vd, od.ld);
    }
    if (!s.pure_decode) be_.scatter_rows(od, dints + s.off_drows, B, attn);
  }
}

void deepseek_model::attention_block(forward_scratch& s, int32_t layer, kv_pool& kv, const mat_view& x,
                                     const mat_view& hn, const mat_view& attn, const mat_view& tmp) {
  const layer_weights& L = w_.layers[size_t(layer)];
  const float eps = float(cfg_.rms_norm_eps);
  be_.rmsnorm(x, L.input_norm.f32(), eps, hn);
  attention(s, layer, hn, kv, attn);
  be_.linear(attn, L.o.f32(), tmp);
  be_.add_inplace(x, tmp);
  be_.rmsnorm(x, L.post_attn_norm.f32(), eps, hn);
}

void deepseek_model::plan(forward_scratch& s, std::span<const sequence_step> batch, kv_pool& kv) {
  const int64_t V = cfg_.vocab_size, ps = kv.page_size();
  const int64_t entry = cfg_.kv_lora_rank + cfg_.qk_rope_head_dim;
  if (kv.geometry().entry_floats != entry || kv.geometry().num_layers != cfg_.num_hidden_layers)
    throw std::invalid_argument("forward: the KV pool was made for a different model shape");

  s.tokens = 0;
  s.max_ctx = 0;
  s.prefill.clear();
  s.decode_rows.clear();
  int64_t ctx_slots = 0, decode_pages = 0, max_prefill_ctx = 0, max_prefill_n = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const sequence_step& q = batch[i];
    const int64_t n = int64_t(q.tokens.size()), ctx = q.start_pos + n;
    if (n == 0) throw std::invalid_argument("forward: sequence " + std::to_string(i) + " has no new tokens");
    if (q.start_pos < 0) throw std::invalid_argument("forward: negative start position");
    if (ctx > int64_t(q.pages.size()) * ps)
      throw std::invalid_argument("forward: sequence " + std::to_string(i) + " needs " + std::to_string(ctx) +
                                  " cached tokens but its page table holds " + std::to_string(q.pages.size() * ps));
    for (int32_t p : q.pages.subspan(0, size_t(pages_for_tokens(ctx, int32_t(ps)))))
      if (p < 0 || p >= kv.num_pages())
        throw std::invalid_argument("forward: sequence " + std::to_string(i) + " names page " + std::to_string(p) +
                                    " outside the pool");
    for (int32_t t : q.tokens)
      if (t < 0 || t >= V)
        throw std::invalid_argument("forward: token id " + std::to_string(t) + " is outside the vocabulary [0, " +
                                    std::to_string(V) + ")");
    if (n == 1 && q.start_pos > 0) {
      s.decode_rows.push_back(int32_t(s.tokens));
      decode_pages += pages_for_tokens(ctx, int32_t(ps));
      s.max_ctx = std::max(s.max_ctx, ctx);
    } else {
      s.prefill.push_back({s.tokens, n, q.start_pos, ctx_slots});
      if (q.start_pos > 0) ctx_slots += ctx;
      max_prefill_ctx = std::max(max_prefill_ctx, ctx);
      max_prefill_n = std::max(max_prefill_n, n);
    }
    s.tokens += n;
  }
  const int64_t T = s.tokens, B = int64_t(s.decode_rows.size());
  s.pure_decode = B == T;
  if (T == 0) return;

  // Index arrays, one upload: ids | positions | slots | decode rows | pages | page offsets | ctx lens | ctx slots.
  s.off_ids = 0;
  s.off_pos = T;
  s.off_slots = 2 * T;
  s.off_drows = 3 * T;
  s.off_pages = s.off_drows + B;
  s.off_poffs = s.off_pages + decode_pages;
  s.off_ctx = s.off_poffs + B + 1;
  s.off_ctx_slots = s.off_ctx + B;
  s.host_ints.resize(size_t(s.off_ctx_slots + ctx_slots));
  int32_t* hi = s.host_ints.data();
  {
    int64_t row = 0, pg = 0, di = 0, cs = 0;
    for (const sequence_step& q : batch) {
      const int64_t n = int64_t(q.tokens.size()), ctx = q.start_pos + n;
      auto slot_of = [&](int64_t pos) { return int32_t(int64_t(q.pages[size_t(pos / ps)]) * ps + pos % ps); };
      for (int64_t k = 0; k < n; ++k, ++row) {
        hi[s.off_ids + row] = q.tokens[size_t(k)];
        hi[s.off_pos + row] = int32_t(q.start_pos + k);
        hi[s.off_slots + row] = slot_of(q.start_pos + k);
      }
      if (n == 1 && q.start_pos > 0) {
        hi[s.off_drows + di] = int32_t(row - 1);
        hi[s.off_poffs + di] = int32_t(pg);
        hi[s.off_ctx + di] = int32_t(ctx);
        for (int32_t k = 0; k < pages_for_tokens(ctx, int32_t(ps)); ++k) hi[s.off_pages + pg++] = q.pages[size_t(k)];
        ++di;
      } else if (q.start_pos > 0) {
        for (int64_t p = 0; p < ctx; ++p) hi[s.off_ctx_slots + cs++] = slot_of(p);
      }
    }
    hi[s.off_poffs + B] = int32_t(pg);
  }
  int32_t* dints = reinterpret_cast<int32_t*>(s.ints.ensure(be_, s.host_ints.size()));
  be_.copy_to_device(dints, s.host_ints.data(), sizeof(int32_t) * s.host_ints.size());

  size_scratch(s, B, max_prefill_ctx, max_prefill_n);
}

void deepseek_model::size_scratch(forward_scratch& s, int64_t B, int64_t max_prefill_ctx, int64_t max_prefill_n) {
  const int64_t heads = cfg_.num_attention_heads, qk = cfg_.qk_head_dim(), lora = cfg_.kv_lora_rank,
                rope = cfg_.qk_rope_head_dim, entry = lora + rope, vd = cfg_.v_head_dim, H = cfg_.hidden_size;
  const int64_t T = s.tokens;
  // -- scratch sizes (grow only) --------------------------------------------------------------------
  s.x.ensure(be_, size_t(T * H));
  s.hn.ensure(be_, size_t(T * H));
  s.tmp_h.ensure(be_, size_t(T * H));
  if (cfg_.q_lora_rank > 0) s.q_a.ensure(be_, size_t(T * cfg_.q_lora_rank));
  s.q.ensure(be_, size_t(T * heads * qk));
  s.ckv.ensure(be_, size_t(T * entry));
  s.attn.ensure(be_, size_t(T * heads * vd));
  s.cos_sin.ensure(be_, size_t(T * rope));
  s.lat.ensure(be_, size_t(max_prefill_ctx * entry));
  s.kvb.ensure(be_, size_t(max_prefill_ctx * heads * (cfg_.qk_nope_head_dim + vd)));
  s.scores.ensure(be_, size_t(std::max(max_prefill_n * max_prefill_ctx, heads * s.max_ctx)));
  if (B > 0) {
    s.qd.ensure(be_, size_t(B * heads * qk));
    s.qabs.ensure(be_, size_t(B * heads * entry));
    s.olat.ensure(be_, size_t(B * heads * lora));
    s.od.ensure(be_, size_t(B * heads * vd));
  }
}

void deepseek_model::logits(forward_scratch& s, std::span<const sequence_step> batch, const mat_view& x,
                            step_result& out) {
  const int64_t H = cfg_.hidden_size, V = cfg_.vocab_size, T = s.tokens;
  s.logit_rows.clear();
  out.row_offset.assign(1, 0);
  {
    int64_t row = 0;
    for (const sequence_step& q : batch) {
      const int64_t n = int64_t(q.tokens.size());
      if (q.all_logits)
        for (int64_t k = 0; k < n; ++k) s.logit_rows.push_back(int32_t(row + k));
      else
        s.logit_rows.push_back(int32_t(row + n - 1));
      out.row_offset.push_back(int64_t(s.logit_rows.size()));
      row += n;
    }
  }
  const int64_t R = int64_t(s.logit_rows.size());
  // The row list rides in the (already consumed) slots section of the index buffer when it fits.
  int32_t* drows = s.ints.buf.i32() + s.off_slots;
  if (R > T) drows = reinterpret_cast<int32_t*>(s.qd.ensure(be_, size_t(R)));
  be_.copy_to_device(drows, s.logit_rows.data(), sizeof(int32_t) * size_t(R));
  mat_view fh(s.final_h.ensure(be_, size_t(R * H)), R, H);
  be_.gather_rows(x, drows, R, fh);
  be_.rmsnorm(fh, w_.final_norm.f32(), float(cfg_.rms_norm_eps), fh);
  mat_view lg(s.logits_dev.ensure(be_, size_t(R * V)), R, V);
  be_.linear(fh, w_.lm_head(), lg);
  out.vocab = V;
  out.logits.resize(size_t(R * V));
  be_.copy_to_host(out.logits.data(), lg.data, sizeof(float) * size_t(R * V));
}

forward_task deepseek_model::forward_ops(std::span<const sequence_step> batch, kv_pool& kv, step_result& out,
                                         int slot, moe_experts& experts) {
  if (slot < 0 || slot > 1) throw std::invalid_argument("forward_ops: slot must be 0 or 1");
  forward_scratch& s = *scratch_[size_t(slot)];
  plan(s, batch, kv);
  const int64_t H = cfg_.hidden_size, T = s.tokens, heads = cfg_.num_attention_heads, vd = cfg_.v_head_dim;
  const int64_t rope = cfg_.qk_rope_head_dim;
  co_await std::suspend_always{}; // the plan is made: a partner micro-batch may plan too

  // An empty batch only takes part in the experts' all-to-alls (it may still compute other ranks' rows).
  mat_view x(s.x.ensure(be_, size_t(T * H)), T, H), hn(s.hn.ensure(be_, size_t(T * H)), T, H),
      tmp(s.tmp_h.ensure(be_, size_t(T * H)), T, H);
  mat_view attn(s.attn.ensure(be_, size_t(T * heads * vd)), T, heads * vd);
  if (T > 0) {
    const int32_t* dints = s.ints.buf.i32();
    be_.embedding(dints + s.off_ids, T, w_.embed.f32(), H, x.data);
    be_.rope_cos_sin(dints + s.off_pos, T, w_.rope_inv_freq.f32(), rope, rope_af_, s.cos_sin.buf.f32());
  }
  for (int32_t l = 0; l < int32_t(cfg_.num_hidden_layers); ++l) {
    const layer_weights& L = w_.layers[size_t(l)];
    if (T > 0)
      attention_block(s, l, kv, x, hn, attn, tmp);
    if (!L.moe) {
      if (T > 0) {
        mlp(s, L.dense, hn, tmp);
        be_.add_inplace(x, tmp);
      }
      continue;
    }
    moe_routing r;
    route(s, l, hn, r);
    experts.dispatch_start(slot, l, hn, r);
    // The shared expert overlaps the dispatch (router logits in ffn_c are consumed by now).
    mat_view sh(s.ffn_c.ensure(be_, size_t(T * std::max(cfg_.n_routed_experts, H))), T, H);
    const bool shared = L.shared.inter > 0 && T > 0;
    if (shared) mlp(s, L.shared, hn, sh);
    co_await std::suspend_always{}; // dispatch in flight
    experts.expert_compute(slot);
    co_await std::suspend_always{}; // combine in flight
    experts.combine_finish(slot, tmp);
    if (T > 0) {
      if (shared) be_.add_inplace(tmp, sh);
      be_.add_inplace(x, tmp);
    }
  }
  if (T == 0) {
    out.vocab = cfg_.vocab_size;
    out.logits.clear();
    out.row_offset.assign(1, 0);
    co_return;
  }
  logits(s, batch, x, out);
}

// -- the fixed-layout decode step (CUDA graphs) --------------------------------------------------------------

namespace {
constexpr int64_t kMaxGraphBucket = 256;
int64_t graph_bucket(int64_t b) {
  int64_t k = 1;
  while (k < b) k *= 2;
  return k;
}
} // namespace

bool deepseek_model::graph_step_fits(std::span<const sequence_step> batch, kv_pool& kv) const {
  if (!decode_graphs_ || (!be_.supports_graphs() && !graphs_without_support_)) return false;
  if (!dynamic_cast<const local_moe_experts*>(experts_.get())) return false; // expert parallelism: eager
  if (batch.empty() || int64_t(batch.size()) > kMaxGraphBucket) return false;
  if (kv.geometry().entry_floats != cfg_.kv_lora_rank + cfg_.qk_rope_head_dim ||
      kv.geometry().num_layers != cfg_.num_hidden_layers)
    return false; // the ordinary path reports it
  for (const sequence_step& q : batch)
    if (q.tokens.size() != 1 || q.start_pos <= 0) return false;
  return true;
}

void deepseek_model::graph_step_body(forward_scratch& s, kv_pool& kv) {
  const int64_t H = cfg_.hidden_size, T = s.tokens, heads = cfg_.num_attention_heads, vd = cfg_.v_head_dim,
                rope = cfg_.qk_rope_head_dim, E = cfg_.n_routed_experts, K = cfg_.num_experts_per_tok,
                I = cfg_.moe_intermediate_size, V = cfg_.vocab_size, n = T * K;
  const float eps = float(cfg_.rms_norm_eps);
  const int32_t* dints = s.ints.buf.i32();
  mat_view x(s.x.buf.f32(), T, H), hn(s.hn.buf.f32(), T, H), tmp(s.tmp_h.buf.f32(), T, H);
  mat_view attn(s.attn.buf.f32(), T, heads * vd);
  be_.embedding(dints + s.off_ids, T, w_.embed.f32(), H, x.data);
  be_.rope_cos_sin(dints + s.off_pos, T, w_.rope_inv_freq.f32(), rope, rope_af_, s.cos_sin.buf.f32());
  be_.fill_zero(counts_dev_.data(), counts_dev_.bytes());
  const auto* ptrs = reinterpret_cast<const float* const*>(expert_ptrs_.data());
  for (int32_t l = 0; l < int32_t(cfg_.num_hidden_layers); ++l) {
    const layer_weights& L = w_.layers[size_t(l)];
    attention_block(s, l, kv, x, hn, attn, tmp);
    if (!L.moe) {
      mlp(s, L.dense, hn, tmp);
      be_.add_inplace(x, tmp);
      continue;
    }
    // Routing, then the routed experts on the device: permute, grouped FFN, weighted scatter-add.
    int32_t* ids = reinterpret_cast<int32_t*>(s.topk_ids.buf.f32());
    float* wts = s.topk_w.buf.f32();
    mat_view logits(s.ffn_c.buf.f32(), T, E);
    be_.linear(hn, L.router.f32(), logits);
    be_.route_noaux_tc(logits, L.router_bias.f32(), route_, ids, wts);
    be_.expert_histogram(ids, n, K, dints + s.off_valid, reinterpret_cast<int32_t*>(counts_dev_.data()) + l * E);
    int32_t* offs = reinterpret_cast<int32_t*>(s.moe_off.buf.f32());
    int32_t* rows = reinterpret_cast<int32_t*>(s.moe_rows.buf.f32());
    be_.moe_permute(ids, wts, T, K, E, offs, rows, s.moe_w.buf.f32());
    mat_view xg(s.moe_x.buf.f32(), n, H), yg(s.moe_y.buf.f32(), n, H);
    be_.gather_rows(hn, rows, n, xg);
    be_.grouped_expert_ffn(offs, E, ptrs + (2 * l) * E, ptrs + (2 * l + 1) * E, H, I, n, xg, s.moe_gu.buf.f32(),
                           s.moe_act.buf.f32(), yg);
    be_.fill_zero(tmp.data, sizeof(float) * size_t(T * H));
    be_.scatter_add_rows(yg, rows, s.moe_w.buf.f32(), n, tmp);
    if (L.shared.inter > 0) {
      mat_view sh(s.ffn_c.buf.f32(), T, H);
      mlp(s, L.shared, hn, sh);
      be_.add_inplace(tmp, sh);
    }
    be_.add_inplace(x, tmp);
  }
  // Every row is a logit row (one token per sequence): no gather.
  mat_view fh(s.final_h.buf.f32(), T, H);
  be_.rmsnorm(x, w_.final_norm.f32(), eps, fh);
  be_.linear(fh, w_.lm_head(), mat_view(s.logits_dev.buf.f32(), T, V));
}

void deepseek_model::forward_graph(std::span<const sequence_step> batch, kv_pool& kv, step_result& out) {
  const int64_t B = int64_t(batch.size()), V = cfg_.vocab_size, ps = kv.page_size(), H = cfg_.hidden_size,
                E = cfg_.n_routed_experts, K = cfg_.num_experts_per_tok, I = cfg_.moe_intermediate_size,
                LN = cfg_.num_hidden_layers;
  // Validation, as in plan().
  int64_t max_ctx = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const sequence_step& q = batch[i];
    const int64_t ctx = q.start_pos + 1;
    if (ctx > int64_t(q.pages.size()) * ps)
      throw std::invalid_argument("forward: sequence " + std::to_string(i) + " needs " + std::to_string(ctx) +
                                  " cached tokens but its page table holds " + std::to_string(q.pages.size() * ps));
    for (int32_t p : q.pages.subspan(0, size_t(pages_for_tokens(ctx, int32_t(ps)))))
      if (p < 0 || p >= kv.num_pages())
        throw std::invalid_argument("forward: sequence " + std::to_string(i) + " names page " + std::to_string(p) +
                                    " outside the pool");
    if (q.tokens[0] < 0 || q.tokens[0] >= V)
      throw std::invalid_argument("forward: token id " + std::to_string(q.tokens[0]) +
                                  " is outside the vocabulary [0, " + std::to_string(V) + ")");
    max_ctx = std::max(max_ctx, ctx);
  }
  // The bucket and the context bound fix every launch shape of the step.
  const int64_t Tb = graph_bucket(B);
  int64_t ctx_bound = std::max<int64_t>(64, ps);
  while (ctx_bound < max_ctx) ctx_bound *= 2;
  const int64_t pps = pages_for_tokens(ctx_bound, int32_t(ps));
  const uint64_t key = (uint64_t(ctx_bound) << 20) | uint64_t(Tb);

  // Buffers the graphs point at: built once; a new key (whose eager run may regrow the backend's workspaces)
  // or another KV pool drops every graph.
  if (graph_kv_base_ != kv.geometry().base || graph_kv_page_size_ != kv.geometry().page_size) {
    be_.clear_step_graphs();
    graph_scratch_.clear();
    graph_kv_base_ = kv.geometry().base;
    graph_kv_page_size_ = kv.geometry().page_size;
  }
  if (!expert_ptrs_.data()) {
    std::vector<const float*> p(size_t(LN * 2 * E), nullptr);
    for (int64_t l = 0; l < LN; ++l) {
      const layer_weights& L = w_.layers[size_t(l)];
      if (!L.moe) continue;
      for (int64_t e = 0; e < E; ++e) {
        p[size_t((2 * l) * E + e)] = L.experts[size_t(e)].gate_up.f32();
        p[size_t((2 * l + 1) * E + e)] = L.experts[size_t(e)].down.f32();
      }
    }
    expert_ptrs_ = be_.allocate(sizeof(float*) * p.size());
    be_.copy_to_device(expert_ptrs_.data(), p.data(), sizeof(float*) * p.size());
    counts_dev_ = be_.allocate(sizeof(int32_t) * size_t(std::max<int64_t>(LN * E, 1)));
  }
  auto it = graph_scratch_.find(key);
  if (it == graph_scratch_.end()) {
    be_.clear_step_graphs();
    it = graph_scratch_.emplace(key, std::make_unique<forward_scratch>()).first;
    forward_scratch& s = *it->second;
    s.tokens = Tb;
    s.pure_decode = true;
    s.max_ctx = ctx_bound;
    s.decode_rows.resize(size_t(Tb));
    for (int64_t r = 0; r < Tb; ++r) s.decode_rows[size_t(r)] = int32_t(r);
    s.off_ids = 0;
    s.off_pos = Tb;
    s.off_slots = 2 * Tb;
    s.off_drows = 3 * Tb; // unused (pure decode), kept empty
    s.off_pages = 3 * Tb;
    s.off_poffs = s.off_pages + Tb * pps;
    s.off_ctx = s.off_poffs + Tb + 1;
    s.off_valid = s.off_ctx + Tb;
    s.off_ctx_slots = s.off_valid + 1;
    s.host_ints.assign(size_t(s.off_ctx_slots), 0);
    s.ints.ensure(be_, s.host_ints.size());
    size_scratch(s, Tb, 0, 0);
    const int64_t n = Tb * K;
    int64_t max_inter = 1;
    for (const layer_weights& L : w_.layers) max_inter = std::max({max_inter, L.dense.inter, L.shared.inter});
    s.ffn_a.ensure(be_, size_t(Tb * 2 * max_inter));
    s.ffn_b.ensure(be_, size_t(Tb * max_inter));
    s.ffn_c.ensure(be_, size_t(Tb * std::max(E, H)));
    s.topk_ids.ensure(be_, size_t(n));
    s.topk_w.ensure(be_, size_t(n));
    s.moe_off.ensure(be_, size_t(E + 1));
    s.moe_rows.ensure(be_, size_t(n));
    s.moe_w.ensure(be_, size_t(n));
    s.moe_x.ensure(be_, size_t(n * H));
    s.moe_gu.ensure(be_, size_t(n * 2 * I));
    s.moe_act.ensure(be_, size_t(n * I));
    s.moe_y.ensure(be_, size_t(n * H));
    s.final_h.ensure(be_, size_t(Tb * H));
    s.logits_dev.ensure(be_, size_t(Tb * V));
  }
  forward_scratch& s = *it->second;

  // The index arrays of this step, one upload; padding rows read page 0 of sequence 0 (context 1), store nothing.
  int32_t* hi = s.host_ints.data();
  const int32_t pad_page = batch[0].pages[0];
  for (int64_t b = 0; b < Tb; ++b) {
    int32_t* pg = hi + s.off_pages + b * pps;
    hi[s.off_poffs + b] = int32_t(b * pps);
    if (b < B) {
      const sequence_step& q = batch[size_t(b)];
      const int64_t pos = q.start_pos, ctx = pos + 1, np = pages_for_tokens(ctx, int32_t(ps));
      hi[s.off_ids + b] = q.tokens[0];
      hi[s.off_pos + b] = int32_t(pos);
      hi[s.off_slots + b] = int32_t(int64_t(q.pages[size_t(pos / ps)]) * ps + pos % ps);
      hi[s.off_ctx + b] = int32_t(ctx);
      for (int64_t k = 0; k < pps; ++k) pg[k] = k < np ? q.pages[size_t(k)] : q.pages[0];
    } else {
      hi[s.off_ids + b] = 0;
      hi[s.off_pos + b] = 0;
      hi[s.off_slots + b] = -1;
      hi[s.off_ctx + b] = 1;
      for (int64_t k = 0; k < pps; ++k) pg[k] = pad_page;
    }
  }
  hi[s.off_poffs + Tb] = int32_t(Tb * pps);
  hi[s.off_valid] = int32_t(B);
  be_.copy_to_device(s.ints.buf.data(), s.host_ints.data(), sizeof(int32_t) * s.host_ints.size());

  const bool graphed = be_.run_step_graph(key, [&] { graph_step_body(s, kv); });
  last_step_mode_ = graphed ? 2 : 1;

  out.vocab = V;
  out.row_offset.resize(size_t(B + 1));
  for (int64_t b = 0; b <= B; ++b) out.row_offset[size_t(b)] = b;
  out.logits.resize(size_t(B * V));
  be_.copy_to_host(out.logits.data(), s.logits_dev.buf.data(), sizeof(float) * size_t(B * V));
  counts_host_.resize(size_t(LN * E));
  if (!counts_host_.empty()) {
    be_.copy_to_host(counts_host_.data(), counts_dev_.data(), sizeof(int32_t) * counts_host_.size());
    for (size_t i = 0; i < counts_host_.size(); ++i) routing_counts_[i] += counts_host_[i];
  }
}

void deepseek_model::forward(std::span<const sequence_step> batch, kv_pool& kv, step_result& out) {
  std::lock_guard lock(mu_);
  last_step_mode_ = 0;
  if (batch.empty()) {
    out.vocab = cfg_.vocab_size;
    out.logits.clear();
    out.row_offset.assign(1, 0);
    return;
  }
  clear_routing_counts();
  if (graph_step_fits(batch, kv)) {
    forward_graph(batch, kv, out);
    return;
  }
  forward_task t = forward_ops(batch, kv, out, 0, *experts_);
  t.run_to_end();
}

} // namespace petrel
