#include "runtime/model.hpp"

#include <algorithm>
#include <stdexcept>

#include <unistd.h>

#include "runtime/safetensors.hpp"

namespace petrel {

// -- local_moe_experts ------------------------------------------------------------------------------------

local_moe_experts::local_moe_experts(backend& be, const model_config& cfg, const model_weights& w)
    : be_(be), cfg_(cfg), w_(w) {}

namespace {
void ensure_buf(backend& be, device_buffer& b, size_t bytes) {
  if (b.bytes() < bytes) b = be.allocate(std::max(bytes, b.bytes() * 3 / 2));
}
} // namespace

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
  ensure_buf(be_, rows_dev_, sizeof(int32_t) * size_t(std::max<int64_t>(n, 1)));
  ensure_buf(be_, weights_dev_, sizeof(float) * size_t(std::max<int64_t>(n, 1)));
  be_.copy_to_device(rows_dev_.data(), rows_host_.data(), sizeof(int32_t) * size_t(n));
  be_.copy_to_device(weights_dev_.data(), weights_host_.data(), sizeof(float) * size_t(n));
  ensure_buf(be_, x_, sizeof(float) * size_t(n * H));
  ensure_buf(be_, gate_up_, sizeof(float) * size_t(n * 2 * I));
  ensure_buf(be_, act_, sizeof(float) * size_t(n * I));
  ensure_buf(be_, y_, sizeof(float) * size_t(n * H));
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

float* deepseek_model::scratch::ensure(backend& be, size_t floats) {
  ensure_buf(be, buf, sizeof(float) * std::max<size_t>(floats, 1));
  return buf.f32();
}

deepseek_model::deepseek_model(model_config cfg, model_weights weights, backend& be)
    : cfg_(std::move(cfg)), w_(std::move(weights)), be_(be) {
  experts_ = std::make_shared<local_moe_experts>(be_, cfg_, w_);
  routing_counts_.assign(size_t(cfg_.num_hidden_layers * cfg_.n_routed_experts), 0);
  softmax_scale_ = float(cfg_.softmax_scale());
  rope_af_ = float(cfg_.rope_attention_factor());
}

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

void deepseek_model::mlp(const mlp_weights& m, const mat_view& x, const mat_view& out) {
  const int64_t T = x.rows, I = m.inter;
  mat_view gu(ffn_a_.ensure(be_, size_t(T * 2 * I)), T, 2 * I);
  mat_view act(ffn_b_.ensure(be_, size_t(T * I)), T, I);
  be_.linear(x, m.gate_up.f32(), gu);
  be_.silu_mul(gu, I, act);
  be_.linear(act, m.down.f32(), out);
}

void deepseek_model::ffn(int32_t layer, const mat_view& hn, const mat_view& out) {
  const layer_weights& L = w_.layers[size_t(layer)];
  if (!L.moe) {
    mlp(L.dense, hn, out);
    return;
  }
  const int64_t T = hn.rows, E = cfg_.n_routed_experts, K = cfg_.num_experts_per_tok;
  mat_view logits(ffn_c_.ensure(be_, size_t(T * std::max(E, cfg_.hidden_size))), T, E);
  be_.linear(hn, L.router.f32(), logits);
  route_params rp;
  rp.num_experts = int32_t(E);
  rp.n_group = int32_t(cfg_.n_group);
  rp.topk_group = int32_t(cfg_.topk_group);
  rp.top_k = int32_t(K);
  rp.norm_topk_prob = cfg_.norm_topk_prob;
  rp.routed_scaling_factor = float(cfg_.routed_scaling_factor);
  int32_t* ids = reinterpret_cast<int32_t*>(topk_ids_.ensure(be_, size_t(T * K)));
  float* wts = topk_w_.ensure(be_, size_t(T * K));
  be_.route_noaux_tc(logits, L.router_bias.f32(), rp, ids, wts);
  topk_ids_host_.resize(size_t(T * K));
  topk_w_host_.resize(size_t(T * K));
  be_.copy_to_host(topk_ids_host_.data(), ids, sizeof(int32_t) * size_t(T * K));
  be_.copy_to_host(topk_w_host_.data(), wts, sizeof(float) * size_t(T * K));
  int64_t* counts = routing_counts_.data() + layer * E;
  for (int32_t id : topk_ids_host_) counts[id]++;

  moe_routing r{ids, wts, topk_ids_host_.data(), topk_w_host_.data(), T, K};
  experts_->run(layer, hn, r, out);
  if (L.shared.inter > 0) {
    mat_view sh(ffn_c_.buf.f32(), T, cfg_.hidden_size); // router logits are consumed by now
    mlp(L.shared, hn, sh);
    be_.add_inplace(out, sh);
  }
}

void deepseek_model::attention(int32_t layer, const mat_view& hn, kv_pool& kv, const mat_view& attn) {
  const layer_weights& L = w_.layers[size_t(layer)];
  const int64_t T = hn.rows, heads = cfg_.num_attention_heads, nope = cfg_.qk_nope_head_dim,
                rope = cfg_.qk_rope_head_dim, vd = cfg_.v_head_dim, lora = cfg_.kv_lora_rank, qk = nope + rope,
                entry = lora + rope, kvw = nope + vd;
  const int32_t* dints = ints_.buf.i32();
  const float* cos_sin = cos_sin_.buf.f32();
  const kv_pool_geometry& g = kv.geometry();

  // Queries [T, heads*qk].
  mat_view q(q_.buf.f32(), T, heads * qk);
  if (cfg_.q_lora_rank > 0) {
    mat_view qa(q_a_.buf.f32(), T, cfg_.q_lora_rank);
    be_.linear(hn, L.q_a.f32(), qa);
    be_.rmsnorm(qa, L.q_a_norm.f32(), float(cfg_.rms_norm_eps), qa);
    be_.linear(qa, L.q_b.f32(), q);
  } else {
    be_.linear(hn, L.q.f32(), q);
  }
  be_.rope_interleaved(q, heads, qk, nope, rope, cos_sin);

  // Latent KV of the new tokens: [RMSNorm(c_kv) | rope(k_pe)], stored into the pages.
  mat_view ckv(ckv_.buf.f32(), T, entry);
  be_.linear(hn, L.kv_a.f32(), ckv);
  be_.rmsnorm(ckv.col_slice(0, lora), L.kv_a_norm.f32(), float(cfg_.rms_norm_eps), ckv.col_slice(0, lora));
  be_.rope_interleaved(ckv, 1, entry, lora, rope, cos_sin);
  be_.kv_store(g, layer, dints + off_slots_, T, ckv);

  // Prefill sequences: naive MLA over (cached + new) latents expanded through kv_b_proj.
  for (const prefill_seq& s : prefill_) {
    const int64_t ctx = s.start + s.n;
    mat_view lat;
    if (s.start == 0) {
      lat = ckv.row_slice(s.row0, s.n);
    } else {
      lat = mat_view(lat_.buf.f32(), ctx, entry);
      be_.kv_gather(g, layer, dints + off_ctx_slots_ + s.ctx_slot_off, ctx, lat);
    }
    mat_view kvb(kvb_.buf.f32(), ctx, heads * kvw);
    be_.linear(lat.col_slice(0, lora), L.kv_b.f32(), kvb);
    be_.mla_prefill_attention(q.row_slice(s.row0, s.n), kvb, lat.col_slice(lora, rope), attn.row_slice(s.row0, s.n),
                              heads, nope, rope, vd, s.start, softmax_scale_, scores_.buf.f32());
  }

  // Decode sequences: absorbed MLA straight from the pages.
  const int64_t B = int64_t(decode_rows_.size());
  if (B > 0) {
    mat_view qd = q;
    if (!pure_decode_) {
      qd = mat_view(qd_.buf.f32(), B, heads * qk);
      be_.gather_rows(q, dints + off_drows_, B, qd);
    }
    mat_view qabs(qabs_.buf.f32(), B, heads * entry);
    const float* kvb_w = L.kv_b.f32();
    for (int64_t h = 0; h < heads; ++h) {
      // q_nope_h [B, nope] x W_UK_h [nope, lora] -> the latent half of the absorbed query.
      be_.gemm(false, false, B, lora, nope, 1.0f, qd.data + h * qk, qd.ld, kvb_w + h * kvw * lora, lora, 0.0f,
               qabs.data + h * entry, qabs.ld);
      be_.copy_mat(qd.col_slice(h * qk + nope, rope), qabs.col_slice(h * entry + lora, rope));
    }
    decode_attention_batch db;
    db.pages = dints + off_pages_;
    db.page_offsets = dints + off_poffs_;
    db.ctx_lens = dints + off_ctx_;
    db.batch = int32_t(B);
    db.max_ctx = int32_t(max_ctx_);
    mat_view olat(olat_.buf.f32(), B, heads * lora);
    be_.mla_decode_attention(g, layer, db, qabs, olat, heads, lora, softmax_scale_, scores_.buf.f32());
    mat_view od = pure_decode_ ? attn : mat_view(od_.buf.f32(), B, heads * vd);
    for (int64_t h = 0; h < heads; ++h) {
      // out_lat_h [B, lora] x W_UV_h^T [lora, v]
      be_.gemm(false, true, B, vd, lora, 1.0f, olat.data + h * lora, olat.ld, kvb_w + (h * kvw + nope) * lora, lora,
               0.0f, od.data + h * vd, od.ld);
    }
    if (!pure_decode_) be_.scatter_rows(od, dints + off_drows_, B, attn);
  }
}

void deepseek_model::forward(std::span<const sequence_step> batch, kv_pool& kv, step_result& out) {
  std::lock_guard lock(mu_);
  const int64_t H = cfg_.hidden_size, V = cfg_.vocab_size, ps = kv.page_size();
  const int64_t heads = cfg_.num_attention_heads, qk = cfg_.qk_head_dim(), lora = cfg_.kv_lora_rank,
                rope = cfg_.qk_rope_head_dim, entry = lora + rope, vd = cfg_.v_head_dim;
  if (kv.geometry().entry_floats != entry || kv.geometry().num_layers != cfg_.num_hidden_layers)
    throw std::invalid_argument("forward: the KV pool was made for a different model shape");

  // -- plan the step on the host ------------------------------------------------------------------
  tokens_ = 0;
  max_ctx_ = 0;
  prefill_.clear();
  decode_rows_.clear();
  int64_t ctx_slots = 0, decode_pages = 0, max_prefill_ctx = 0, max_prefill_n = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const sequence_step& s = batch[i];
    const int64_t n = int64_t(s.tokens.size()), ctx = s.start_pos + n;
    if (n == 0) throw std::invalid_argument("forward: sequence " + std::to_string(i) + " has no new tokens");
    if (s.start_pos < 0) throw std::invalid_argument("forward: negative start position");
    if (ctx > int64_t(s.pages.size()) * ps)
      throw std::invalid_argument("forward: sequence " + std::to_string(i) + " needs " + std::to_string(ctx) +
                                  " cached tokens but its page table holds " + std::to_string(s.pages.size() * ps));
    for (int32_t p : s.pages.subspan(0, size_t(pages_for_tokens(ctx, int32_t(ps)))))
      if (p < 0 || p >= kv.num_pages())
        throw std::invalid_argument("forward: sequence " + std::to_string(i) + " names page " + std::to_string(p) +
                                    " outside the pool");
    for (int32_t t : s.tokens)
      if (t < 0 || t >= V)
        throw std::invalid_argument("forward: token id " + std::to_string(t) + " is outside the vocabulary [0, " +
                                    std::to_string(V) + ")");
    if (n == 1 && s.start_pos > 0) {
      decode_rows_.push_back(int32_t(tokens_));
      decode_pages += pages_for_tokens(ctx, int32_t(ps));
      max_ctx_ = std::max(max_ctx_, ctx);
    } else {
      prefill_.push_back({tokens_, n, s.start_pos, ctx_slots});
      if (s.start_pos > 0) ctx_slots += ctx;
      max_prefill_ctx = std::max(max_prefill_ctx, ctx);
      max_prefill_n = std::max(max_prefill_n, n);
    }
    tokens_ += n;
  }
  const int64_t T = tokens_, B = int64_t(decode_rows_.size());
  pure_decode_ = B == T;
  if (T == 0) {
    out.vocab = V;
    out.logits.clear();
    out.row_offset.assign(1, 0);
    return;
  }

