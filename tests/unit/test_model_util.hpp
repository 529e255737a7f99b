// Shared helpers for the model tests: temp dirs, a safetensors writer, tiny configs.
#pragma once

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <unistd.h>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace petrel::test {

inline std::filesystem::path temp_dir(const std::string& name) {
  auto d = std::filesystem::temp_directory_path() /
           ("petrel_model_" + name + "_" + std::to_string(::getpid()) + "_" + std::to_string(std::random_device{}()));
  std::filesystem::create_directories(d);
  return d;
}

struct st_tensor {
  std::string name;
  std::string dtype; // "F32", "BF16", "F8_E4M3", ...
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

inline st_tensor st_f32(const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v) {
  st_tensor t{name, "F32", std::move(shape), std::vector<uint8_t>(v.size() * 4)};
  std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
  return t;
}

/// Writes a safetensors file; `truncate_bytes` cuts that many bytes off the end (to test truncation).
inline void write_safetensors(const std::filesystem::path& path, const std::vector<st_tensor>& tensors,
                              size_t truncate_bytes = 0) {
  nlohmann::ordered_json h = nlohmann::ordered_json::object();
  uint64_t off = 0;
  for (auto& t : tensors) {
    h[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {off, off + t.bytes.size()}}};
    off += t.bytes.size();
  }
  std::string header = h.dump();
  std::string blob;
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) blob.push_back(char((n >> (8 * i)) & 0xff));
  blob += header;
  for (auto& t : tensors) blob.append(reinterpret_cast<const char*>(t.bytes.data()), t.bytes.size());
  blob.resize(blob.size() - truncate_bytes);
  std::ofstream(path, std::ios::binary).write(blob.data(), std::streamsize(blob.size()));
}

/// The tiny DeepSeek-V3 shape the golden fixtures use (3 layers, first dense, 8 experts in 4 groups).
inline nlohmann::json tiny_config_json() {
  return nlohmann::json::parse(R"({
    "model_type": "deepseek_v3", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
    "moe_intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4, "n_shared_experts": 1,
    "n_routed_experts": 8, "routed_scaling_factor": 2.5, "kv_lora_rank": 32, "q_lora_rank": 48,
    "qk_rope_head_dim": 8, "v_head_dim": 16, "qk_nope_head_dim": 16, "n_group": 4, "topk_group": 2,
    "num_experts_per_tok": 2, "first_k_dense_replace": 1, "norm_topk_prob": true,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
                     "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
  })");
}

} // namespace petrel::test
