// MLA absorbed decode (stub until the kernel lands).
#include "kernels/cuda/mla.hpp"

namespace petrel::cuda {

std::size_t mla_decode_workspace_bytes(int, int, int) { return 0; }

kernel_status mla_decode_bf16(const void*, const void*, const int*, int, const int*, int, int, int, float, void*, void*,
                              std::size_t, cudaStream_t) {
  return kernel_status::failure("mla_decode_bf16: not implemented yet");
}

} // namespace petrel::cuda
