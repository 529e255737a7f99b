// Dense fp8 GEMM with DeepSeek-style block scaling through cuBLASLt (cuBLAS >= 12.9 block scaling).
// Row-major D[m, n] = A[m, k] x B[n, k]^T is computed as the column-major product
// D^T[n, m] = op_T(B)[n, k] x A^T[k, m]: cuBLAS's "A" is Petrel's weight (BLK128x128 scales) and
// cuBLAS's "B" is Petrel's activation (VEC128 scales), both K-major ("TN").
// Bound: compute for large m, weight bandwidth for small m.
#include "kernels/cuda/gemm_fp8.hpp"

#include <cublasLt.h>

#include <string>

namespace petrel::cuda {
namespace {

constexpr std::size_t workspace_bytes = 32u << 20;

std::string cublas_error(const char* what, cublasStatus_t s) {
  return std::string("cublaslt_fp8_gemm_nt: ") + what + " failed with status " + std::to_string(static_cast<int>(s));
}

} // namespace

struct cublaslt_fp8_gemm_nt::impl {
  std::int64_t m = 0, n = 0, k = 0;
  std::string error;
  cublasLtHandle_t handle = nullptr;
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t layout_w = nullptr, layout_x = nullptr, layout_d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  void* workspace = nullptr;

  bool transposed = false; // true: cuBLAS's A is the activation and D comes out as [n, m]

  // Tries one operand order; returns an empty string on success.
  std::string try_plan(bool activation_first) {
    if (desc) { cublasLtMatmulDescDestroy(desc); desc = nullptr; }
    for (auto* l : {&layout_w, &layout_x, &layout_d})
      if (*l) { cublasLtMatrixLayoutDestroy(*l); *l = nullptr; }
    cublasStatus_t s;
    if ((s = cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F)) != CUBLAS_STATUS_SUCCESS)
      return cublas_error("cublasLtMatmulDescCreate", s);
    const cublasOperation_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_t, sizeof(op_t));
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_n, sizeof(op_n));
    const std::int32_t mode_w = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
    const std::int32_t mode_x = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, activation_first ? &mode_x : &mode_w, sizeof(mode_w));
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, activation_first ? &mode_w : &mode_x, sizeof(mode_x));
    // Non-null placeholders for the heuristic query (with null scale pointers the H100 run got status 7,
    // CUBLAS_STATUS_INVALID_VALUE, and no algorithm); run() sets the real ones.
    const void* placeholder = workspace;
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &placeholder, sizeof(placeholder));
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &placeholder, sizeof(placeholder));
    if ((s = cublasLtMatrixLayoutCreate(&layout_w, CUDA_R_8F_E4M3, k, n, k)) != CUBLAS_STATUS_SUCCESS ||
        (s = cublasLtMatrixLayoutCreate(&layout_x, CUDA_R_8F_E4M3, k, m, k)) != CUBLAS_STATUS_SUCCESS ||
        (s = cublasLtMatrixLayoutCreate(&layout_d, CUDA_R_16BF, activation_first ? m : n, activation_first ? n : m,
                                        activation_first ? m : n)) != CUBLAS_STATUS_SUCCESS)
      return cublas_error("cublasLtMatrixLayoutCreate", s);
    cublasLtMatmulPreference_t pref = nullptr;
    cublasLtMatmulPreferenceCreate(&pref);
    const std::size_t ws = workspace_bytes;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    s = activation_first
            ? cublasLtMatmulAlgoGetHeuristic(handle, desc, layout_x, layout_w, layout_d, layout_d, pref, 1, &result, &found)
            : cublasLtMatmulAlgoGetHeuristic(handle, desc, layout_w, layout_x, layout_d, layout_d, pref, 1, &result, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (s != CUBLAS_STATUS_SUCCESS || found == 0)
      return std::string(activation_first ? "activation-first" : "weight-first") + " order: status " +
             std::to_string(static_cast<int>(s)) + ", " + std::to_string(found) + " algorithms";
    algo = result.algo;
    transposed = activation_first;
    return {};
  }

  void plan() {
    if (m <= 0 || n <= 0 || k <= 0) { error = "cublaslt_fp8_gemm_nt: m, n, k must be positive"; return; }
    if (k % fp8_block != 0) { error = "cublaslt_fp8_gemm_nt: k=" + std::to_string(k) + " must be a multiple of 128"; return; }
    if (m % 4 != 0) { error = "cublaslt_fp8_gemm_nt: m=" + std::to_string(m) + " must be a multiple of 4 (scale leading dimension)"; return; }
    if (n % 16 != 0) { error = "cublaslt_fp8_gemm_nt: n=" + std::to_string(n) + " must be a multiple of 16"; return; }
    // cuBLASLt reads the 128x128 weight scales with a row stride of k/128 rounded up to 4 (on the H100,
    // k = 256 and 384 gave wrong results with Petrel's unpadded [n/128][k/128] layout; k/128 = 16, 56 and
    // 128 matched the reference). Every DeepSeek-V3 K is a multiple of 512, so require that.
    if ((k / fp8_block) % 4 != 0) {
      error = "cublaslt_fp8_gemm_nt: k=" + std::to_string(k) + " must be a multiple of 512 (cuBLASLt pads the weight-scale rows to 4)";
      return;
    }
    cublasStatus_t s;
    if ((s = cublasLtCreate(&handle)) != CUBLAS_STATUS_SUCCESS) { error = cublas_error("cublasLtCreate", s); return; }
    if (cudaMalloc(&workspace, workspace_bytes) != cudaSuccess) { error = "cublaslt_fp8_gemm_nt: cannot allocate the workspace"; return; }
    // Row-major D[m, n] directly needs the weight as cuBLAS's A; if cuBLASLt offers no algorithm for
    // that order, fall back to the activation as A, which writes D transposed ([n, m]).
    const std::string first = try_plan(false);
    if (first.empty()) return;
    const std::string second = try_plan(true);
    if (second.empty()) return;
    error = "cublaslt_fp8_gemm_nt: no cuBLASLt algorithm for m=" + std::to_string(m) + " n=" + std::to_string(n) +
            " k=" + std::to_string(k) + " (" + first + "; " + second + ")";
  }

  ~impl() {
    if (layout_d) cublasLtMatrixLayoutDestroy(layout_d);
    if (layout_x) cublasLtMatrixLayoutDestroy(layout_x);
    if (layout_w) cublasLtMatrixLayoutDestroy(layout_w);
    if (desc) cublasLtMatmulDescDestroy(desc);
    if (handle) cublasLtDestroy(handle);
    if (workspace) cudaFree(workspace);
  }
};

