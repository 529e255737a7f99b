// The parts of device_memory that need no CUDA, and the no-CUDA build of the rest.
#include <fstream>
#include <stdexcept>
#include <string>

#include "kernels/device_memory.hpp"

namespace petrel::device_memory {

uint64_t host_id() {
  static const uint64_t id = [] {
    std::string s;
    std::ifstream f("/proc/sys/kernel/random/boot_id");
    std::getline(f, s);
    if (s.empty()) {
      std::ifstream h("/proc/sys/kernel/hostname");
      std::getline(h, s);
    }
    uint64_t v = 0xcbf29ce484222325ull; // FNV-1a
    for (unsigned char c : s)
      v = (v ^ c) * 0x100000001b3ull;
    return v;
  }();
  return id;
}

#ifndef PETREL_HAVE_CUDA
namespace {
[[noreturn]] void no_cuda(const char* what) {
  throw std::runtime_error(std::string(what) + ": this build has no CUDA (configure with -DPETREL_CUDA=ON)");
}
} // namespace

bool built_with_cuda() { return false; }
bool is_device(const void*) { return false; }
int device_of(const void*) { return -1; }
void copy_ranges(void*, const void*, const std::vector<copy_range>&) { no_cuda("device copy"); }
void copy(void*, const void*, size_t) { no_cuda("device copy"); }
void* alloc_device(size_t, int) { no_cuda("device memory"); }
void free_device(void*) {}
void* alloc_pinned(size_t) { no_cuda("pinned host memory"); }
void free_pinned(void*) {}
ipc_export export_ipc(const void*) { no_cuda("CUDA IPC export"); }
void* open_ipc(const std::vector<uint8_t>&, int) { no_cuda("CUDA IPC open"); }
void close_ipc(void*) {}
bool crc32c_on_device_fits(uint64_t) { return false; }
std::vector<uint32_t> crc32c_pages(const void*, const std::vector<int32_t>&, uint64_t) { no_cuda("GPU CRC32C"); }
#endif

} // namespace petrel::device_memory
