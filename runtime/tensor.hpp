// Tensor views and backend-owned buffers.
//
// The model never owns raw device memory itself: a backend allocates a `device_buffer`, and the ops of the
// Backend interface take plain (pointer, shape, leading dimension) views into such buffers. On the cpu
// backend the pointers are host pointers; on a CUDA backend they are device pointers, so code outside the
// backend must never dereference them (use backend::copy_to_host).
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

namespace petrel {

class backend;

/// Element types that appear in checkpoints. Activations and dequantised weights are always f32.
enum class dtype : uint8_t { f32, f16, bf16, f8_e4m3, i32, i64, u8 };

/// Bytes per element of `t`.
size_t dtype_size(dtype t);
/// The safetensors spelling ("F32", "BF16", "F8_E4M3", ...).
const char* dtype_name(dtype t);

/// A row-major fp32 matrix view: rows x cols, consecutive rows `ld` floats apart (ld >= cols).
struct mat_view {
  float* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t ld = 0;

  mat_view() = default;
  mat_view(float* d, int64_t r, int64_t c) : data(d), rows(r), cols(c), ld(c) {}
  mat_view(float* d, int64_t r, int64_t c, int64_t l) : data(d), rows(r), cols(c), ld(l) {}

  /// Columns [c0, c0 + n) of every row (same ld).
  mat_view col_slice(int64_t c0, int64_t n) const { return {data + c0, rows, n, ld}; }
  /// Rows [r0, r0 + n).
  mat_view row_slice(int64_t r0, int64_t n) const { return {data + r0 * ld, n, cols, ld}; }
  bool contiguous() const { return ld == cols; }
};

/// Memory allocated by a backend (host memory on cpu, device memory on cuda). Move-only; frees itself.
class device_buffer {
public:
  device_buffer() = default;
  device_buffer(backend* owner, void* ptr, size_t bytes) : owner_(owner), ptr_(ptr), bytes_(bytes) {}
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  device_buffer(device_buffer&& o) noexcept { swap(o); }
  device_buffer& operator=(device_buffer&& o) noexcept {
    if (this != &o) {
      release();
      swap(o);
    }
    return *this;
  }
  ~device_buffer() { release(); }

  void* data() const { return ptr_; }
  float* f32() const { return static_cast<float*>(ptr_); }
  int32_t* i32() const { return static_cast<int32_t*>(ptr_); }
  size_t bytes() const { return bytes_; }
  bool empty() const { return ptr_ == nullptr; }
  /// A contiguous rows x cols fp32 view of the start of the buffer.
  mat_view mat(int64_t rows, int64_t cols) const { return {f32(), rows, cols, cols}; }

  void release();

private:
  void swap(device_buffer& o) noexcept {
    std::swap(owner_, o.owner_);
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
  }
  backend* owner_ = nullptr;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

/// Thrown for a bad model directory, config or checkpoint: the message names the file and tensor.
/// Command-line tools map it to exit code 2 (bad user input).
struct model_load_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

} // namespace petrel
