#include "runtime/model_config.hpp"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <numbers>

#include <nlohmann/json.hpp>

#include "runtime/tensor.hpp"

namespace petrel {
namespace {

using json = nlohmann::json;

[[noreturn]] void fail(const std::string& source, const std::string& what) {
  throw model_load_error(source + ": " + what);
}

int64_t get_int(const json& j, const char* key, const std::string& src, std::optional<int64_t> dflt = std::nullopt) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (dflt) return *dflt;
    fail(src, std::string("missing required field '") + key + "'");
  }
  if (!it->is_number()) fail(src, std::string("field '") + key + "' must be a number");
  double v = it->get<double>();
  if (v != std::floor(v)) fail(src, std::string("field '") + key + "' must be an integer");
  return int64_t(v);
}

double get_num(const json& j, const char* key, const std::string& src, std::optional<double> dflt = std::nullopt) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (dflt) return *dflt;
    fail(src, std::string("missing required field '") + key + "'");
  }
  if (!it->is_number()) fail(src, std::string("field '") + key + "' must be a number");
  return it->get<double>();
}

bool get_bool(const json& j, const char* key, const std::string& src, bool dflt) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return dflt;
  if (!it->is_boolean()) fail(src, std::string("field '") + key + "' must be true or false");
  return it->get<bool>();
}

