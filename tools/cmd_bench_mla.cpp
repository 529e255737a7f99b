// petrel bench-mla: MLA decode over the paged latent cache at batch 64/128/256 x KV 2048/4096 with 128
// heads (and smaller batches, where split-KV matters), and the causal prefill at 4 x 4096 tokens. Each
// decode figure is printed next to FlashMLA's H800 anchors (3,000 GB/s, 660 TFLOPS; ANCHORS.md) and next to
// the HBM bandwidth of a plain copy kernel measured in the same run. CUDA events, warm-up, median.
#include "tools/command.hpp"
#include "tools/bench_common.hpp"

#include <cstdio>
#include <memory>
#include <string>

#ifdef PETREL_HAVE_CUDA
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cuda/mla.hpp"
#include "kernels/cuda/mla_reference.hpp"
#endif

namespace {

using bench_options = petrel::bench::kernel_bench_options;

#ifdef PETREL_HAVE_CUDA
using namespace petrel::cuda;

constexpr double flashmla_gbs = 3000.0;    // ANCHORS.md: FlashMLA, H800, memory-bound
constexpr double flashmla_tflops = 660.0;  // ANCHORS.md: FlashMLA, H800, compute-bound
constexpr double bf16_measured_tflops = 798.0; // ANCHORS.md: 8192^3 bf16 matmul measured on the lent H100

using petrel::bench::device_array;
using petrel::bench::ensure;
using bf16_array = device_array<std::uint16_t>;

double median_ms(const std::function<void()>& launch, int warmup, int iters) {
  return petrel::bench::median_us(launch, warmup, iters) / 1e3;
}

float bf16_to_float(std::uint16_t b) {
  const std::uint32_t bits = static_cast<std::uint32_t>(b) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

// ‖out − ref‖ / ‖ref‖, with any non-finite output counted as a failure.
double rel_l2(const void* out_bf16, const float* ref, std::size_t n, std::size_t* non_finite) {
  std::vector<std::uint16_t> out(n);
  std::vector<float> r(n);
  ensure(cudaMemcpy(out.data(), out_bf16, n * 2, cudaMemcpyDeviceToHost), "download");
  ensure(cudaMemcpy(r.data(), ref, n * 4, cudaMemcpyDeviceToHost), "download");
  double e2 = 0, r2 = 0;
  *non_finite = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double x = bf16_to_float(out[i]);
    if (!std::isfinite(x)) { ++*non_finite; continue; }
    e2 += (x - r[i]) * (x - r[i]);
    r2 += static_cast<double>(r[i]) * r[i];
  }
  return r2 > 0 ? std::sqrt(e2 / r2) : std::sqrt(e2);
}

// A kernel's bf16 output against its fp32 reference: passes below 1e-2 relative L2 with every value finite.
// *text = "ok 1.8e-03" or "FAIL ...".
bool check_against(const bf16_array& out, const device_array<float>& ref, double* rel, std::string* text) {
  std::size_t bad = 0;
  *rel = rel_l2(out.ptr, ref.ptr, ref.count, &bad);
  const bool ok = bad == 0 && *rel < 1e-2;
  char buf[64];
  std::snprintf(buf, sizeof buf, "%s %.1e", ok ? "ok" : "FAIL", *rel);
  *text = buf;
  return ok;
}

double measure_hbm_gbs(const bench_options& opt, nlohmann::json& out) {
  const std::size_t bytes = std::size_t(1) << 30;
  device_array<std::uint8_t> a(bytes), b(bytes);
  ensure(cudaMemset(a.ptr, 1, bytes), "cudaMemset");
  const double ms_kernel = median_ms([&] { ensure(mla_bench_copy(b.ptr, a.ptr, bytes, nullptr)); }, opt.warmup, opt.iters);
  const double ms_memcpy = median_ms([&] { ensure(cudaMemcpyAsync(b.ptr, a.ptr, bytes, cudaMemcpyDeviceToDevice, nullptr), "memcpy"); },
                                     opt.warmup, opt.iters);
  const double gbs_kernel = 2.0 * bytes / (ms_kernel * 1e6), gbs_memcpy = 2.0 * bytes / (ms_memcpy * 1e6);
  std::printf("HBM copy 1 GiB (read + write counted): copy kernel %.0f GB/s, cudaMemcpy D2D %.0f GB/s\n", gbs_kernel, gbs_memcpy);
  out["hbm_copy_kernel_gbs"] = gbs_kernel;
  out["hbm_memcpy_gbs"] = gbs_memcpy;
  return std::max(gbs_kernel, gbs_memcpy);
}

bool bench_decode(const bench_options& opt, double hbm_gbs, nlohmann::json& out) {
  constexpr int heads = 128;
  const float scale = 0.1352f; // DeepSeek-V3's 192^-0.5 x YaRN mscale^2 (about 1.87)
  bool all_ok = true;
  std::printf("\nMLA decode, 128 heads, paged bf16 latent cache (576 / 512), pages shuffled; anchors: FlashMLA H800 "
              "%.0f GB/s, %.0f TFLOPS\n", flashmla_gbs, flashmla_tflops);
  std::printf("%6s %6s %7s %10s %9s %8s %9s %8s %8s %8s\n", "batch", "kv", "splits", "time_us", "GB/s", "TFLOPS",
              "vsHBM", "vs3000", "vs660", "check");
  struct shape { int batch, kv; };
  const std::vector<shape> shapes = {{64, 2048}, {64, 4096}, {128, 2048}, {128, 4096}, {256, 2048}, {256, 4096},
                                     {1, 4096},  {8, 4096},  {32, 4096}};
  for (const auto& sh : shapes) {
    const int pages_per_seq = (sh.kv + mla_page_size - 1) / mla_page_size;
    const std::size_t num_pages = static_cast<std::size_t>(sh.batch) * pages_per_seq;
    bf16_array q(static_cast<std::size_t>(sh.batch) * heads * mla_qk_dim), kv(num_pages * mla_page_size * mla_qk_dim),
        o(static_cast<std::size_t>(sh.batch) * heads * mla_latent_dim);
    device_array<int> table(num_pages), lens(sh.batch);
    ensure(mla_fill_random_bf16(q.ptr, q.count, 1 + sh.batch, 1.0f, nullptr));
    ensure(mla_fill_random_bf16(kv.ptr, kv.count, 2 + sh.kv, 1.0f, nullptr));
    std::vector<int> host_table(num_pages);
    std::iota(host_table.begin(), host_table.end(), 0);
    std::shuffle(host_table.begin(), host_table.end(), std::mt19937(sh.batch * 7 + sh.kv));
    ensure(cudaMemcpy(table.ptr, host_table.data(), table.bytes(), cudaMemcpyHostToDevice), "upload");
    std::vector<int> host_lens(sh.batch, sh.kv);
    ensure(cudaMemcpy(lens.ptr, host_lens.data(), lens.bytes(), cudaMemcpyHostToDevice), "upload");
    const std::size_t ws_bytes = mla_decode_workspace_bytes(sh.batch, heads, sh.kv);
    device_array<std::uint8_t> ws(ws_bytes);
    const int splits = ws_bytes == 0 ? 1 : static_cast<int>(ws_bytes / (static_cast<std::size_t>(sh.batch) * heads * (mla_latent_dim + 1) * 4));
    auto launch = [&] {
      ensure(mla_decode_bf16(q.ptr, kv.ptr, table.ptr, pages_per_seq, lens.ptr, sh.batch, heads, sh.kv, scale,
                             o.ptr, ws.ptr, ws_bytes, nullptr));
    };
    std::string check = "-";
    nlohmann::json row;
    if (opt.check) {
      ensure(cudaMemset(o.ptr, 0xFF, o.bytes()), "poison");
      launch();
      device_array<float> ref(o.count);
      ensure(mla_decode_reference_f32(q.ptr, kv.ptr, table.ptr, pages_per_seq, lens.ptr, sh.batch, heads, sh.kv,
                                      scale, ref.ptr, nullptr));
      ensure(cudaDeviceSynchronize(), "decode check");
      double rel = 0;
      all_ok = check_against(o, ref, &rel, &check) && all_ok;
      row["rel_l2"] = rel;
    }
    const double ms = median_ms(launch, opt.warmup, opt.iters);
    const double bytes = static_cast<double>(sh.batch) * sh.kv * mla_qk_dim * 2 + q.bytes() + o.bytes();
    const double flops = 2.0 * sh.batch * heads * sh.kv * (mla_qk_dim + mla_latent_dim);
    const double gbs = bytes / (ms * 1e6), tflops = flops / (ms * 1e9);
    std::printf("%6d %6d %7d %10.1f %9.0f %8.1f %8.2f %8.2f %8.2f %8s\n", sh.batch, sh.kv, splits, ms * 1e3,
                gbs, tflops, gbs / hbm_gbs, gbs / flashmla_gbs, tflops / flashmla_tflops, check.c_str());
    row.update({{"batch", sh.batch}, {"kv", sh.kv}, {"heads", heads}, {"splits", splits}, {"time_us", ms * 1e3},
                {"gbs", gbs}, {"tflops", tflops}, {"ratio_hbm", gbs / hbm_gbs}, {"ratio_flashmla_gbs", gbs / flashmla_gbs},
                {"ratio_flashmla_tflops", tflops / flashmla_tflops}});
    out["decode"].push_back(row);
  }
  return all_ok;
}

bool bench_prefill(const bench_options& opt, nlohmann::json& out) {
  const int seqs = 4, len = 4096;
  const float scale = 0.1352f;
  bool all_ok = true;
  std::printf("\nMLA prefill (naive form, causal), %d x %d tokens; FLOPs count visible (query, key) pairs only, "
              "2 x (192 + 128) each; vs the measured bf16 matmul ceiling %.0f TFLOPS (ANCHORS.md)\n", seqs, len, bf16_measured_tflops);
  std::printf("%6s %6s %10s %8s %10s %8s\n", "heads", "tokens", "time_ms", "TFLOPS", "vs798", "check");
  std::vector<int> cu(seqs + 1);
  for (int s = 0; s <= seqs; ++s) cu[s] = s * len;
  device_array<int> cu_dev(cu.size());
  ensure(cudaMemcpy(cu_dev.ptr, cu.data(), cu_dev.bytes(), cudaMemcpyHostToDevice), "upload");
  for (int heads : {4, 128}) {
    const bool timed = heads == 128;
    if (!timed && !opt.check) continue;
    const std::size_t tokens = static_cast<std::size_t>(seqs) * len;
    bf16_array q(tokens * heads * mla_prefill_qk_dim), k(tokens * heads * mla_prefill_qk_dim),
        v(tokens * heads * mla_prefill_v_dim), o(tokens * heads * mla_prefill_v_dim);
    ensure(mla_fill_random_bf16(q.ptr, q.count, 11, 1.0f, nullptr));
    ensure(mla_fill_random_bf16(k.ptr, k.count, 12, 1.0f, nullptr));
    ensure(mla_fill_random_bf16(v.ptr, v.count, 13, 1.0f, nullptr));
    auto launch = [&] {
      ensure(mla_prefill_bf16(q.ptr, k.ptr, v.ptr, cu_dev.ptr, cu_dev.ptr, seqs, len, len, heads, scale, o.ptr, nullptr));
    };
    std::string check = "-";
    nlohmann::json row;
    if (!timed) { // correctness at the real lengths with few heads (the fp32 reference is slow)
      ensure(cudaMemset(o.ptr, 0xFF, o.bytes()), "poison");
      launch();
      device_array<float> ref(o.count);
      ensure(mla_prefill_reference_f32(q.ptr, k.ptr, v.ptr, cu_dev.ptr, cu_dev.ptr, seqs, len, len, heads, scale,
                                       ref.ptr, nullptr));
      ensure(cudaDeviceSynchronize(), "prefill check");
      double rel = 0;
      const bool ok = check_against(o, ref, &rel, &check);
      all_ok = all_ok && ok;
      std::printf("%6d %6zu %10s %8s %10s %8s\n", heads, tokens, "-", "-", "-", check.c_str());
      out["prefill_check"] = {{"heads", heads}, {"rel_l2", rel}, {"ok", ok}};
      continue;
    }
    const double ms = median_ms(launch, opt.warmup, std::max(5, opt.iters / 3));
    const double pairs = static_cast<double>(seqs) * len * (len + 1) / 2.0;
    const double flops = 2.0 * heads * pairs * (mla_prefill_qk_dim + mla_prefill_v_dim);
    const double tflops = flops / (ms * 1e9);
    std::printf("%6d %6zu %10.2f %8.1f %10.2f %8s\n", heads, tokens, ms, tflops, tflops / bf16_measured_tflops, check.c_str());
    row.update({{"heads", heads}, {"seqs", seqs}, {"len", len}, {"time_ms", ms}, {"tflops", tflops},
                {"ratio_bf16_measured", tflops / bf16_measured_tflops}});
    out["prefill"].push_back(row);
  }
  return all_ok;
}

int run_mla_benchmarks(const bench_options& opt) {
  cudaDeviceProp prop{};
  ensure(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("device: %s, %d SMs, L2 %d MiB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  nlohmann::json out;
  out["device"] = prop.name;
  const double hbm = measure_hbm_gbs(opt, out);
  bool ok = true;
  if (opt.only.empty() || opt.only == "decode") ok = bench_decode(opt, hbm, out) && ok;
  if (opt.only.empty() || opt.only == "prefill") ok = bench_prefill(opt, out) && ok;
  if (!opt.json_path.empty()) petrel::bench::write_json(opt.json_path, out);
  if (opt.check && !ok) {
    std::fprintf(stderr, "bench-mla: a kernel failed its check against the fp32 reference\n");
    return 1;
  }
  return 0;
}
#endif // PETREL_HAVE_CUDA

const bool registered = petrel::cli::register_command(
    "bench-mla", "benchmark the MLA decode and prefill kernels against FlashMLA's figures and the measured HBM bandwidth",
    [](CLI::App& sub) -> petrel::cli::command_fn {
      auto opt = std::make_shared<bench_options>();
      opt->iters = 30;
      opt->warmup = 5;
      petrel::bench::add_kernel_bench_options(sub, *opt, "decode or prefill")->check(CLI::IsMember({"", "decode", "prefill"}));
      return [opt]() -> int {
#ifdef PETREL_HAVE_CUDA
        return petrel::bench::run_on_gpu("bench-mla", [&] { return run_mla_benchmarks(*opt); });
#else
        (void)opt;
        return petrel::bench::without_cuda("bench-mla");
#endif
      };
    });

} // namespace