  // Index arrays, one upload: ids | positions | slots | decode rows | pages | page offsets | ctx lens | ctx slots.
  off_ids_ = 0;
  off_pos_ = T;
  off_slots_ = 2 * T;
  off_drows_ = 3 * T;
  off_pages_ = off_drows_ + B;
  off_poffs_ = off_pages_ + decode_pages;
  off_ctx_ = off_poffs_ + B + 1;
  off_ctx_slots_ = off_ctx_ + B;
  host_ints_.resize(size_t(off_ctx_slots_ + ctx_slots));
  int32_t* hi = host_ints_.data();
  {
    int64_t row = 0, pg = 0, di = 0, cs = 0;
    for (const sequence_step& s : batch) {
      const int64_t n = int64_t(s.tokens.size()), ctx = s.start_pos + n;
      auto slot_of = [&](int64_t pos) { return int32_t(int64_t(s.pages[size_t(pos / ps)]) * ps + pos % ps); };
      for (int64_t k = 0; k < n; ++k, ++row) {
        hi[off_ids_ + row] = s.tokens[size_t(k)];
        hi[off_pos_ + row] = int32_t(s.start_pos + k);
        hi[off_slots_ + row] = slot_of(s.start_pos + k);
      }
      if (n == 1 && s.start_pos > 0) {
        hi[off_drows_ + di] = int32_t(row - 1);
        hi[off_poffs_ + di] = int32_t(pg);
        hi[off_ctx_ + di] = int32_t(ctx);
        for (int32_t k = 0; k < pages_for_tokens(ctx, int32_t(ps)); ++k) hi[off_pages_ + pg++] = s.pages[size_t(k)];
        ++di;
      } else if (s.start_pos > 0) {
        for (int64_t p = 0; p < ctx; ++p) hi[off_ctx_slots_ + cs++] = slot_of(p);
      }
    }
    hi[off_poffs_ + B] = int32_t(pg);
  }
  int32_t* dints = reinterpret_cast<int32_t*>(ints_.ensure(be_, host_ints_.size()));
  be_.copy_to_device(dints, host_ints_.data(), sizeof(int32_t) * host_ints_.size());

