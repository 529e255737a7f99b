// safetensors reader: dtype conversions, fp8 128x128 block dequantisation with partial edge blocks, shards,
// and errors that name the tensor (truncated file, wrong shape, missing tensor, unknown dtype).
#include <doctest/doctest.h>

#include <cmath>
#include <fstream>

#include "runtime/safetensors.hpp"
#include "tests/unit/test_model_util.hpp"

using namespace petrel;
using petrel::test::st_f32;
using petrel::test::st_tensor;
using petrel::test::write_safetensors;

namespace {

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const model_load_error& e) {
    return e.what();
  }
  return "no error";
}

// Reference e4m3fn decoding by formula, independent of the table-driven one.
double e4m3_ref(uint8_t v) {
  int s = v >> 7, e = (v >> 3) & 15, m = v & 7;
  double mag = e == 0 ? m / 8.0 * std::pow(2.0, -6) : (1.0 + m / 8.0) * std::pow(2.0, e - 7);
  return s ? -mag : mag;
}

} // namespace

TEST_CASE("conversions: bf16, f16, fp8 e4m3") {
  CHECK(bf16_to_f32(0x3f80) == 1.0f);
  CHECK(bf16_to_f32(0xc040) == -3.0f);
  CHECK(f16_to_f32(0x3c00) == 1.0f);
  CHECK(f16_to_f32(0xc500) == -5.0f);
  CHECK(f16_to_f32(0x0001) == doctest::Approx(5.960464477539063e-08));
  CHECK(fp8_e4m3_to_f32(0x7e) == 448.0f); // largest finite
  CHECK(fp8_e4m3_to_f32(0x01) == doctest::Approx(std::pow(2.0, -9)));
  CHECK(std::isnan(fp8_e4m3_to_f32(0x7f)));
  for (int v = 0; v < 256; ++v)
    if ((v & 0x7f) != 0x7f) CHECK(fp8_e4m3_to_f32(uint8_t(v)) == float(e4m3_ref(uint8_t(v))));
}

TEST_CASE("fp8 block dequant with partial edge blocks matches a direct reference") {
  // 300 x 200 with 128x128 blocks: scale grid 3 x 2, the last row block has 44 rows, the last column block 72.
  const int64_t R = 300, C = 200, bn = 128, bk = 128;
  std::vector<uint8_t> q(size_t(R * C));
  std::mt19937 rng(7);
  for (auto& x : q) {
    x = uint8_t(rng() & 0xff);
    if ((x & 0x7f) == 0x7f) x = 0x10;
  }
  std::vector<float> scale = {0.5f, 2.0f, 0.25f, 4.0f, 1.5f, 0.125f};
  auto d = test::temp_dir("fp8");
  st_tensor w{"w.weight", "F8_E4M3", {R, C}, q};
  write_safetensors(d / "model.safetensors", {w, st_f32("w.weight_scale_inv", {3, 2}, scale)});
  checkpoint ck = checkpoint::open(d);
  std::vector<float> out = ck.read_f32("w.weight", {R, C}, bn, bk);
  size_t bad = 0;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) {
      double want = e4m3_ref(q[size_t(r * C + c)]) * scale[size_t((r / 128) * 2 + c / 128)];
      bad += out[size_t(r * C + c)] != float(want);
    }
  CHECK(bad == 0);
  // The scale tensor must have the partial-block grid shape.
  write_safetensors(d / "model.safetensors", {w, st_f32("w.weight_scale_inv", {2, 2}, {1, 1, 1, 1})});
  checkpoint ck2 = checkpoint::open(d);
  std::string e = error_of([&] { ck2.read_f32("w.weight", {R, C}); });
  CHECK(e.find("w.weight_scale_inv") != std::string::npos);
  CHECK(e.find("[3, 2]") != std::string::npos);
  // And it must exist.
  write_safetensors(d / "model.safetensors", {w});
  checkpoint ck3 = checkpoint::open(d);
  CHECK(error_of([&] { ck3.read_f32("w.weight", {R, C}); }).find("w.weight_scale_inv") != std::string::npos);
  std::filesystem::remove_all(d);
}

TEST_CASE("bf16 tensors convert, shapes are checked") {
  auto d = test::temp_dir("bf16");
  st_tensor t{"a.weight", "BF16", {2, 2}, {0x80, 0x3f, 0x00, 0x40, 0x40, 0xc0, 0x00, 0x00}};
  write_safetensors(d / "model.safetensors", {t});
  checkpoint ck = checkpoint::open(d);
  auto v = ck.read_f32("a.weight", {2, 2});
  CHECK(v == std::vector<float>{1.0f, 2.0f, -3.0f, 0.0f});
  std::string e = error_of([&] { ck.read_f32("a.weight", {4}); });
  CHECK(e.find("'a.weight'") != std::string::npos);
  CHECK(e.find("[2, 2]") != std::string::npos);
  CHECK(e.find("expected [4]") != std::string::npos);
  std::filesystem::remove_all(d);
}

