// safetensors reader (mmap) and the dtype conversions a DeepSeek-V3 checkpoint needs.
//
// A checkpoint is one model.safetensors, or shards listed by model.safetensors.index.json ("weight_map").
// Every error names the file and the tensor: truncated data, shape mismatch, missing tensor, unknown dtype.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "runtime/tensor.hpp"

namespace petrel {

/// One tensor inside a mapped safetensors file. `data` points into the mapping (valid while the file lives).
struct safetensor_info {
  std::string name;
  std::string dtype_str;      // as written in the header ("BF16", "F8_E4M3", ...)
  std::optional<dtype> type;  // empty when the dtype is not one Petrel reads
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  std::string file;

  int64_t numel() const;
  std::string shape_str() const;
};

/// A read-only mmap of one .safetensors file with its parsed header.
class safetensors_file {
public:
  /// Maps and validates the header; throws model_load_error (truncated header, offsets past the end of the
  /// file, sizes that do not match dtype x shape).
  static std::shared_ptr<safetensors_file> open(const std::filesystem::path& path);
  ~safetensors_file();
  safetensors_file(const safetensors_file&) = delete;
  safetensors_file& operator=(const safetensors_file&) = delete;

  const safetensor_info* find(const std::string& name) const;
  const std::map<std::string, safetensor_info>& tensors() const { return tensors_; }
  const std::string& path() const { return path_; }

private:
  safetensors_file() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t size_ = 0;
  std::map<std::string, safetensor_info> tensors_;
};

/// All tensors of a Hugging Face checkpoint directory.
class checkpoint {
public:
  /// Opens DIR/model.safetensors.index.json (shards), else DIR/model.safetensors, else every DIR/*.safetensors.
  static checkpoint open(const std::filesystem::path& dir);

  const safetensor_info* find(const std::string& name) const;
  /// Throws model_load_error "missing tensor 'name'" when absent.
  const safetensor_info& require(const std::string& name) const;
  bool contains(const std::string& name) const { return find(name) != nullptr; }
  size_t size() const { return by_name_.size(); }

  /// Reads tensor `name` as fp32, checking its shape equals `shape`. bf16/f16/f32 are converted; fp8 e4m3 is
  /// dequantised with `name + "_scale_inv"` (block_n x block_k blocks, partial edge blocks allowed).
  std::vector<float> read_f32(const std::string& name, const std::vector<int64_t>& shape, int64_t block_n = 128,
                              int64_t block_k = 128) const;

private:
  std::string dir_;
  std::vector<std::shared_ptr<safetensors_file>> files_;
  std::map<std::string, const safetensor_info*> by_name_;
};

// -- conversions (exposed for tests) -------------------------------------------------------------------
float bf16_to_f32(uint16_t v);
float f16_to_f32(uint16_t v);
float fp8_e4m3_to_f32(uint8_t v);
/// W[r, c] = fp8(q[r, c]) * scale_inv[r / block_n, c / block_k]; scale_inv is [ceil(rows/bn), ceil(cols/bk)].
void dequant_fp8_blocks(const uint8_t* q, const float* scale_inv, int64_t rows, int64_t cols, int64_t block_n,
                        int64_t block_k, float* out);
/// Any supported dtype to fp32 (no scales).
void convert_to_f32(const safetensor_info& t, float* out);

} // namespace petrel
