#include "runtime/ep.hpp"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <numeric>
#include <stdexcept>

namespace petrel::ep {

namespace {

/// model layer -> MoE layer index (-1 for dense layers).
std::vector<int> moe_index_of(const model_config& cfg) {
  std::vector<int> idx(size_t(cfg.num_hidden_layers), -1);
  int n = 0;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    if (cfg.is_moe_layer(l)) idx[size_t(l)] = n++;
  return idx;
}

void ensure_buf(backend& be, device_buffer& b, size_t bytes) { grow_buffer(be, b, std::max<size_t>(bytes, 64)); }

mlp_weights copy_expert(backend& be, const mlp_weights& src) {
  mlp_weights w;
  w.inter = src.inter;
  w.gate_up = be.allocate(src.gate_up.bytes());
  w.down = be.allocate(src.down.bytes());
  be.copy_device(w.gate_up.data(), src.gate_up.data(), src.gate_up.bytes());
  be.copy_device(w.down.data(), src.down.data(), src.down.bytes());
  return w;
}

// Little byte writer/reader for the all-to-all messages (host memory).
template <class T>
void put(byte_buffer& b, const T* data, size_t n) {
  const size_t at = b.size();
  b.resize(at + n * sizeof(T));
  if (n) std::memcpy(b.data() + at, data, n * sizeof(T));
}

struct reader {
  const byte_buffer& b;
  size_t at = 0;
  template <class T>
  void get(T* out, size_t n, const char* what) {
    if (at + n * sizeof(T) > b.size())
      throw std::runtime_error(std::string("expert all-to-all: short message (") + what + ")");
    if (n) std::memcpy(out, b.data() + at, n * sizeof(T));
    at += n * sizeof(T);
  }
};

std::vector<std::span<const std::byte>> spans_of(const std::vector<byte_buffer>& v) {
  std::vector<std::span<const std::byte>> s;
  s.reserve(v.size());
  for (const auto& b : v) s.emplace_back(b.data(), b.size());
  return s;
}

} // namespace

const char* mode_name(ep_mode m) { return m == ep_mode::normal ? "normal" : "low_latency"; }

// -- ep_moe_experts -----------------------------------------------------------------------------------

struct ep_moe_experts::pending {
  int32_t layer = 0;
  int moe_layer = 0;
  int64_t T = 0;
  int K = 0;
  uint64_t dispatch_tag = 0, combine_tag = 0;
  const float* weights_dev = nullptr;
  std::vector<int32_t> ids, phys; // [T*K] logical and physical experts of this rank's tokens
  std::vector<float> x_host;      // [T*H]
  std::vector<byte_buffer> send, recv, back_send, back_recv;
  std::vector<std::vector<int32_t>> sent_pairs; // per destination: pairs (t*K+k) in the order outputs come back
  // receiving side
  std::vector<int32_t> recv_slots;
  std::vector<float> recv_x;
  std::vector<int64_t> recv_tokens; // per source
  moe::contiguous_layout contiguous;
  moe::masked_layout masked;
  std::vector<float> rows_host, y_host;
  device_buffer rows_dev, gu_dev, act_dev, y_dev, pairs_dev, idx_dev;
  std::vector<float> pairs_host;
  std::vector<int32_t> idx_host;
  bool on_device = false;   // this layer's rows go through the GPU data plane
  device_buffer slots_dev;  // [T*K] physical slots (the plane's routing)
};

ep_moe_experts::ep_moe_experts(ep_rank& rank) : rank_(rank) {
  for (auto& p : p_) p = std::make_unique<pending>();
}
ep_moe_experts::~ep_moe_experts() = default;

void ep_moe_experts::run(int32_t layer, const mat_view& hidden, const moe_routing& routing, const mat_view& out) {
  dispatch_start(0, layer, hidden, routing);
  expert_compute(0);
  combine_finish(0, out);
}

void ep_moe_experts::dispatch_start(int slot, int32_t layer, const mat_view& hidden, const moe_routing& r) {
  pending& p = *p_[size_t(slot)];
  deepseek_model& m = *rank_.model_;
  backend& be = m.be();
  const ep_placement& pl = rank_.placement_;
  const int N = rank_.size(), me = rank_.rank();
  const int64_t H = m.config().hidden_size, T = r.tokens;
  const int K = int(r.top_k);
  p.layer = layer;
  {
    int ml = 0;
    for (int32_t l = 0; l < layer; ++l) ml += m.config().is_moe_layer(l) ? 1 : 0;
    p.moe_layer = ml;
  }
  p.T = T;
  p.K = K;
  p.weights_dev = r.topk_weights;
  p.dispatch_tag = make_tag(rank_.step_, slot, layer, exchange_phase::dispatch);
  p.combine_tag = make_tag(rank_.step_, slot, layer, exchange_phase::combine);

  p.ids.assign(r.topk_ids_host, r.topk_ids_host + T * K);
  if (rank_.opt_.routing_override && T > 0) rank_.opt_.routing_override(me, p.moe_layer, p.ids);
  rank_.recorder_.record_topk(p.moe_layer, p.ids);

  // One physical replica per (token, k), spread over the replicas by token (and by rank, so that the ranks'
  // first tokens do not all pick replica 0).
  p.phys.resize(size_t(T * K));
  const auto& l2p = pl.log2phy[size_t(p.moe_layer)];
  for (int64_t t = 0; t < T; ++t)
    for (int k = 0; k < K; ++k) {
      const auto& reps = l2p[size_t(p.ids[size_t(t * K + k)])];
      p.phys[size_t(t * K + k)] = reps[size_t((uint64_t(t) + uint64_t(me)) % reps.size())];
    }

  p.on_device = rank_.step_device_;
  if (p.on_device) {
    ensure_buf(be, p.slots_dev, sizeof(int32_t) * size_t(T * K));
    if (T > 0) be.copy_to_device(p.slots_dev.data(), p.phys.data(), sizeof(int32_t) * size_t(T * K));
    rank_.plane_->dispatch(slot, rank_.step_mode_ == ep_mode::low_latency, hidden, p.slots_dev.i32(), r.topk_weights,
                           T);
    rank_.stats_.device_tokens_sent += T;
    return;
  }

  p.x_host.resize(size_t(T * H));
  if (T > 0) {
    if (hidden.contiguous())
      be.copy_to_host(p.x_host.data(), hidden.data, sizeof(float) * size_t(T * H));
    else
      for (int64_t t = 0; t < T; ++t)
        be.copy_to_host(p.x_host.data() + t * H, hidden.data + t * hidden.ld, sizeof(float) * size_t(H));
  }

  // Message to rank d: [n][K][n*K slot ids, -1 where another rank owns the slot][n*H rows].
  std::vector<int32_t> count(size_t(N), 0), last(size_t(N), -1);
  p.sent_pairs.assign(size_t(N), {});
  for (int64_t t = 0; t < T; ++t)
    for (int k = 0; k < K; ++k) {
      const int d = pl.owner(p.phys[size_t(t * K + k)]);
      p.sent_pairs[size_t(d)].push_back(int32_t(t * K + k));
      if (last[size_t(d)] != t) {
        last[size_t(d)] = int32_t(t);
        count[size_t(d)]++;
      }
    }
  p.send.assign(size_t(N), {});
  std::vector<int32_t> slots(static_cast<size_t>(K));
  for (int d = 0; d < N; ++d) {
    byte_buffer& b = p.send[size_t(d)];
    b.reserve(8 + size_t(count[size_t(d)]) * (size_t(K) * 4 + size_t(H) * 4));
    const int32_t head[2] = {count[size_t(d)], K};
    put(b, head, 2);
    std::vector<int64_t> tokens;
    for (int64_t t = 0; t < T; ++t) {
      bool any = false;
      for (int k = 0; k < K; ++k) {
        const int32_t s = p.phys[size_t(t * K + k)];
        slots[size_t(k)] = pl.owner(s) == d ? s : -1;
        any |= slots[size_t(k)] >= 0;
      }
      if (!any) continue;
      put(b, slots.data(), size_t(K));
      tokens.push_back(t);
    }
    for (int64_t t : tokens) put(b, p.x_host.data() + t * H, size_t(H));
  }
  rank_.transport_.start_all_to_all(p.dispatch_tag, spans_of(p.send));
}

void ep_moe_experts::expert_compute(int slot) {
  pending& p = *p_[size_t(slot)];
  deepseek_model& m = *rank_.model_;
  backend& be = m.be();
  const ep_placement& pl = rank_.placement_;
  const int N = rank_.size(), me = rank_.rank();
  const int64_t H = m.config().hidden_size, I = m.config().moe_intermediate_size;
  const int K = p.K;
  if (p.on_device) {
    rank_.plane_->compute(slot, p.moe_layer, rank_.mb_group_tokens_[slot]);
    return;
  }
  rank_.transport_.wait_all_to_all(p.dispatch_tag, p.recv);

  // Gather what every source sent, in source order.
  p.recv_slots.clear();
  p.recv_x.clear();
  p.recv_tokens.assign(size_t(N), 0);
  for (int s = 0; s < N; ++s) {
    reader rd{p.recv[size_t(s)]};
    int32_t head[2];
    rd.get(head, 2, "dispatch header");
    if (head[0] < 0 || (head[0] > 0 && head[1] != K))
      throw std::runtime_error("expert dispatch: rank " + std::to_string(s) + " sent a bad header");
    const int64_t n = head[0];
    p.recv_tokens[size_t(s)] = n;
    const size_t at = p.recv_slots.size();
    p.recv_slots.resize(at + size_t(n * K));
    rd.get(p.recv_slots.data() + at, size_t(n * K), "slot ids");
    const size_t xa = p.recv_x.size();
    p.recv_x.resize(xa + size_t(n * H));
    rd.get(p.recv_x.data() + xa, size_t(n * H), "token rows");
  }
  const int M = int(p.recv_slots.size() / size_t(std::max(K, 1)));
  const int sb = pl.slot_begin(me), nl = pl.num_local(me);
  const auto& experts = rank_.store_.slots[size_t(p.moe_layer)];

  // Lay the rows out for the grouped GEMMs (index arrays from runtime/moe_layout) and run each local expert on
  // its block. Only real rows move: expert e's rows are staged compactly on the host (stage offset off[e]) and
  // uploaded into its block; padding rows (contiguous) and unused rows (masked) are neither copied nor computed
  // on the CPU. A GPU grouped GEMM would run over whole blocks instead.
  const int32_t* pair_row = nullptr;
  std::vector<int64_t> begin(static_cast<size_t>(nl)), cnt(static_cast<size_t>(nl)),
      off(static_cast<size_t>(nl) + 1, 0);
  int64_t rows = 0;
  const int32_t* block_pairs = nullptr; // pair of row begin[e] + m, for m < cnt[e]
  if (rank_.step_mode_ == ep_mode::normal) {
    p.contiguous = moe::build_contiguous_layout(p.recv_slots, M, K, sb, nl);
    rows = p.contiguous.num_rows;
    for (int e = 0; e < nl; ++e) {
      begin[size_t(e)] = p.contiguous.expert_begin[size_t(e)];
      cnt[size_t(e)] = p.contiguous.expert_count[size_t(e)];
    }
    pair_row = p.contiguous.pair_row.data();
    block_pairs = p.contiguous.row_pair.data();
  } else {
    const int max_m = rank_.opt_.max_dispatch_tokens * N;
    p.masked = moe::build_masked_layout(p.recv_slots, M, K, sb, nl, max_m);
    if (p.masked.overflowed())
      throw std::runtime_error("low-latency dispatch: " + std::to_string(p.masked.overflow) +
                               " (token, expert) pairs did not fit max_m = " + std::to_string(max_m));
    rows = int64_t(nl) * max_m; // fixed: the buffers never change shape
    for (int e = 0; e < nl; ++e) {
      begin[size_t(e)] = int64_t(e) * max_m;
      cnt[size_t(e)] = p.masked.count[size_t(e)];
    }
    pair_row = p.masked.pair_slot.data();
    block_pairs = p.masked.slot_pair.data();
  }
  for (int e = 0; e < nl; ++e) off[size_t(e) + 1] = off[size_t(e)] + cnt[size_t(e)];
  const int64_t real = off[size_t(nl)];
  p.rows_host.resize(size_t(real * H));
  for (int e = 0; e < nl; ++e)
    for (int64_t m = 0; m < cnt[size_t(e)]; ++m) {
      const int32_t pair = block_pairs[begin[size_t(e)] + m];
      std::memcpy(p.rows_host.data() + (off[size_t(e)] + m) * H, p.recv_x.data() + int64_t(pair / K) * H,
                  sizeof(float) * size_t(H));
    }
  ensure_buf(be, p.rows_dev, sizeof(float) * size_t(rows * H));
  ensure_buf(be, p.gu_dev, sizeof(float) * size_t(rows * 2 * I));
  ensure_buf(be, p.act_dev, sizeof(float) * size_t(rows * I));
  ensure_buf(be, p.y_dev, sizeof(float) * size_t(rows * H));
  mat_view x(p.rows_dev.f32(), rows, H), gu(p.gu_dev.f32(), rows, 2 * I), act(p.act_dev.f32(), rows, I),
      y(p.y_dev.f32(), rows, H);
  p.y_host.resize(size_t(real * H));
  for (int e = 0; e < nl; ++e) {
    const int64_t a = begin[size_t(e)], c = cnt[size_t(e)];
    if (c == 0) continue;
    const mlp_weights& w = experts[size_t(e)];
    be.copy_to_device(x.data + a * H, p.rows_host.data() + off[size_t(e)] * H, sizeof(float) * size_t(c * H));
    be.linear(x.row_slice(a, c), w.gate_up.f32(), gu.row_slice(a, c));
    be.silu_mul(gu.row_slice(a, c), I, act.row_slice(a, c));
    be.linear(act.row_slice(a, c), w.down.f32(), y.row_slice(a, c));
    be.copy_to_host(p.y_host.data() + off[size_t(e)] * H, y.data + a * H, sizeof(float) * size_t(c * H));
  }
  rank_.stats_.expert_rows += real;
  // Block row -> compact staging row.
  auto staged = [&](int32_t row) -> int64_t {
    if (rank_.step_mode_ == ep_mode::normal) {
      const int e = p.contiguous.row_expert[size_t(row)];
      return off[size_t(e)] + (row - begin[size_t(e)]);
    }
    const int max_m = rank_.opt_.max_dispatch_tokens * N;
    return off[size_t(row / max_m)] + row % max_m;
  };

  // Every (token, k) output goes back to the token's rank, in the order the pairs arrived.
  p.back_send.assign(size_t(N), {});
  int64_t tok = 0;
  for (int s = 0; s < N; ++s) {
    byte_buffer& b = p.back_send[size_t(s)];
    for (int64_t i = 0; i < p.recv_tokens[size_t(s)]; ++i, ++tok)
      for (int k = 0; k < K; ++k) {
        const int32_t row = pair_row[tok * K + k];
        if (p.recv_slots[size_t(tok * K + k)] < 0) continue;
        if (row < 0) throw std::logic_error("expert combine: a received pair has no row");
        put(b, p.y_host.data() + staged(row) * H, size_t(H));
      }
  }
  rank_.transport_.start_all_to_all(p.combine_tag, spans_of(p.back_send));
}

void ep_moe_experts::combine_finish(int slot, const mat_view& out) {
  pending& p = *p_[size_t(slot)];
  deepseek_model& m = *rank_.model_;
  backend& be = m.be();
  const int N = rank_.size();
  const int64_t H = m.config().hidden_size, T = p.T, K = p.K, n = T * K;
  if (p.on_device) {
    rank_.plane_->combine(slot, out);
    return;
  }
  rank_.transport_.wait_all_to_all(p.combine_tag, p.back_recv);
  p.pairs_host.resize(size_t(n * H));
  for (int d = 0; d < N; ++d) {
    const auto& pairs = p.sent_pairs[size_t(d)];
    const byte_buffer& b = p.back_recv[size_t(d)];
    if (b.size() != pairs.size() * size_t(H) * sizeof(float))
      throw std::runtime_error("expert combine: rank " + std::to_string(d) + " returned " + std::to_string(b.size()) +
                               " bytes for " + std::to_string(pairs.size()) + " rows");
    for (size_t j = 0; j < pairs.size(); ++j)
      std::memcpy(p.pairs_host.data() + int64_t(pairs[j]) * H, b.data() + j * size_t(H) * sizeof(float),
                  sizeof(float) * size_t(H));
  }
  if (T == 0) return;
  // out[t] = sum over k, in k order, of weight[t,k] * output[t,k]: the order is fixed by the token, never by
  // where its experts ran.
  p.idx_host.resize(size_t(n));
  for (int64_t i = 0; i < n; ++i) p.idx_host[size_t(i)] = int32_t(i / K);
  ensure_buf(be, p.pairs_dev, sizeof(float) * size_t(n * H));
  ensure_buf(be, p.idx_dev, sizeof(int32_t) * size_t(n));
  be.copy_to_device(p.pairs_dev.data(), p.pairs_host.data(), sizeof(float) * size_t(n * H));
  be.copy_to_device(p.idx_dev.data(), p.idx_host.data(), sizeof(int32_t) * size_t(n));
  if (out.contiguous())
    be.fill_zero(out.data, sizeof(float) * size_t(out.rows * out.cols));
  else
    for (int64_t t = 0; t < out.rows; ++t) be.fill_zero(out.data + t * out.ld, sizeof(float) * size_t(out.cols));
  be.scatter_add_rows(mat_view(p.pairs_dev.f32(), n, H), p.idx_dev.i32(), p.weights_dev, n, out);
}

// -- ep_rank -------------------------------------------------------------------------------------------

struct ep_rank::rebalance_plan {
  ep_placement next;
  uint64_t tag = 0;
  std::vector<byte_buffer> send;
  std::vector<std::vector<int>> source; // [moe layer][new local slot] -> rank the weights come from (me: local)
};

ep_rank::ep_rank(std::unique_ptr<deepseek_model> model, ep_placement placement, ep_transport& transport,
                 ep_options opt)
    : model_(std::move(model)), transport_(transport), opt_(std::move(opt)), placement_(std::move(placement)),
      recorder_(std::max(1, moe_layer_count(model_->config())), std::max<int>(1, int(model_->config().n_routed_experts)),
                std::max(1, opt_.load_window)) {
  const model_config& cfg = model_->config();
  const int N = transport_.size(), me = transport_.rank();
  if (placement_.num_ranks != N)
    throw std::invalid_argument("the placement was made for " + std::to_string(placement_.num_ranks) +
                                " ranks but the group has " + std::to_string(N));
  if (placement_.num_logical != cfg.n_routed_experts)
    throw std::invalid_argument("the placement has " + std::to_string(placement_.num_logical) +
                                " logical experts but the model has " + std::to_string(cfg.n_routed_experts));
  if (std::string err = check_placement(placement_.phy2log, cfg, N, opt_.rebalance_every > 0); !err.empty())
    throw std::invalid_argument(err);
  if (opt_.max_dispatch_tokens < 1) throw std::invalid_argument("max_dispatch_tokens must be >= 1");
  if (opt_.rebalance_every < 0) throw std::invalid_argument("rebalance_every must be >= 0");

  // Keep the experts of this rank's slots; free every routed expert of the full model.
  backend& be = model_->be();
  model_weights& w = model_->mutable_weights();
  const std::vector<int> moe_index = moe_index_of(cfg);
  store_.slots.resize(size_t(placement_.num_layers()));
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    const int ml = moe_index[size_t(l)];
    if (ml < 0) continue;
    auto& layer = w.layers[size_t(l)];
    if (layer.experts.size() != size_t(cfg.n_routed_experts))
      throw std::invalid_argument("ep_rank: the model's layer " + std::to_string(l) +
                                  " does not hold every routed expert (already handed to a store?)");
    for (int s = placement_.slot_begin(me); s < placement_.slot_end(me); ++s)
      store_.slots[size_t(ml)].push_back(copy_expert(be, layer.experts[size_t(placement_.phy2log[size_t(ml)][size_t(s)])]));
    layer.experts.clear();
    layer.experts.shrink_to_fit();
  }
  experts_ = std::make_shared<ep_moe_experts>(*this);
  model_->set_moe_experts(experts_);

