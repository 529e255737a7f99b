// petrel bench-kernels: Petrel's fp8 GEMMs (dense, grouped contiguous, grouped masked) and the 1x128
// activation quantisation at DeepGEMM's published shapes, next to cuBLASLt timed in the same run and
// the anchors of ANCHORS.md. Every figure printed carries its anchor and the ratio.
#include "tools/command.hpp"
#include "tools/bench_common.hpp"

#include <cstdio>
#include <memory>
#include <string>

#ifdef PETREL_HAVE_CUDA
#include <algorithm>
#include <vector>

#include "kernels/cuda/fp8_layout.hpp"
#include "kernels/cuda/fp8_reference.hpp"
#include "kernels/cuda/gemm_fp8.hpp"
#include "kernels/cuda/grouped_gemm_fp8.hpp"
#include "kernels/cuda/quant.hpp"
#endif

namespace {

struct bench_options : petrel::bench::kernel_bench_options {
  int block_n = 0;
  bool serial_promotion = false;
};

#ifdef PETREL_HAVE_CUDA
using namespace petrel::cuda;

// -- the shapes of DeepGEMM's tables (ANCHORS.md), with their H800 figures ------------------
enum class layout { dense, contiguous, masked };

struct bench_case {
  std::string name;
  layout kind;
  int groups;
  std::int64_t m;  // rows (dense), rows per group (contiguous), expected rows per group (masked)
  std::int64_t n, k;
  double anchor_tflops;
  double anchor_gbs; // 0 where ANCHORS.md gives none
};

const std::vector<bench_case>& cases() {
  static const std::vector<bench_case> all = {
      {"dense 4096x7168x16384", layout::dense, 1, 4096, 7168, 16384, 1520, 0},
      {"dense 4096x4096x7168", layout::dense, 1, 4096, 4096, 7168, 1410, 0},
      {"dense 128x7168x16384", layout::dense, 1, 128, 7168, 16384, 645, 0},
      {"dense 64x2112x7168", layout::dense, 1, 64, 2112, 7168, 206, 1688},
      {"contig 8x4096 n4096 k7168", layout::contiguous, 8, 4096, 4096, 7168, 1346, 0},
      {"contig 8x4096 n7168 k2048", layout::contiguous, 8, 4096, 7168, 2048, 1214, 0},
      {"masked 4x256 n4096 k7168", layout::masked, 4, 256, 4096, 7168, 932, 2064},
      {"masked 4x256 n7168 k2048", layout::masked, 4, 256, 7168, 2048, 815, 0},
      {"masked 1x1024 n4096 k7168", layout::masked, 1, 1024, 4096, 7168, 1233, 0},
  };
  return all;
}

using petrel::bench::device_array;
using petrel::bench::ensure;

// Median time of `fn` in microseconds; the L2 is flushed (a 256 MiB memset) before every timed run,
// outside the timed region, so weights are read from HBM as in a real forward pass.
double time_us(const std::function<void()>& fn, const bench_options& opt, void* flush, std::size_t flush_bytes) {
  int i = 0;
  return petrel::bench::median_us(fn, opt.warmup, opt.iters, nullptr,
                                  [&] { ensure(cudaMemsetAsync(flush, i++ & 0xFF, flush_bytes, nullptr), "L2 flush"); });
}

struct result_row {
  std::string shape, kernel, config;
  double us = 0, tflops = 0, gbs = 0, anchor_tflops = 0, ratio = 0, vs_cublas = 0;
  bool checked = false, passed = true;
  gemm_error err;
};

bool error_ok(const gemm_error& e) { return e.non_finite == 0 && e.rel_l2 < 5e-3 && e.max_rel() < 2e-2; }

// Diagnostic for a failed cuBLASLt check: rerun with the scale tensors in the other orders and
// report which one matches, so a layout misunderstanding shows up in one device run.
void probe_cublas_scale_layouts(cublaslt_fp8_gemm_nt& plan, const std::uint8_t* a, const float* sa, const std::uint8_t* b,
                                const float* sb, std::int64_t m, std::int64_t n, std::int64_t k, std::uint16_t* d,
                                const float* ref, const int* row_group) {
  const std::int64_t kb = k / 128, nb = (n + 127) / 128, ld = fp8_scale_ld(m);
  std::vector<float> hsa(kb * ld), hsb(nb * kb);
  ensure(cudaMemcpy(hsa.data(), sa, hsa.size() * 4, cudaMemcpyDeviceToHost), "probe");
  ensure(cudaMemcpy(hsb.data(), sb, hsb.size() * 4, cudaMemcpyDeviceToHost), "probe");
  std::vector<float> sa_mk(m * kb), sb_kn(kb * nb);
  for (std::int64_t r = 0; r < m; ++r)
    for (std::int64_t j = 0; j < kb; ++j) sa_mk[r * kb + j] = hsa[j * ld + r];
  for (std::int64_t i = 0; i < nb; ++i)
    for (std::int64_t j = 0; j < kb; ++j) sb_kn[j * nb + i] = hsb[i * kb + j];
  device_array<float> dsa(sa_mk.size()), dsb(sb_kn.size());
  ensure(cudaMemcpy(dsa.ptr, sa_mk.data(), sa_mk.size() * 4, cudaMemcpyHostToDevice), "probe");
  ensure(cudaMemcpy(dsb.ptr, sb_kn.data(), sb_kn.size() * 4, cudaMemcpyHostToDevice), "probe");
  const float* a_variants[2] = {sa, dsa.ptr};
  const float* b_variants[2] = {sb, dsb.ptr};
  const char* a_names[2] = {"act scales [k/128][m]", "act scales [m][k/128]"};
  const char* b_names[2] = {"weight scales [n/128][k/128]", "weight scales [k/128][n/128]"};
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      gemm_error e;
      ensure(plan.run(a, a_variants[i], b, b_variants[j], d, nullptr));
      ensure(cudaDeviceSynchronize(), "probe");
      ensure(compare_bf16_to_reference(d, ref, m, n, row_group, &e, nullptr));
      std::printf("probe cublaslt %s, %s: rel_l2 %.2e\n", a_names[i], b_names[j], e.rel_l2);
    }
}