  // -- scratch sizes (grow only) --------------------------------------------------------------------
  x_.ensure(be_, size_t(T * H));
  hn_.ensure(be_, size_t(T * H));
  tmp_h_.ensure(be_, size_t(T * H));
  if (cfg_.q_lora_rank > 0) q_a_.ensure(be_, size_t(T * cfg_.q_lora_rank));
  q_.ensure(be_, size_t(T * heads * qk));
  ckv_.ensure(be_, size_t(T * entry));
  attn_.ensure(be_, size_t(T * heads * vd));
  cos_sin_.ensure(be_, size_t(T * rope));
  lat_.ensure(be_, size_t(max_prefill_ctx * entry));
  kvb_.ensure(be_, size_t(max_prefill_ctx * heads * (cfg_.qk_nope_head_dim + vd)));
  scores_.ensure(be_, size_t(std::max(max_prefill_n * max_prefill_ctx, heads * max_ctx_)));
  if (B > 0) {
    qd_.ensure(be_, size_t(B * heads * qk));
    qabs_.ensure(be_, size_t(B * heads * entry));
    olat_.ensure(be_, size_t(B * heads * lora));
    od_.ensure(be_, size_t(B * heads * vd));
  }
  std::fill(routing_counts_.begin(), routing_counts_.end(), 0);