  if (opt_.device_exchange) {
    device_plane_config pc;
    pc.rank = me;
    pc.ranks = N;
    pc.hidden = cfg.hidden_size;
    pc.inter = cfg.moe_intermediate_size;
    pc.slots = placement_.num_slots;
    pc.top_k = int(cfg.num_experts_per_tok);
    pc.max_tokens = opt_.device_max_tokens;
    pc.ll_max_tokens = opt_.mode == ep_mode::low_latency ? opt_.max_dispatch_tokens : 0;
    pc.micro_batches = opt_.two_batch_overlap ? 2 : 1;
    pc.timeout_s = opt_.device_timeout_s;
    pc.fp8_experts = opt_.device_fp8_experts;
    pc.kind = opt_.device_kind;
    pc.bootstrap = opt_.device_bootstrap;
    plane_ = make_device_plane(be, pc); // std::invalid_argument naming what does not fit
    // A rank waiting on the GPU for a peer whose step failed would otherwise spin until device_timeout_s.
    device_plane* plane = plane_.get();
    transport_.on_abort([plane](const std::string& reason) { plane->abort(reason); });
    // While this rank's host waits for its GPU (which may wait for a peer), the transport keeps listening: a
    // peer's abort message or a dead peer process (UCX) aborts the group, whose hook above releases this rank's
    // kernels, and the wait throws instead of lasting until device_timeout_s.
    ep_transport* t = &transport_;
    be.set_wait_hook([t] { t->poll(); });
  }
}

