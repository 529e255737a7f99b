// MLA naive-form causal prefill (stub until the kernel lands).
#include "kernels/cuda/mla.hpp"

namespace petrel::cuda {

kernel_status mla_prefill_bf16(const void*, const void*, const void*, const int*, const int*, int, int, int, int, float,
                               void*, cudaStream_t) {
  return kernel_status::failure("mla_prefill_bf16: not implemented yet");
}

} // namespace petrel::cuda