TEST_CASE("errors name the tensor: truncated, missing, unknown dtype, bad size") {
  auto d = test::temp_dir("errs");
  std::vector<float> v(64, 1.0f);
  // Truncated: the last tensor's data runs past the end of the file.
  write_safetensors(d / "model.safetensors", {st_f32("ok.weight", {8, 8}, v), st_f32("cut.weight", {8, 8}, v)}, 10);
  std::string e = error_of([&] { checkpoint::open(d); });
  CHECK(e.find("'cut.weight'") != std::string::npos);
  CHECK(e.find("truncated") != std::string::npos);
  // Header length past the end of the file.
  {
    std::ofstream f(d / "model.safetensors", std::ios::binary);
    uint64_t n = 1000;
    f.write(reinterpret_cast<const char*>(&n), 8);
    f << "{}";
  }
  CHECK(error_of([&] { checkpoint::open(d); }).find("truncated") != std::string::npos);
  // Missing tensor.
  write_safetensors(d / "model.safetensors", {st_f32("ok.weight", {8, 8}, v)});
  checkpoint ck = checkpoint::open(d);
  e = error_of([&] { ck.read_f32("model.layers.0.mlp.gate.weight", {8, 8}); });
  CHECK(e.find("missing tensor 'model.layers.0.mlp.gate.weight'") != std::string::npos);
  // Unknown dtype.
  st_tensor odd{"odd.weight", "I4", {8, 8}, std::vector<uint8_t>(32)};
  write_safetensors(d / "model.safetensors", {odd});
  checkpoint ck2 = checkpoint::open(d);
  e = error_of([&] { ck2.read_f32("odd.weight", {8, 8}); });
  CHECK(e.find("'odd.weight'") != std::string::npos);
  CHECK(e.find("I4") != std::string::npos);
  // Byte count that does not match dtype x shape.
  st_tensor small{"small.weight", "F32", {8, 8}, std::vector<uint8_t>(100)};
  write_safetensors(d / "model.safetensors", {small});
  CHECK(error_of([&] { checkpoint::open(d); }).find("'small.weight'") != std::string::npos);
  // Numbers that are not integers in range (JSON parses 5.5e28 as a double; converting it was undefined): a
  // clear error naming the tensor. Found by fuzz_safetensors; its input is in the fuzz corpus.
  for (const std::string& bad : {std::string("\"data_offsets\": [0, 55555555555555555555555555516]"),
                                 std::string("\"data_offsets\": [0, 16.5]"), std::string("\"data_offsets\": [-16, 0]")}) {
    CAPTURE(bad);
    const std::string header = "{\"w\": {\"dtype\": \"F32\", \"shape\": [2, 2], " + bad + "}}";
    {
      std::ofstream f(d / "model.safetensors", std::ios::binary);
      const uint64_t n = header.size();
      f.write(reinterpret_cast<const char*>(&n), 8);
      f << header << std::string(16, '\0');
    }
    e = error_of([&] { checkpoint::open(d); });
    CHECK(e.find("'w'") != std::string::npos);
    CHECK((e.find("not an integer") != std::string::npos || e.find("negative") != std::string::npos));
  }
  {
    const std::string header = "{\"w\": {\"dtype\": \"F32\", \"shape\": [2, 1e30], \"data_offsets\": [0, 16]}}";
    std::ofstream f(d / "model.safetensors", std::ios::binary);
    const uint64_t n = header.size();
    f.write(reinterpret_cast<const char*>(&n), 8);
    f << header << std::string(16, '\0');
  }
  CHECK(error_of([&] { checkpoint::open(d); }).find("shape dimension 1e+30 is not an integer") != std::string::npos);
  // No checkpoint at all.
  std::filesystem::remove(d / "model.safetensors");
  CHECK(error_of([&] { checkpoint::open(d); }).find("model.safetensors") != std::string::npos);
  std::filesystem::remove_all(d);
}

TEST_CASE("sharded checkpoints via model.safetensors.index.json") {
  auto d = test::temp_dir("shards");
  write_safetensors(d / "model-00001-of-00002.safetensors", {st_f32("a.weight", {2}, {1, 2})});
  write_safetensors(d / "model-00002-of-00002.safetensors", {st_f32("b.weight", {3}, {3, 4, 5})});
  nlohmann::json idx = {{"metadata", {{"total_size", 20}}},
                        {"weight_map", {{"a.weight", "model-00001-of-00002.safetensors"},
                                        {"b.weight", "model-00002-of-00002.safetensors"}}}};
  std::ofstream(d / "model.safetensors.index.json") << idx.dump();
  checkpoint ck = checkpoint::open(d);
  CHECK(ck.size() == 2);
  CHECK(ck.read_f32("b.weight", {3}) == std::vector<float>{3, 4, 5});
  // An index entry pointing at a shard without the tensor is an error naming both.
  idx["weight_map"]["c.weight"] = "model-00001-of-00002.safetensors";
  std::ofstream(d / "model.safetensors.index.json") << idx.dump();
  std::string e = error_of([&] { checkpoint::open(d); });
  CHECK(e.find("'c.weight'") != std::string::npos);
  idx["weight_map"]["c.weight"] = "model-00003-of-00002.safetensors";
  std::ofstream(d / "model.safetensors.index.json") << idx.dump();
  CHECK(error_of([&] { checkpoint::open(d); }).find("model-00003-of-00002.safetensors") != std::string::npos);
  std::filesystem::remove_all(d);
}