void ep_rank::open_plane() {
  // Every rank's handles to every rank through the transport, once: the planes then map each other's buffers.
  const std::vector<uint8_t> mine = plane_->export_handle();
  const std::span<const std::byte> part(reinterpret_cast<const std::byte*>(mine.data()), mine.size());
  std::vector<std::span<const std::byte>> parts(size_t(size()), part);
  const uint64_t tag = make_tag(step_, 0, 0, exchange_phase::device_handles);
  transport_.start_all_to_all(tag, parts);
  std::vector<byte_buffer> got;
  transport_.wait_all_to_all(tag, got);
  std::vector<std::vector<uint8_t>> handles(got.size());
  for (size_t r = 0; r < got.size(); ++r)
    handles[r].assign(reinterpret_cast<const uint8_t*>(got[r].data()),
                      reinterpret_cast<const uint8_t*>(got[r].data()) + got[r].size());
  plane_->open_peers(handles);
  plane_open_ = true;
}

void ep_rank::sync_plane_experts() {
  if (plane_version_ == store_version_) return;
  for (size_t l = 0; l < store_.slots.size(); ++l) {
    std::vector<const float*> gate_up, down;
    for (const auto& w : store_.slots[l]) {
      gate_up.push_back(w.gate_up.f32());
      down.push_back(w.down.f32());
    }
    plane_->set_experts(int(l), gate_up, down);
  }
  plane_version_ = store_version_;
}

