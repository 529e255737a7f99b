#include "tools/bench_common.hpp"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <vector>

#include "tools/command.hpp"

namespace petrel::bench {

CLI::Option* add_kernel_bench_options(CLI::App& sub, kernel_bench_options& o, const std::string& only_help) {
  sub.add_flag("--check", o.check, "compare every kernel with its fp32 reference first");
  sub.add_option("--json", o.json_path, "write the results as JSON to this file");
  sub.add_option("--iters", o.iters, "timed launches per case (the median is reported)")->check(CLI::Range(1, 10000));
  sub.add_option("--warmup", o.warmup, "untimed launches first")->check(CLI::Range(0, 1000));
  return sub.add_option("--only", o.only, only_help);
}

void write_json(const std::string& path, const nlohmann::json& j) {
  std::ofstream f(path);
  if (!f) throw std::invalid_argument("cannot write --json file '" + path + "'");
  f << j.dump(2) << "\n";
}

int without_cuda(const char* who) {
  std::fprintf(stderr, "%s: this build has no CUDA backend (configure with -DPETREL_CUDA=ON)\n", who);
  return petrel::cli::exit_failure;
}

#ifdef PETREL_HAVE_CUDA
void ensure(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) throw bench_error(what + ": " + cudaGetErrorString(err));
}

void ensure(const petrel::cuda::kernel_status& st) {
  if (!st.ok()) throw bench_error(st.message);
}

int run_on_gpu(const char* who, const std::function<int()>& body) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "%s: no CUDA device visible\n", who);
    return petrel::cli::exit_failure;
  }
  try {
    return body();
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "%s: %s\n", who, e.what());
    return petrel::cli::exit_bad_input;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", who, e.what());
    return petrel::cli::exit_failure;
  }
}

double median_us(const std::function<void()>& launch, int warmup, int iters, cudaStream_t stream,
                 const std::function<void()>& before_each) {
  cudaEvent_t start, stop;
  ensure(cudaEventCreate(&start), "cudaEventCreate");
  ensure(cudaEventCreate(&stop), "cudaEventCreate");
  for (int i = 0; i < warmup; ++i) launch();
  ensure(cudaStreamSynchronize(stream), "warm-up");
  std::vector<float> times;
  for (int i = 0; i < iters; ++i) {
    if (before_each) before_each();
    ensure(cudaEventRecord(start, stream), "cudaEventRecord");
    launch();
    ensure(cudaEventRecord(stop, stream), "cudaEventRecord");
    ensure(cudaEventSynchronize(stop), "timed launch");
    float ms = 0;
    ensure(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    times.push_back(ms * 1000.0f);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}
#endif

} // namespace petrel::bench
