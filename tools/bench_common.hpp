// What the bench-* subcommands that time CUDA kernels (bench-kernels, bench-mla, bench-rank) share: the error
// type and checks, a device buffer, the median of event-timed launches, the --json writer and the frame that
// turns a missing GPU or an exception into an exit code.
#pragma once

#include <cstddef>
#include <functional>
#include <stdexcept>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#ifdef PETREL_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "kernels/cuda/fp8_layout.hpp" // kernel_status
#endif

namespace petrel::bench {

/// What every kernel benchmark takes; a caller may start from other iters / warmup defaults.
struct kernel_bench_options {
  bool check = false;     // --check: compare every kernel with its fp32 reference first
  std::string json_path;  // --json
  std::string only;       // --only: a subset of the cases (meaning up to the benchmark)
  int iters = 20;         // --iters: timed launches per case, the median is reported
  int warmup = 3;         // --warmup: untimed launches first
};

/// Adds --check, --json, --only (described by only_help) and --iters / --warmup to `sub`; returns --only, for a check.
CLI::Option* add_kernel_bench_options(CLI::App& sub, kernel_bench_options& o, const std::string& only_help);

/// A failed CUDA call or kernel during a benchmark (exit 1).
struct bench_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// Writes `j` (indented) to `path`; an unwritable path throws std::invalid_argument (bad user input: exit 2).
void write_json(const std::string& path, const nlohmann::json& j);

/// "<who>: this build has no CUDA backend ..." on stderr; returns exit_failure.
int without_cuda(const char* who);

#ifdef PETREL_HAVE_CUDA
void ensure(cudaError_t err, const std::string& what);
void ensure(const petrel::cuda::kernel_status& st);

/// Runs `body` when a CUDA device is visible: std::invalid_argument -> exit_bad_input, any other exception ->
/// exit_failure, each with "<who>: <what>" on stderr.
int run_on_gpu(const char* who, const std::function<int()>& body);

/// Median time in microseconds of `launch` on `stream`, each timed run bracketed by events, after `warmup`
/// untimed runs. `before_each` (e.g. an L2 flush) is enqueued before every timed run, outside the events.
double median_us(const std::function<void()>& launch, int warmup, int iters, cudaStream_t stream = nullptr,
                 const std::function<void()>& before_each = {});

/// `count` elements of T in device memory (at least 16 bytes, so that an empty buffer is still a valid pointer).
template <typename T>
struct device_array {
  T* ptr = nullptr;
  std::size_t count = 0;
  explicit device_array(std::size_t n) : count(n) {
    ensure(cudaMalloc(reinterpret_cast<void**>(&ptr), n * sizeof(T) < 16 ? 16 : n * sizeof(T)), "cudaMalloc");
  }
  ~device_array() { cudaFree(ptr); }
  device_array(const device_array&) = delete;
  device_array& operator=(const device_array&) = delete;
  std::size_t bytes() const { return count * sizeof(T); }
};
#endif

} // namespace petrel::bench