ep_rank::~ep_rank() {
  if (plane_) {
    transport_.on_abort({});
    model_->be().set_wait_hook({});
  }
}

void ep_rank::step(std::span<const sequence_step> batch, kv_pool& kv, step_result& out) {
  try {
    const int N = size();
    const int nmb = opt_.two_batch_overlap ? 2 : 1;
    // -- micro-batches: whole sequences, split where the token counts are closest --------------------
    size_t split = batch.size();
    int64_t total = 0, has_prefill = 0;
    for (const auto& s : batch) {
      total += int64_t(s.tokens.size());
      has_prefill |= (s.tokens.size() != 1 || s.start_pos == 0) ? 1 : 0;
    }
    if (nmb == 2) {
      int64_t acc = 0, best = INT64_MAX;
      for (size_t i = 0; i <= batch.size(); ++i) {
        const int64_t diff = std::llabs(total - 2 * acc);
        if (diff < best) {
          best = diff;
          split = i;
        }
        if (i < batch.size()) acc += int64_t(batch[i].tokens.size());
      }
    }
    std::span<const sequence_step> mb[2] = {batch.subspan(0, split), batch.subspan(split)};
    // One prefill sequence alone: split its tokens instead (the first half's KV of each layer is written before
    // the second half's attention reads it, because micro-batch 0 always runs first between two yield points).
    const bool split_tokens = nmb == 2 && batch.size() == 1 && batch[0].tokens.size() >= 2;
    if (split_tokens) {
      const sequence_step& s = batch[0];
      const size_t half = s.tokens.size() / 2;
      halves_[0] = {s.tokens.subspan(0, half), s.start_pos, s.pages, s.all_logits};
      halves_[1] = {s.tokens.subspan(half), s.start_pos + int64_t(half), s.pages, s.all_logits};
      mb[0] = {&halves_[0], 1};
      mb[1] = {&halves_[1], 1};
    }
    int64_t mb_tokens[2] = {0, 0};
    for (int i = 0; i < 2; ++i)
      for (const auto& s : mb[i]) mb_tokens[i] += int64_t(s.tokens.size());

    // -- 1. step header: every rank learns every rank's sizes and requests -----------------------------
    const int64_t header[5] = {nmb, mb_tokens[0], mb_tokens[1], has_prefill, rebalance_requested_ ? 1 : 0};
    rebalance_requested_ = false;
    byte_buffer hb;
    put(hb, header, 5);
    std::vector<std::span<const std::byte>> hs(size_t(N), std::span<const std::byte>(hb.data(), hb.size()));
    const uint64_t htag = make_tag(step_, 0, 0, exchange_phase::step_header);
    transport_.start_all_to_all(htag, hs);
    std::vector<byte_buffer> hr;
    transport_.wait_all_to_all(htag, hr);
    int64_t max_mb = 0;
    bool any_rebalance = false;
    mb_group_tokens_[0] = mb_group_tokens_[1] = 0;
    for (int r = 0; r < N; ++r) {
      int64_t h[5];
      reader{hr[size_t(r)]}.get(h, 5, "step header");
      if (h[0] != nmb)
        throw std::runtime_error("EP step header: rank " + std::to_string(r) + " runs " + std::to_string(h[0]) +
                                 " micro-batches, rank " + std::to_string(rank()) + " " + std::to_string(nmb) +
                                 " (two-batch overlap must be on for all ranks or none)");
      max_mb = std::max({max_mb, h[1], h[2]});
      mb_group_tokens_[0] += h[1];
      mb_group_tokens_[1] += h[2];
      any_rebalance |= h[4] != 0;
    }

    // -- 2. a placement whose weights were sent during the last step switches now --------------------
    if (pending_rebalance_) finish_rebalance();
    // -- 3. rebalance: gather loads, EPLB, start moving weights -----------------------------------------
    const bool periodic = opt_.rebalance_every > 0 && step_ > 0 && step_ % uint64_t(opt_.rebalance_every) == 0;
    if (periodic || any_rebalance) prepare_rebalance();

    step_mode_ = (opt_.mode == ep_mode::low_latency && max_mb <= opt_.max_dispatch_tokens) ? ep_mode::low_latency
                                                                                           : ep_mode::normal;
    // The GPU data plane carries this step's rows unless a normal-mode micro-batch is too big for its buffers.
    if (plane_ && !plane_open_) {
      // Experts first (fp8 copies are large allocations): the handle exchange then keeps every rank from spinning
      // on the GPU while a peer still allocates, which could block that peer (docs/gpu-expert-exchange.md).
      sync_plane_experts();
      open_plane();
    }
    step_device_ = plane_ && (step_mode_ == ep_mode::low_latency || max_mb <= opt_.device_max_tokens);
    if (step_device_) sync_plane_experts();
    // -- 4. the forward pass ------------------------------------------------------------------------------
    model_->clear_routing_counts();
    if (nmb == 1) {
      forward_task t = model_->forward_ops(batch, kv, out, 0, *experts_);
      t.run_to_end();
    } else {
      forward_task a = model_->forward_ops(mb[0], kv, mb_out_[0], 0, *experts_);
      forward_task b = model_->forward_ops(mb[1], kv, mb_out_[1], 1, *experts_);
      // Alternate at the yield points: while one micro-batch's all-to-all is in flight, the other computes.
      while (!a.done() || !b.done()) {
        a.resume();
        b.resume();
      }
      out.vocab = model_->config().vocab_size;
      if (split_tokens && !batch[0].all_logits) {
        out.logits = std::move(mb_out_[1].logits); // the sequence's last token is in the second half
        out.row_offset = {0, 1};
      } else {
        out.logits = std::move(mb_out_[0].logits);
        out.logits.insert(out.logits.end(), mb_out_[1].logits.begin(), mb_out_[1].logits.end());
        if (split_tokens) {
          out.row_offset = {0, int64_t(batch[0].tokens.size())};
        } else {
          out.row_offset = mb_out_[0].row_offset;
          const int64_t base = out.row_offset.back();
          for (size_t i = 1; i < mb_out_[1].row_offset.size(); ++i)
            out.row_offset.push_back(base + mb_out_[1].row_offset[i]);
        }
      }
    }
    if (step_device_) {
      // A receive that timed out (a silent peer) is recorded on the device: the step fails like a transport error.
      model_->be().synchronize();
      plane_->check();
      stats_.device_steps++;
    }
    group_had_tokens_ = mb_group_tokens_[0] + mb_group_tokens_[1] > 0;
    recorder_.next_step();
    stats_.steps++;
    if (step_mode_ == ep_mode::low_latency) stats_.low_latency_steps++;
    step_++;
  } catch (const transport_error&) {
    throw;
  } catch (const std::exception& e) {
    transport_.abort("rank " + std::to_string(rank()) + ": " + e.what());
    throw;
  }
}