  // -- the layers -------------------------------------------------------------------------------------
  mat_view x(x_.buf.f32(), T, H), hn(hn_.buf.f32(), T, H), tmp(tmp_h_.buf.f32(), T, H);
  mat_view attn(attn_.buf.f32(), T, heads * vd);
  be_.embedding(dints + off_ids_, T, w_.embed.f32(), H, x.data);
  be_.rope_cos_sin(dints + off_pos_, T, w_.rope_inv_freq.f32(), rope, rope_af_, cos_sin_.buf.f32());
  const float eps = float(cfg_.rms_norm_eps);
  for (int32_t l = 0; l < int32_t(cfg_.num_hidden_layers); ++l) {
    const layer_weights& L = w_.layers[size_t(l)];
    be_.rmsnorm(x, L.input_norm.f32(), eps, hn);
    attention(l, hn, kv, attn);
    be_.linear(attn, L.o.f32(), tmp);
    be_.add_inplace(x, tmp);
    be_.rmsnorm(x, L.post_attn_norm.f32(), eps, hn);
    ffn(l, hn, tmp);
    be_.add_inplace(x, tmp);
  }

  // -- logits of the requested rows ---------------------------------------------------------------------
  logit_rows_.clear();
  out.row_offset.assign(1, 0);
  {
    int64_t row = 0;
    for (const sequence_step& s : batch) {
      const int64_t n = int64_t(s.tokens.size());
      if (s.all_logits)
        for (int64_t k = 0; k < n; ++k) logit_rows_.push_back(int32_t(row + k));
      else
        logit_rows_.push_back(int32_t(row + n - 1));
      out.row_offset.push_back(int64_t(logit_rows_.size()));
      row += n;
    }
  }
  const int64_t R = int64_t(logit_rows_.size());
  // The row list rides in the (already consumed) slots section of the index buffer when it fits.
  int32_t* drows = dints + off_slots_;
  if (R > T) drows = reinterpret_cast<int32_t*>(qd_.ensure(be_, size_t(R)));
  be_.copy_to_device(drows, logit_rows_.data(), sizeof(int32_t) * size_t(R));
  mat_view fh(final_h_.ensure(be_, size_t(R * H)), R, H);
  be_.gather_rows(x, drows, R, fh);
  be_.rmsnorm(fh, w_.final_norm.f32(), eps, fh);
  mat_view logits(logits_dev_.ensure(be_, size_t(R * V)), R, V);
  be_.linear(fh, w_.lm_head(), logits);
  out.vocab = V;
  out.logits.resize(size_t(R * V));
  be_.copy_to_host(out.logits.data(), logits.data, sizeof(float) * size_t(R * V));
}

} // namespace petrel