cublaslt_fp8_gemm_nt::cublaslt_fp8_gemm_nt(std::int64_t m, std::int64_t n, std::int64_t k) : impl_(new impl) {
  impl_->m = m; impl_->n = n; impl_->k = k;
  impl_->plan();
}

cublaslt_fp8_gemm_nt::~cublaslt_fp8_gemm_nt() = default;

bool cublaslt_fp8_gemm_nt::ok() const { return impl_->error.empty(); }
bool cublaslt_fp8_gemm_nt::output_transposed() const { return impl_->transposed; }
const std::string& cublaslt_fp8_gemm_nt::error() const { return impl_->error; }

kernel_status cublaslt_fp8_gemm_nt::run(const void* a_fp8, const float* a_scales, const void* b_fp8,
                                        const float* b_scales, void* d_bf16, cudaStream_t stream) {
  if (!ok()) return kernel_status::failure(impl_->error);
  auto& p = *impl_;
  const float alpha = 1.0f, beta = 0.0f;
  cublasStatus_t s;
  if (!p.transposed) {
    cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &b_scales, sizeof(b_scales));
    cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &a_scales, sizeof(a_scales));
    s = cublasLtMatmul(p.handle, p.desc, &alpha, b_fp8, p.layout_w, a_fp8, p.layout_x, &beta, d_bf16, p.layout_d, d_bf16,
                       p.layout_d, &p.algo, p.workspace, workspace_bytes, stream);
  } else {
    cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scales, sizeof(a_scales));
    cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scales, sizeof(b_scales));
    s = cublasLtMatmul(p.handle, p.desc, &alpha, a_fp8, p.layout_x, b_fp8, p.layout_w, &beta, d_bf16, p.layout_d, d_bf16,
                       p.layout_d, &p.algo, p.workspace, workspace_bytes, stream);
  }
  if (s != CUBLAS_STATUS_SUCCESS) return kernel_status::failure(cublas_error("cublasLtMatmul", s));
  return kernel_status::success();
}

std::size_t cublaslt_version() { return cublasLtGetVersion(); }

} // namespace petrel::cuda
