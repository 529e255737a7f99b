// DeepSeek-V3 model configuration, read once from a Hugging Face config.json and validated.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace petrel {

/// Rotary embedding parameters. Accepts both the old `rope_scaling` dict (+ top-level rope_theta) and the
/// newer `rope_parameters` dict (which carries rope_theta itself).
struct rope_config {
  std::string type = "default"; // "default" or "yarn"
  double theta = 10000.0;
  double factor = 1.0;
  int64_t original_max_position_embeddings = 0; // 0: absent
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
  std::optional<double> attention_factor;
  bool truncate = true;
};

/// `quantization_config` (DeepSeek fp8: e4m3 weights with 128x128 block scales `weight_scale_inv`).
struct quantization_config {
  bool fp8 = false;
  std::string fmt = "e4m3";
  int64_t block_n = 128; // rows (output features) per scale block
  int64_t block_k = 128; // columns (input features) per scale block
};

struct model_config {
  std::string model_type = "deepseek_v3";
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t moe_intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t n_shared_experts = 0;
  int64_t n_routed_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  int64_t first_k_dense_replace = 0;
  int64_t moe_layer_freq = 1;
  int64_t q_lora_rank = 0; // 0: null in config.json, plain q_proj
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;
  int64_t max_position_embeddings = 4096;
  double routed_scaling_factor = 1.0;
  double rms_norm_eps = 1e-6;
  bool norm_topk_prob = true;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = -1;
  int64_t eos_token_id = -1;
  rope_config rope;
  quantization_config quant;

  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  /// Floats per token per layer in the latent KV cache.
  int64_t kv_entry_floats() const { return kv_lora_rank + qk_rope_head_dim; }
  bool is_moe_layer(int64_t layer) const {
    return n_routed_experts > 0 && layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
  }
  /// qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek's attention scaling).
  double softmax_scale() const;
  /// RoPE inverse frequencies (qk_rope_head_dim / 2 of them), YaRN-corrected when rope.type == "yarn".
  std::vector<float> rope_inv_freq() const;
  /// Factor applied to cos and sin (YaRN attention factor; 1 for DeepSeek-V3's mscale == mscale_all_dim).
  double rope_attention_factor() const;
  /// Total parameter count implied by the shapes (embedding and head included).
  int64_t parameter_count() const;

  /// Parses and validates; `source` names the file in error messages. Throws model_load_error.
  static model_config from_json(const nlohmann::json& j, const std::string& source = "config.json");
  /// Reads `path` (a config.json, or a directory containing one).
  static model_config load(const std::filesystem::path& path);
};

} // namespace petrel
