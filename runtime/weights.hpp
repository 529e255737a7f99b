// DeepSeek-V3 weights on a backend: fp32, dequantised at load, in Hugging Face [out, in] layout.
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/backend.hpp"
#include "runtime/model_config.hpp"

namespace petrel {

class checkpoint;

/// A SwiGLU MLP: gate_up = [gate_proj; up_proj] stacked to [2*inter, hidden], down [hidden, inter].
struct mlp_weights {
  device_buffer gate_up;
  device_buffer down;
  int64_t inter = 0;
};

struct layer_weights {
  device_buffer input_norm;        // [hidden]
  device_buffer post_attn_norm;    // [hidden]
  // MLA
  device_buffer q_a;               // [q_lora, hidden]            (q_lora_rank > 0)
  device_buffer q_a_norm;          // [q_lora]
  device_buffer q_b;               // [heads*qk_head_dim, q_lora]
  device_buffer q;                 // [heads*qk_head_dim, hidden]  (q_lora_rank == 0)
  device_buffer kv_a;              // [kv_lora + rope, hidden]
  device_buffer kv_a_norm;         // [kv_lora]
  device_buffer kv_b;              // [heads*(nope+v), kv_lora]: per head W_UK rows then W_UV rows
  device_buffer o;                 // [hidden, heads*v]
  // FFN
  bool moe = false;
  mlp_weights dense;               // dense layers
  device_buffer router;            // [n_routed, hidden]
  device_buffer router_bias;       // [n_routed] e_score_correction_bias
  std::vector<mlp_weights> experts;
  mlp_weights shared;              // n_shared_experts * moe_inter wide (inter == 0 when none)
};

struct model_weights {
  device_buffer embed;             // [vocab, hidden]
  device_buffer final_norm;        // [hidden]
  device_buffer lm_head_own;       // [vocab, hidden]; empty when tied to embed
  std::vector<layer_weights> layers;
  device_buffer rope_inv_freq;     // [rope/2]

  const float* lm_head() const { return lm_head_own.empty() ? embed.f32() : lm_head_own.f32(); }
};

/// Reads every tensor the config implies (model.layers.N.*, fp8 with weight_scale_inv). Per-expert tensors
/// (mlp.experts.J.{gate,up,down}_proj.weight) and the fused layout (mlp.experts.gate_up_proj [E, 2I, H],
/// mlp.experts.down_proj [E, H, I]) are both accepted. Throws model_load_error naming the tensor.
model_weights load_weights(const model_config& cfg, const checkpoint& ckpt, backend& be);

/// Full-shape random weights (deterministic in `seed`): linear weights ~ U(-a, a) with std `stddev`, norms 1,
/// router bias 0. For benchmarks at real size without a checkpoint.
model_weights make_dummy_weights(const model_config& cfg, backend& be, uint64_t seed = 0, float stddev = 0.02f);

} // namespace petrel
