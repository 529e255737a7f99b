// libFuzzer target: a whole .safetensors file (8-byte length, JSON header, data). The input is written
// to an anonymous memory file (memfd) and opened through /proc/self/fd, so safetensors_file::open runs
// unchanged (mmap included). model_load_error is the expected failure; anything else is a finding.
// Every tensor of an accepted file must lie inside the mapping, and converting it must stay in bounds.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <sys/mman.h>
#include <unistd.h>
#include <vector>

#include "runtime/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  int fd = memfd_create("petrel-fuzz-st", MFD_CLOEXEC);
  if (fd < 0) std::abort();
  size_t off = 0;
  while (off < size) {
    ssize_t n = write(fd, data + off, size - off);
    if (n <= 0) std::abort();
    off += size_t(n);
  }
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  try {
    auto f = petrel::safetensors_file::open(path);
    for (const auto& [name, t] : f->tensors()) {
      if (t.name != name) std::abort();
      for (int64_t d : t.shape)
        if (d < 0) {
          std::fprintf(stderr, "fuzz_safetensors: accepted negative dimension in '%s'\n", name.c_str());
          std::abort();
        }
      if (!t.type) continue;
      const int64_t n = t.numel();
      if (n < 0 || size_t(n) > t.nbytes + 1) {
        std::fprintf(stderr, "fuzz_safetensors: numel %lld vs %zu bytes for '%s'\n", (long long)n, t.nbytes,
                     name.c_str());
        std::abort();
      }
      std::vector<float> out(size_t(n) + 1);
      try {
        petrel::convert_to_f32(t, out.data()); // ASan checks every byte read is inside the mapping
      } catch (const petrel::model_load_error&) {
      }
    }
  } catch (const petrel::model_load_error&) {
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz_safetensors: unexpected exception: %s\n", e.what());
    std::abort();
  }
  close(fd);
  return 0;
}