void ep_rank::prepare_rebalance() {
  const model_config& cfg = model_->config();
  const int N = size(), me = rank();
  const int L = placement_.num_layers(), E = placement_.num_logical;
  // All-gather the load windows; every rank sums them in rank order, so all hold the same matrix.
  byte_buffer mine;
  const eplb::expert_load_matrix w = recorder_.window_load();
  for (int l = 0; l < L; ++l) put(mine, w[size_t(l)].data(), size_t(E));
  std::vector<std::span<const std::byte>> parts(size_t(N), std::span<const std::byte>(mine.data(), mine.size()));
  const uint64_t gtag = make_tag(step_, 0, 0, exchange_phase::load_gather);
  transport_.start_all_to_all(gtag, parts);
  std::vector<byte_buffer> got;
  transport_.wait_all_to_all(gtag, got);
  eplb::expert_load_matrix load(size_t(L), std::vector<double>(size_t(E), 0.0));
  std::vector<double> row(static_cast<size_t>(E));
  for (int r = 0; r < N; ++r) {
    reader rd{got[size_t(r)]};
    for (int l = 0; l < L; ++l) {
      rd.get(row.data(), size_t(E), "expert load");
      for (int e = 0; e < E; ++e) load[size_t(l)][size_t(e)] += row[size_t(e)];
    }
  }
  if (L == 0) {
    stats_.last_rebalance_note = "the model has no MoE layer";
    return;
  }
  eplb::eplb_shape shape;
  shape.num_replicas = placement_.num_slots;
  shape.num_groups = opt_.eplb_groups > 0 ? opt_.eplb_groups
                                          : (cfg.n_group > 0 && E % cfg.n_group == 0 ? int(cfg.n_group) : 1);
  shape.num_nodes = std::max(1, opt_.eplb_nodes);
  shape.num_gpus = N;
  if (std::string err = eplb::check_arguments(load, shape); !err.empty()) {
    stats_.last_rebalance_note = "rebalance skipped: " + err;
    return;
  }
  const eplb::expert_placement placed = eplb::rebalance_experts(load, shape);
  auto plan = std::make_unique<rebalance_plan>();
  plan->next.num_ranks = N;
  plan->next.num_logical = E;
  plan->next.num_slots = placement_.num_slots;
  for (const auto& r : placed.phy2log) plan->next.phy2log.emplace_back(r.begin(), r.end());
  plan->next.index();
  if (plan->next == placement_) {
    stats_.last_rebalance_note = "rebalance kept the placement (EPLB found the same one)";
    return;
  }
  // Where each new replica comes from: this rank's old copy if it has one, else the lowest rank holding it.
  const ep_placement& old = placement_;
  const ep_placement& nx = plan->next;
  auto holds = [&](int rank, int l, int e) {
    for (int32_t s : old.log2phy[size_t(l)][size_t(e)])
      if (old.owner(s) == rank) return true;
    return false;
  };
  auto old_local_slot = [&](int rank, int l, int e) {
    for (int32_t s : old.log2phy[size_t(l)][size_t(e)])
      if (old.owner(s) == rank) return s - old.slot_begin(rank);
    return -1;
  };
  plan->send.assign(size_t(N), {});
  plan->source.assign(size_t(L), {});
  for (int l = 0; l < L; ++l)
    for (int s = 0; s < nx.num_slots; ++s) {
      const int dest = nx.owner(s), e = nx.phy2log[size_t(l)][size_t(s)];
      const int src = holds(dest, l, e) ? dest : old.owner(old.log2phy[size_t(l)][size_t(e)][0]);
      if (dest == me) plan->source[size_t(l)].push_back(src);
      if (src == me && dest != me) {
        // Pack this replica's weights for `dest` (host bytes; device memory is staged through the host).
        const mlp_weights& wsrc = store_.slots[size_t(l)][size_t(old_local_slot(me, l, e))];
        byte_buffer& b = plan->send[size_t(dest)];
        const size_t at = b.size();
        b.resize(at + wsrc.gate_up.bytes() + wsrc.down.bytes());
        model_->be().copy_to_host(b.data() + at, wsrc.gate_up.data(), wsrc.gate_up.bytes());
        model_->be().copy_to_host(b.data() + at + wsrc.gate_up.bytes(), wsrc.down.data(), wsrc.down.bytes());
      }
    }
  plan->tag = make_tag(step_, 0, 0, exchange_phase::weights);
  transport_.start_all_to_all(plan->tag, spans_of(plan->send));
  pending_rebalance_ = std::move(plan);
}

