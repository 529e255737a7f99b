#include "runtime/weights.hpp"

#include <cmath>
#include <functional>
#include <string>

#include "runtime/safetensors.hpp"

namespace petrel {
namespace {

enum class init_kind { linear, ones, zeros };

// Where weights come from: a checkpoint, or a seeded generator. The model's structure is walked once (below).
using tensor_source = std::function<std::vector<float>(const std::string& name, const std::vector<int64_t>& shape, init_kind)>;

device_buffer upload(backend& be, const std::vector<float>& host) {
  device_buffer b = be.allocate(host.size() * sizeof(float));
  be.copy_to_device(b.data(), host.data(), host.size() * sizeof(float));
  return b;
}

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char ch : s) h = (h ^ ch) * 0x100000001b3ull;
  return h;
}

std::vector<float> concat_rows(std::vector<float> a, const std::vector<float>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

model_weights build(const model_config& c, backend& be, const tensor_source& src, const checkpoint* ckpt) {
  model_weights w;
  const int64_t H = c.hidden_size, heads = c.num_attention_heads, qk = c.qk_head_dim();
  auto get = [&](const std::string& name, std::vector<int64_t> shape, init_kind k = init_kind::linear) {
    return upload(be, src(name, shape, k));
  };
  auto mlp = [&](const std::string& prefix, int64_t inter) {
    mlp_weights m;
    m.inter = inter;
    m.gate_up = upload(be, concat_rows(src(prefix + "gate_proj.weight", {inter, H}, init_kind::linear),
                                       src(prefix + "up_proj.weight", {inter, H}, init_kind::linear)));
    m.down = get(prefix + "down_proj.weight", {H, inter});
    return m;
  };

  w.embed = get("model.embed_tokens.weight", {c.vocab_size, H});
  w.final_norm = get("model.norm.weight", {H}, init_kind::ones);
  bool tied = c.tie_word_embeddings && !(ckpt && ckpt->contains("lm_head.weight"));
  if (!tied) w.lm_head_own = get("lm_head.weight", {c.vocab_size, H});
  w.rope_inv_freq = upload(be, c.rope_inv_freq());

  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    layer_weights L;
    L.input_norm = get(p + "input_layernorm.weight", {H}, init_kind::ones);
    L.post_attn_norm = get(p + "post_attention_layernorm.weight", {H}, init_kind::ones);
    const std::string a = p + "self_attn.";
    if (c.q_lora_rank > 0) {
      L.q_a = get(a + "q_a_proj.weight", {c.q_lora_rank, H});
      L.q_a_norm = get(a + "q_a_layernorm.weight", {c.q_lora_rank}, init_kind::ones);
      L.q_b = get(a + "q_b_proj.weight", {heads * qk, c.q_lora_rank});
    } else {
      L.q = get(a + "q_proj.weight", {heads * qk, H});
    }
    L.kv_a = get(a + "kv_a_proj_with_mqa.weight", {c.kv_entry_floats(), H});
    L.kv_a_norm = get(a + "kv_a_layernorm.weight", {c.kv_lora_rank}, init_kind::ones);
    L.kv_b = get(a + "kv_b_proj.weight", {heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank});
    L.o = get(a + "o_proj.weight", {H, heads * c.v_head_dim});

    L.moe = c.is_moe_layer(l);
    const std::string m = p + "mlp.";
    if (!L.moe) {
      L.dense = mlp(m, c.intermediate_size);
    } else {
      const int64_t E = c.n_routed_experts, I = c.moe_intermediate_size;
      L.router = get(m + "gate.weight", {E, H});
      L.router_bias = get(m + "gate.e_score_correction_bias", {E}, init_kind::zeros);
      bool fused = ckpt && !ckpt->contains(m + "experts.0.gate_proj.weight") && ckpt->contains(m + "experts.gate_up_proj");
      if (fused) {
        std::vector<float> gu = src(m + "experts.gate_up_proj", {E, 2 * I, H}, init_kind::linear);
        std::vector<float> dn = src(m + "experts.down_proj", {E, H, I}, init_kind::linear);
        for (int64_t e = 0; e < E; ++e) {
          mlp_weights x;
          x.inter = I;
          x.gate_up = be.allocate(sizeof(float) * 2 * I * H);
          be.copy_to_device(x.gate_up.data(), gu.data() + e * 2 * I * H, sizeof(float) * 2 * I * H);
          x.down = be.allocate(sizeof(float) * H * I);
          be.copy_to_device(x.down.data(), dn.data() + e * H * I, sizeof(float) * H * I);
          L.experts.push_back(std::move(x));
        }
      } else {
        for (int64_t e = 0; e < E; ++e) L.experts.push_back(mlp(m + "experts." + std::to_string(e) + ".", I));
      }
      if (c.n_shared_experts > 0) L.shared = mlp(m + "shared_experts.", I * c.n_shared_experts);
    }
    w.layers.push_back(std::move(L));
  }
  return w;
}

} // namespace

model_weights load_weights(const model_config& cfg, const checkpoint& ckpt, backend& be) {
  tensor_source src = [&](const std::string& name, const std::vector<int64_t>& shape, init_kind) {
    return ckpt.read_f32(name, shape, cfg.quant.block_n, cfg.quant.block_k);
  };
  return build(cfg, be, src, &ckpt);
}

model_weights make_dummy_weights(const model_config& cfg, backend& be, uint64_t seed, float stddev) {
  tensor_source src = [&](const std::string& name, const std::vector<int64_t>& shape, init_kind k) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<float> v(size_t(n), k == init_kind::ones ? 1.0f : 0.0f);
    if (k == init_kind::linear) {
      uint64_t s = seed ^ fnv1a(name);
      const float a = stddev * std::sqrt(3.0f); // U(-a, a) has std `stddev`
      for (auto& x : v) x = (float(splitmix(s) >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f) * a;
    }
    return v;
  };
  return build(cfg, be, src, nullptr);
}

} // namespace petrel
