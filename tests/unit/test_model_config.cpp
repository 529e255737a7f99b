// model_config: parsing of Hugging Face config.json (rope_scaling vs rope_parameters, fp8 quantization_config,
// null q_lora_rank), validation errors, and the YaRN numbers checked by hand.
#include <doctest/doctest.h>

#include <cmath>
#include <fstream>

#include "runtime/model_config.hpp"
#include "runtime/tensor.hpp"
#include "tests/unit/test_model_util.hpp"

using petrel::model_config;
using petrel::model_load_error;
using nlohmann::json;

TEST_CASE("model_config: rope_scaling (old style) with YaRN") {
  model_config c = model_config::from_json(petrel::test::tiny_config_json());
  CHECK(c.rope.type == "yarn");
  CHECK(c.rope.theta == 10000.0);
  CHECK(c.rope.factor == 4.0);
  CHECK(c.rope.original_max_position_embeddings == 64);
  CHECK(c.q_lora_rank == 48);
  CHECK(c.qk_head_dim() == 24);
  CHECK(c.kv_entry_floats() == 40);
  CHECK_FALSE(c.is_moe_layer(0));
  CHECK(c.is_moe_layer(1));
  CHECK(c.is_moe_layer(2));
  // Hand-computed (dim 8, base 1e4, factor 256/64, beta 32/1 over 64 positions): correction range [0, 2].
  auto inv = c.rope_inv_freq();
  REQUIRE(inv.size() == 4);
  CHECK(inv[0] == doctest::Approx(1.0));
  CHECK(inv[1] == doctest::Approx(0.0625));
  CHECK(inv[2] == doctest::Approx(0.0025));
  CHECK(inv[3] == doctest::Approx(0.00025));
  CHECK(c.rope_attention_factor() == doctest::Approx(1.0)); // mscale == mscale_all_dim
  double m = 0.1 * std::log(4.0) + 1.0;
  CHECK(c.softmax_scale() == doctest::Approx(m * m / std::sqrt(24.0)));
}

TEST_CASE("model_config: rope_parameters (new style) carries rope_theta and wins over rope_scaling") {
  json j = petrel::test::tiny_config_json();
  j.erase("rope_theta");
  j["rope_scaling"] = nullptr;
  j["rope_parameters"] = {{"rope_type", "yarn"}, {"rope_theta", 50000.0}, {"factor", 4.0},
                          {"original_max_position_embeddings", 64}, {"beta_fast", 32.0}, {"beta_slow", 1.0},
                          {"mscale", 1.0}, {"mscale_all_dim", 1.0}};
  model_config c = model_config::from_json(j);
  CHECK(c.rope.type == "yarn");
  CHECK(c.rope.theta == 50000.0);
  CHECK(c.rope.factor == 4.0);

  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 500.0}};
  j["rope_scaling"] = {{"type", "yarn"}, {"factor", 8.0}};
  c = model_config::from_json(j);
  CHECK(c.rope.type == "default");
  CHECK(c.rope.theta == 500.0);
  auto inv = c.rope_inv_freq();
  CHECK(inv[1] == doctest::Approx(1.0 / std::pow(500.0, 2.0 / 8.0)));
  CHECK(c.softmax_scale() == doctest::Approx(1.0 / std::sqrt(24.0)));
  CHECK(c.rope_attention_factor() == 1.0);
}

TEST_CASE("model_config: YaRN attention factor when mscale_all_dim is absent") {
  json j = petrel::test::tiny_config_json();
  j["rope_scaling"].erase("mscale_all_dim");
  model_config c = model_config::from_json(j);
  CHECK(c.rope_attention_factor() == doctest::Approx(0.1 * std::log(4.0) + 1.0));
  CHECK(c.softmax_scale() == doctest::Approx(1.0 / std::sqrt(24.0))); // no mscale_all_dim: plain scale
}

TEST_CASE("model_config: q_lora_rank null, fp8 quantization_config") {
  json j = petrel::test::tiny_config_json();
  j["q_lora_rank"] = nullptr;
  j["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"},
                              {"weight_block_size", {128, 64}}};
  model_config c = model_config::from_json(j);
  CHECK(c.q_lora_rank == 0);
  CHECK(c.quant.fp8);
  CHECK(c.quant.block_n == 128);
  CHECK(c.quant.block_k == 64);
}

TEST_CASE("model_config: bad configs name the field") {
  auto err = [](json j) {
    try {
      model_config::from_json(j, "cfg.json");
    } catch (const model_load_error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  json j = petrel::test::tiny_config_json();
  j["model_type"] = "llama";
  CHECK(err(j).find("model_type 'llama'") != std::string::npos);
  j = petrel::test::tiny_config_json();
  j.erase("kv_lora_rank");
  CHECK(err(j).find("kv_lora_rank") != std::string::npos);
  j = petrel::test::tiny_config_json();
  j["hidden_size"] = "big";
  CHECK(err(j).find("hidden_size") != std::string::npos);
  j = petrel::test::tiny_config_json();
  j["n_group"] = 3;
  CHECK(err(j).find("n_group") != std::string::npos);
  j = petrel::test::tiny_config_json();
  j["rope_scaling"]["type"] = "longrope";
  CHECK(err(j).find("longrope") != std::string::npos);
  j = petrel::test::tiny_config_json();
  j["quantization_config"] = {{"quant_method", "awq"}};
  CHECK(err(j).find("awq") != std::string::npos);
  CHECK(err(j).find("cfg.json") == 0);
}

TEST_CASE("model_config: load reads a directory's config.json and reports a missing one") {
  auto d = petrel::test::temp_dir("cfg");
  CHECK_THROWS_WITH_AS(model_config::load(d), doctest::Contains("config.json"), model_load_error);
  std::ofstream(d / "config.json") << petrel::test::tiny_config_json().dump();
  CHECK(model_config::load(d).hidden_size == 64);
  std::ofstream(d / "config.json") << "{not json";
  CHECK_THROWS_WITH_AS(model_config::load(d), doctest::Contains("invalid JSON"), model_load_error);
  std::filesystem::remove_all(d);
}