int run_benchmarks(const bench_options& opt) {
  int dev = 0;
  ensure(cudaGetDevice(&dev), "cudaGetDevice");
  cudaDeviceProp prop{};
  ensure(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties");
  int runtime = 0, driver = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);
  std::printf("device: %s, %d SMs, L2 %d MiB, cc %d.%d; runtime %d, driver %d, cuBLASLt %zu\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20, prop.major, prop.minor, runtime, driver, cublaslt_version());
  if (prop.major != 9) {
    std::fprintf(stderr, "bench-kernels: the fp8 kernels need an sm_90 (Hopper) GPU, found cc %d.%d\n", prop.major, prop.minor);
    return 1;
  }
  set_grouped_gemm_block_n_override(opt.block_n);
  set_grouped_gemm_paired_promotion(!opt.serial_promotion);
  const std::size_t flush_bytes = 256u << 20;
  device_array<std::uint8_t> flush(flush_bytes);

  std::vector<result_row> rows_out;
  nlohmann::json json_quant = nlohmann::json::array();
  bool all_ok = true;

  for (const bench_case& bc : cases()) {
    if (!opt.only.empty() && bc.name.find(opt.only) == std::string::npos) continue;
    const int G = bc.groups;
    const std::int64_t n = bc.n, k = bc.k;
    const std::int64_t max_m = bc.kind == layout::masked ? 2 * bc.m : bc.m; // masked: counts fill half the buffer
    const std::int64_t rows = bc.kind == layout::dense ? bc.m : G * max_m;
    const std::int64_t valid_rows = static_cast<std::int64_t>(G) * bc.m;
    std::printf("\n== %s (rows %lld, valid %lld)\n", bc.name.c_str(), static_cast<long long>(rows), static_cast<long long>(valid_rows));
    std::fflush(stdout);

    // inputs: bf16 activations -> quant -> fp8 + scales; random fp8 weights and block scales
    device_array<std::uint16_t> x(rows * k);
    device_array<std::uint8_t> a(rows * k), b(static_cast<std::size_t>(G) * n * k);
    device_array<float> sa(fp8_act_scale_count(rows, k)), sb(fp8_weight_scale_count(G, n, k));
    ensure(fill_random_bf16(x.ptr, rows * k, k, 1234 + bc.n, nullptr));
    ensure(fill_random_fp8(b.ptr, static_cast<std::int64_t>(G) * n * k, 99 + bc.k, nullptr));
    ensure(fill_random_float(sb.ptr, fp8_weight_scale_count(G, n, k), 0.5e-3f, 2e-3f, 7, nullptr));
    ensure(quantize_bf16_to_fp8_1x128(x.ptr, rows, k, a.ptr, sa.ptr, nullptr));
    {
      const double us = time_us([&] { ensure(quantize_bf16_to_fp8_1x128(x.ptr, rows, k, a.ptr, sa.ptr, nullptr)); }, opt,
                                flush.ptr, flush_bytes);
      const double bytes = static_cast<double>(rows) * k * 3 + fp8_act_scale_count(rows, k) * 4.0;
      std::printf("quant bf16->e4m3 1x128 [%lld, %lld]: %.1f us, %.0f GB/s\n", static_cast<long long>(rows),
                  static_cast<long long>(k), us, bytes / us * 1e-3);
      json_quant.push_back({{"shape", bc.name}, {"rows", rows}, {"k", k}, {"time_us", us}, {"gbs", bytes / us * 1e-3}});
    }

    // which rows count, per layout
    std::vector<int> row_group(rows, 0), counts(G, static_cast<int>(bc.m));
    if (bc.kind == layout::contiguous)
      for (std::int64_t r = 0; r < rows; ++r) row_group[r] = static_cast<int>(r / bc.m);
    if (bc.kind == layout::masked)
      for (std::int64_t r = 0; r < rows; ++r) row_group[r] = (r % max_m) < bc.m ? static_cast<int>(r / max_m) : -1;
    std::vector<int> block_group((rows + 63) / 64, -1);
    for (std::int64_t r = 0; r < rows; ++r)
      if (row_group[r] >= 0) block_group[r / 64] = row_group[r];
    device_array<int> d_row_group(rows), d_block_group(block_group.size()), d_counts(G);
    ensure(cudaMemcpy(d_row_group.ptr, row_group.data(), rows * sizeof(int), cudaMemcpyHostToDevice), "upload");
    ensure(cudaMemcpy(d_block_group.ptr, block_group.data(), block_group.size() * sizeof(int), cudaMemcpyHostToDevice), "upload");
    ensure(cudaMemcpy(d_counts.ptr, counts.data(), G * sizeof(int), cudaMemcpyHostToDevice), "upload");

    device_array<std::uint16_t> d_own(rows * n), d_blas(rows * n);

    // Petrel's kernel for this layout
    std::function<void()> own;
    std::int64_t m_blocks = (rows + 127) / 128;
    if (bc.kind == layout::dense)
      own = [&] { ensure(fp8_gemm_nt(a.ptr, sa.ptr, rows, b.ptr, sb.ptr, n, k, d_own.ptr, nullptr)); };
    else if (bc.kind == layout::contiguous)
      own = [&] {
        ensure(m_grouped_fp8_gemm_nt_contiguous(a.ptr, sa.ptr, rows, d_row_group.ptr, b.ptr, sb.ptr, G, n, k, d_own.ptr, nullptr));
      };
    else {
      m_blocks = G * ((max_m + 127) / 128);
      own = [&] {
        ensure(m_grouped_fp8_gemm_nt_masked(a.ptr, sa.ptr, G, max_m, d_counts.ptr, b.ptr, sb.ptr, n, k, d_own.ptr, nullptr));
      };
    }

    // cuBLASLt: one call for dense, a loop over the groups otherwise (per-group scale copies are
    // prepared outside the timed region, because cuBLASLt wants the scale leading dimension = m)
    const std::int64_t ld = fp8_scale_ld(rows);
    const std::int64_t k_blocks = k / 128, n_scale_blocks = (n + 127) / 128;
    std::unique_ptr<device_array<float>> group_scales;
    auto plan = std::make_unique<cublaslt_fp8_gemm_nt>(bc.m, n, k);
    std::function<void()> blas;
    if (plan->ok()) {
      if (bc.kind == layout::dense) {
        blas = [&] { ensure(plan->run(a.ptr, sa.ptr, b.ptr, sb.ptr, d_blas.ptr, nullptr)); };
      } else {
        group_scales = std::make_unique<device_array<float>>(static_cast<std::size_t>(G) * k_blocks * bc.m);
        for (int g = 0; g < G; ++g) {
          const std::int64_t row0 = bc.kind == layout::contiguous ? g * bc.m : g * max_m;
          ensure(cudaMemcpy2D(group_scales->ptr + g * k_blocks * bc.m, bc.m * 4, sa.ptr + row0, ld * 4, bc.m * 4, k_blocks,
                              cudaMemcpyDeviceToDevice),
                 "group scales");
        }
        blas = [&, max_m] {
          for (int g = 0; g < G; ++g) {
            const std::int64_t row0 = bc.kind == layout::contiguous ? g * bc.m : g * max_m;
            ensure(plan->run(a.ptr + row0 * k, group_scales->ptr + g * k_blocks * bc.m, b.ptr + g * n * k,
                             sb.ptr + g * n_scale_blocks * k_blocks, d_blas.ptr + row0 * n, nullptr));
          }
        };
      }
    } else {
      std::printf("cuBLASLt: %s\n", plan->error().c_str());
    }

    // correctness against the fp32 reference
    result_row own_row, blas_row;
    if (opt.check) {
      device_array<float> ref(rows * n);
      ensure(reference_fp8_gemm_nt(a.ptr, sa.ptr, rows, b.ptr, sb.ptr, n, k, d_row_group.ptr, d_block_group.ptr, ref.ptr, nullptr));
      ensure(cudaMemset(d_own.ptr, 0xFF, rows * n * 2), "poison");
      own();
      ensure(cudaDeviceSynchronize(), "petrel kernel");
      ensure(compare_bf16_to_reference(d_own.ptr, ref.ptr, rows, n, d_row_group.ptr, &own_row.err, nullptr));
      own_row.checked = true;
      own_row.passed = error_ok(own_row.err);
      if (blas) {
        ensure(cudaMemset(d_blas.ptr, 0xFF, rows * n * 2), "poison");
        blas();
        ensure(cudaDeviceSynchronize(), "cublaslt");
        const std::uint16_t* blas_result = d_blas.ptr;
        if (plan->output_transposed()) { // each group's block came out as [n, m]: put it back to [m, n]
          ensure(cudaMemset(d_own.ptr, 0xFF, rows * n * 2), "poison");
          for (int g = 0; g < G; ++g) {
            const std::int64_t row0 = bc.kind == layout::contiguous ? g * bc.m : g * max_m;
            ensure(transpose_bf16(d_blas.ptr + row0 * n, n, bc.m, d_own.ptr + row0 * n, nullptr));
          }
          blas_result = d_own.ptr;
        }
        ensure(compare_bf16_to_reference(blas_result, ref.ptr, rows, n, d_row_group.ptr, &blas_row.err, nullptr));
        blas_row.checked = true;
        blas_row.passed = error_ok(blas_row.err);
        if (!blas_row.passed && bc.kind == layout::dense && !plan->output_transposed()) probe_cublas_scale_layouts(*plan, a.ptr, sa.ptr, b.ptr, sb.ptr, rows, n, k, d_blas.ptr, ref.ptr, d_row_group.ptr);
      }
      for (auto* r : {&own_row, &blas_row})
        if (r->checked)
          std::printf("check %-8s rel_l2 %.2e  max_rel %.2e  non_finite %lld  %s\n", r == &own_row ? "petrel" : "cublaslt",
                      r->err.rel_l2, r->err.max_rel(), static_cast<long long>(r->err.non_finite), r->passed ? "ok" : "FAILED");
      all_ok = all_ok && own_row.passed && blas_row.passed;
    }

    // timing
    const double flops = 2.0 * valid_rows * n * k;
    const double bytes = static_cast<double>(valid_rows) * k + static_cast<double>(G) * n * k + valid_rows * n * 2.0;
    grouped_gemm_config cfg = grouped_gemm_config_for(m_blocks, n);
    own_row.shape = blas_row.shape = bc.name;
    own_row.kernel = "petrel";
    own_row.config = "BM128 BN" + std::to_string(cfg.block_n) + " st" + std::to_string(cfg.stages) + " ctas" +
                     std::to_string(cfg.ctas) + (opt.serial_promotion || cfg.block_n > 128 ? " serial" : " paired");
    own_row.us = time_us(own, opt, flush.ptr, flush_bytes);
    blas_row.kernel = bc.kind == layout::dense ? "cublaslt" : "cublaslt-loop";
    blas_row.config = bc.kind == layout::dense ? "heuristic #1" : std::to_string(G) + " calls";
    if (plan->ok() && plan->output_transposed()) blas_row.config += ", D written as [n,m]";
    if (blas) blas_row.us = time_us(blas, opt, flush.ptr, flush_bytes);
    for (auto* r : {&own_row, &blas_row}) {
      if (r->us <= 0) continue;
      r->tflops = flops / r->us * 1e-6;
      r->gbs = bytes / r->us * 1e-3;
      r->anchor_tflops = bc.anchor_tflops;
      r->ratio = r->tflops / bc.anchor_tflops;
    }
    if (blas_row.us > 0) own_row.vs_cublas = blas_row.us / own_row.us;
    rows_out.push_back(own_row);
    if (blas_row.us > 0) rows_out.push_back(blas_row);
    std::printf("petrel   %8.1f us %7.1f TFLOPS %6.0f GB/s  [%s]\n", own_row.us, own_row.tflops, own_row.gbs, own_row.config.c_str());
    if (blas_row.us > 0)
      std::printf("cublaslt %8.1f us %7.1f TFLOPS %6.0f GB/s  [%s]\n", blas_row.us, blas_row.tflops, blas_row.gbs, blas_row.config.c_str());
    std::fflush(stdout);
  }

  std::printf("\n%-27s %-13s %9s %8s %7s %7s %6s %8s %s\n", "shape", "kernel", "time_us", "TFLOPS", "GB/s", "anchor",
              "ratio", "vs_blas", "check");
  for (const auto& r : rows_out)
    std::printf("%-27s %-13s %9.1f %8.1f %7.0f %7.0f %6.2f %8s %s\n", r.shape.c_str(), r.kernel.c_str(), r.us, r.tflops,
                r.gbs, r.anchor_tflops, r.ratio, r.vs_cublas > 0 ? (std::to_string(r.vs_cublas).substr(0, 4) + "x").c_str() : "",
                !r.checked ? "-" : r.passed ? "ok" : "FAILED");

  if (!opt.json_path.empty()) {
    nlohmann::json out;
    out["device"] = prop.name;
    out["sms"] = prop.multiProcessorCount;
    out["iters"] = opt.iters;
    out["l2_flush_bytes"] = flush_bytes;
    out["quant"] = json_quant;
    out["gemm"] = nlohmann::json::array();
    for (const auto& r : rows_out)
      out["gemm"].push_back({{"shape", r.shape}, {"kernel", r.kernel}, {"config", r.config}, {"time_us", r.us},
                             {"tflops", r.tflops}, {"gbs", r.gbs}, {"anchor_tflops", r.anchor_tflops}, {"ratio", r.ratio},
                             {"speedup_vs_cublaslt", r.vs_cublas}, {"checked", r.checked}, {"passed", r.passed},
                             {"rel_l2", r.err.rel_l2}, {"max_rel", r.err.max_rel()}, {"non_finite", r.err.non_finite}});
    petrel::bench::write_json(opt.json_path, out);
  }
  if (opt.check && !all_ok) {
    std::fprintf(stderr, "bench-kernels: a kernel failed its check against the fp32 reference\n");
    return 1;
  }
  return 0;
}
#endif // PETREL_HAVE_CUDA

const bool registered = petrel::cli::register_command(
    "bench-kernels", "benchmark the CUDA fp8 GEMM and quantisation kernels against DeepGEMM's figures and cuBLASLt",
    [](CLI::App& sub) -> petrel::cli::command_fn {
      auto opt = std::make_shared<bench_options>();
      petrel::bench::add_kernel_bench_options(sub, *opt, "run only the shapes whose name contains this text");
      sub.add_option("--block-n", opt->block_n, "force Petrel's tile width (64, 128 or 192; default: automatic)")
          ->check(CLI::IsMember({0, 64, 128, 192}));
      sub.add_flag("--serial-promotion", opt->serial_promotion, "promote K blocks one at a time (the first version)");
      return [opt]() -> int {
#ifdef PETREL_HAVE_CUDA
        return petrel::bench::run_on_gpu("bench-kernels", [&] { return run_benchmarks(*opt); });
#else
        (void)opt;
        return petrel::bench::without_cuda("bench-kernels");
#endif
      };
    });

} // namespace