double yarn_mscale(double scale, double mscale) {
  if (scale <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

// Number of dimensions (of `dim`) whose wavelength completes `rotations` turns over max_pos positions.
double correction_dim(double rotations, double dim, double base, double max_pos) {
  return dim * std::log(max_pos / (rotations * 2.0 * std::numbers::pi)) / (2.0 * std::log(base));
}

// Parses rope settings from a rope_parameters / rope_scaling dict.
void parse_rope_dict(const json& r, rope_config& rope, const std::string& src) {
  if (!r.is_object()) fail(src, "rope parameters must be an object");
  std::string type = "default";
  if (r.contains("rope_type") && r["rope_type"].is_string()) type = r["rope_type"].get<std::string>();
  else if (r.contains("type") && r["type"].is_string()) type = r["type"].get<std::string>();
  if (type != "default" && type != "yarn")
    fail(src, "rope type '" + type + "' is not supported (supported: default, yarn)");
  rope.type = type;
  if (r.contains("rope_theta")) rope.theta = get_num(r, "rope_theta", src);
  if (type == "yarn") {
    rope.factor = get_num(r, "factor", src);
    rope.original_max_position_embeddings = get_int(r, "original_max_position_embeddings", src, 0);
    rope.beta_fast = get_num(r, "beta_fast", src, 32.0);
    rope.beta_slow = get_num(r, "beta_slow", src, 1.0);
    rope.mscale = get_num(r, "mscale", src, 1.0);
    rope.mscale_all_dim = get_num(r, "mscale_all_dim", src, 0.0);
    if (r.contains("attention_factor") && !r["attention_factor"].is_null())
      rope.attention_factor = get_num(r, "attention_factor", src);
    rope.truncate = get_bool(r, "truncate", src, true);
    if (rope.factor <= 0) fail(src, "rope factor must be positive");
  }
}

} // namespace

double model_config::softmax_scale() const {
  double s = 1.0 / std::sqrt(double(qk_head_dim()));
  if (rope.type == "yarn" && rope.mscale_all_dim != 0.0) {
    double m = yarn_mscale(rope.factor, rope.mscale_all_dim);
    s *= m * m;
  }
  return s;
}

// Hugging Face's YaRN: when original_max_position_embeddings is given, the scaling factor is the ratio
// max_position_embeddings / original (equal to `factor` in DeepSeek-V3's own config).
static double yarn_effective_factor(const model_config& c) {
  if (c.rope.original_max_position_embeddings > 0)
    return double(c.max_position_embeddings) / double(c.rope.original_max_position_embeddings);
  return c.rope.factor;
}

double model_config::rope_attention_factor() const {
  if (rope.type != "yarn") return 1.0;
  if (rope.attention_factor) return *rope.attention_factor;
  double f = yarn_effective_factor(*this);
  if (rope.mscale != 0.0 && rope.mscale_all_dim != 0.0)
    return yarn_mscale(f, rope.mscale) / yarn_mscale(f, rope.mscale_all_dim);
  return yarn_mscale(f, 1.0);
}

std::vector<float> model_config::rope_inv_freq() const {
  const int64_t dim = qk_rope_head_dim, half = dim / 2;
  std::vector<float> inv(half);
  for (int64_t i = 0; i < half; ++i) {
    // base ** (2i/dim), evaluated in fp32 like the reference (arange(0, dim, 2).float() / dim).
    float expo = float(2 * i) / float(dim);
    inv[i] = float(1.0 / std::pow(rope.theta, double(expo)));
  }
  if (rope.type != "yarn") return inv;
  const double factor = yarn_effective_factor(*this);
  const double orig =
      rope.original_max_position_embeddings > 0 ? double(rope.original_max_position_embeddings) : double(max_position_embeddings);
  double low = correction_dim(rope.beta_fast, double(dim), rope.theta, orig);
  double high = correction_dim(rope.beta_slow, double(dim), rope.theta, orig);
  if (rope.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, double(dim - 1));
  if (low == high) high += 0.001;
  for (int64_t i = 0; i < half; ++i) {
    float expo = float(2 * i) / float(dim);
    double pos_freq = std::pow(rope.theta, double(expo));
    double extrap = 1.0 / pos_freq, interp = 1.0 / (factor * pos_freq);
    double ramp = std::clamp((double(i) - low) / (high - low), 0.0, 1.0);
    double extrap_weight = 1.0 - ramp;
    inv[i] = float(interp * (1.0 - extrap_weight) + extrap * extrap_weight);
  }
  return inv;
}

int64_t model_config::parameter_count() const {
  const int64_t H = hidden_size, heads = num_attention_heads;
  int64_t attn = 0;
  if (q_lora_rank > 0) attn += q_lora_rank * H + q_lora_rank + heads * qk_head_dim() * q_lora_rank;
  else attn += heads * qk_head_dim() * H;
  attn += kv_entry_floats() * H + kv_lora_rank + heads * (qk_nope_head_dim + v_head_dim) * kv_lora_rank;
  attn += H * heads * v_head_dim + 2 * H;
  int64_t total = vocab_size * H * (tie_word_embeddings ? 1 : 2) + H;
  for (int64_t l = 0; l < num_hidden_layers; ++l) {
    total += attn;
    if (is_moe_layer(l))
      total += n_routed_experts * (H + 1 + 3 * H * moe_intermediate_size) + 3 * H * moe_intermediate_size * n_shared_experts;
    else
      total += 3 * H * intermediate_size;
  }
  return total;
}

model_config model_config::from_json(const json& j, const std::string& src) {
  if (!j.is_object()) fail(src, "expected a JSON object");
  model_config c;
  c.model_type = j.value("model_type", std::string());
  if (c.model_type != "deepseek_v3")
    fail(src, "model_type '" + c.model_type + "' is not supported (expected 'deepseek_v3')");
  c.vocab_size = get_int(j, "vocab_size", src);
  c.hidden_size = get_int(j, "hidden_size", src);
  c.intermediate_size = get_int(j, "intermediate_size", src);
  c.num_hidden_layers = get_int(j, "num_hidden_layers", src);
  c.num_attention_heads = get_int(j, "num_attention_heads", src);
  c.n_routed_experts = get_int(j, "n_routed_experts", src, 0);
  c.moe_intermediate_size = get_int(j, "moe_intermediate_size", src, c.n_routed_experts > 0 ? std::nullopt : std::optional<int64_t>(0));
  c.n_shared_experts = get_int(j, "n_shared_experts", src, 0);
  c.num_experts_per_tok = get_int(j, "num_experts_per_tok", src, c.n_routed_experts > 0 ? std::nullopt : std::optional<int64_t>(0));
  c.n_group = get_int(j, "n_group", src, 1);
  c.topk_group = get_int(j, "topk_group", src, 1);
  c.first_k_dense_replace = get_int(j, "first_k_dense_replace", src, 0);
  c.moe_layer_freq = get_int(j, "moe_layer_freq", src, 1);
  c.q_lora_rank = get_int(j, "q_lora_rank", src, 0);
  c.kv_lora_rank = get_int(j, "kv_lora_rank", src);
  c.qk_nope_head_dim = get_int(j, "qk_nope_head_dim", src);
  c.qk_rope_head_dim = get_int(j, "qk_rope_head_dim", src);
  c.v_head_dim = get_int(j, "v_head_dim", src);
  c.max_position_embeddings = get_int(j, "max_position_embeddings", src, 4096);
  c.routed_scaling_factor = get_num(j, "routed_scaling_factor", src, 1.0);
  c.rms_norm_eps = get_num(j, "rms_norm_eps", src, 1e-6);
  c.norm_topk_prob = get_bool(j, "norm_topk_prob", src, true);
  c.tie_word_embeddings = get_bool(j, "tie_word_embeddings", src, false);
  if (j.contains("bos_token_id") && j["bos_token_id"].is_number_integer()) c.bos_token_id = j["bos_token_id"].get<int64_t>();
  if (j.contains("eos_token_id") && j["eos_token_id"].is_number_integer()) c.eos_token_id = j["eos_token_id"].get<int64_t>();

  if (j.contains("scoring_func") && j["scoring_func"] != "sigmoid")
    fail(src, "scoring_func '" + j["scoring_func"].dump() + "' is not supported (expected sigmoid)");
  if (j.contains("topk_method") && j["topk_method"] != "noaux_tc")
    fail(src, "topk_method " + j["topk_method"].dump() + " is not supported (expected noaux_tc)");

  // Rope: `rope_parameters` (new) wins over `rope_scaling` (old); rope_theta may sit at the top level.
  c.rope.theta = get_num(j, "rope_theta", src, 10000.0);
  if (j.contains("rope_parameters") && !j["rope_parameters"].is_null()) {
    parse_rope_dict(j["rope_parameters"], c.rope, src + ": rope_parameters");
  } else if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
    parse_rope_dict(j["rope_scaling"], c.rope, src + ": rope_scaling");
  }

  if (j.contains("quantization_config") && !j["quantization_config"].is_null()) {
    const json& q = j["quantization_config"];
    std::string method = q.value("quant_method", std::string());
    if (method != "fp8") fail(src, "quantization_config.quant_method '" + method + "' is not supported (expected fp8)");
    c.quant.fp8 = true;
    c.quant.fmt = q.value("fmt", std::string("e4m3"));
    if (c.quant.fmt != "e4m3") fail(src, "quantization_config.fmt '" + c.quant.fmt + "' is not supported (expected e4m3)");
    if (q.contains("weight_block_size")) {
      const json& b = q["weight_block_size"];
      if (!b.is_array() || b.size() != 2 || !b[0].is_number_integer() || !b[1].is_number_integer() ||
          b[0].get<int64_t>() <= 0 || b[1].get<int64_t>() <= 0)
        fail(src, "quantization_config.weight_block_size must be two positive integers");
      c.quant.block_n = b[0].get<int64_t>();
      c.quant.block_k = b[1].get<int64_t>();
    }
  }

  // Validation: every later shape computation relies on these.
  auto positive = [&](int64_t v, const char* name) {
    if (v <= 0) fail(src, std::string("field '") + name + "' must be positive");
  };
  positive(c.vocab_size, "vocab_size");
  positive(c.hidden_size, "hidden_size");
  positive(c.num_hidden_layers, "num_hidden_layers");
  positive(c.num_attention_heads, "num_attention_heads");
  positive(c.kv_lora_rank, "kv_lora_rank");
  positive(c.qk_nope_head_dim, "qk_nope_head_dim");
  positive(c.qk_rope_head_dim, "qk_rope_head_dim");
  positive(c.v_head_dim, "v_head_dim");
  positive(c.moe_layer_freq, "moe_layer_freq");
  if (c.qk_rope_head_dim % 2) fail(src, "qk_rope_head_dim must be even (interleaved RoPE rotates pairs)");
  if (c.q_lora_rank < 0) fail(src, "q_lora_rank must be null or positive");
  if (c.first_k_dense_replace < c.num_hidden_layers) positive(c.intermediate_size, "intermediate_size");
  if (c.n_routed_experts > 0) {
    positive(c.moe_intermediate_size, "moe_intermediate_size");
    positive(c.num_experts_per_tok, "num_experts_per_tok");
    positive(c.n_group, "n_group");
    if (c.n_routed_experts % c.n_group) fail(src, "n_routed_experts must be a multiple of n_group");
    if (c.topk_group < 1 || c.topk_group > c.n_group) fail(src, "topk_group must be in [1, n_group]");
    if (c.num_experts_per_tok > c.topk_group * (c.n_routed_experts / c.n_group))
      fail(src, "num_experts_per_tok exceeds the experts in topk_group groups");
  }
  return c;
}

model_config model_config::load(const std::filesystem::path& path) {
  if (!std::filesystem::exists(path)) throw model_load_error(path.string() + ": no such model directory or file");
  std::filesystem::path file = std::filesystem::is_directory(path) ? path / "config.json" : path;
  std::ifstream in(file);
  if (!in) throw model_load_error(file.string() + ": cannot open (expected a Hugging Face config.json)");
  json j;
  try {
    in >> j;
  } catch (const std::exception& e) {
    throw model_load_error(file.string() + ": invalid JSON: " + e.what());
  }
  return from_json(j, file.string());
}

} // namespace petrel