void ep_rank::finish_rebalance() {
  std::unique_ptr<rebalance_plan> plan = std::move(pending_rebalance_);
  const model_config& cfg = model_->config();
  backend& be = model_->be();
  const int N = size(), me = rank();
  const int L = plan->next.num_layers();
  std::vector<byte_buffer> got;
  transport_.wait_all_to_all(plan->tag, got);
  const int64_t H = cfg.hidden_size, I = cfg.moe_intermediate_size;
  const size_t gu_bytes = sizeof(float) * size_t(2 * I * H), down_bytes = sizeof(float) * size_t(H * I);
  std::vector<size_t> cursor(size_t(N), 0);
  ep_expert_store next;
  next.slots.resize(size_t(L));
  const ep_placement& old = placement_;
  for (int l = 0; l < L; ++l)
    for (int j = 0; j < plan->next.num_local(me); ++j) {
      const int e = plan->next.phy2log[size_t(l)][size_t(plan->next.slot_begin(me) + j)];
      const int src = plan->source[size_t(l)][size_t(j)];
      if (src == me) {
        int local = -1;
        for (int32_t s : old.log2phy[size_t(l)][size_t(e)])
          if (old.owner(s) == me) {
            local = s - old.slot_begin(me);
            break;
          }
        next.slots[size_t(l)].push_back(copy_expert(be, store_.slots[size_t(l)][size_t(local)]));
        stats_.experts_copied_local++;
        continue;
      }
      const byte_buffer& b = got[size_t(src)];
      size_t& at = cursor[size_t(src)];
      if (at + gu_bytes + down_bytes > b.size())
        throw std::runtime_error("rebalance: rank " + std::to_string(src) + " sent too few expert weights");
      mlp_weights w;
      w.inter = I;
      w.gate_up = be.allocate(gu_bytes);
      w.down = be.allocate(down_bytes);
      be.copy_to_device(w.gate_up.data(), b.data() + at, gu_bytes);
      be.copy_to_device(w.down.data(), b.data() + at + gu_bytes, down_bytes);
      at += gu_bytes + down_bytes;
      next.slots[size_t(l)].push_back(std::move(w));
      stats_.experts_moved_in++;
      stats_.weight_bytes_in += int64_t(gu_bytes + down_bytes);
    }
  for (int s = 0; s < N; ++s)
    if (cursor[size_t(s)] != got[size_t(s)].size())
      throw std::runtime_error("rebalance: rank " + std::to_string(s) + " sent unexpected expert weights");
  // The switch: from here on every MoE layer of this rank uses the new placement and store.
  placement_ = std::move(plan->next);
  store_ = std::move(next);
  store_version_++;
  stats_.rebalances++;
  stats_.last_rebalance_note.clear();
}

} // namespace petrel::ep
