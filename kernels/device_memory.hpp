// Device memory as the KV transfer engine and the kv_agent see it: find out whether a pointer is GPU memory,
// copy between host and device (or device and device, peers included), pinned host buffers, and CUDA IPC
// handles that let another process on the same host map a GPU allocation.
//
// No CUDA types here: transport/ and actors/ include this header whether or not the build has CUDA. Without
// CUDA, is_device() is false for every pointer and the other functions throw std::runtime_error.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace petrel::device_memory {

/// Whether this build can touch GPU memory at all (the CUDA backend is compiled in).
bool built_with_cuda();

/// True when `p` points into a CUDA device allocation. On a machine without GPUs: false, without error.
bool is_device(const void* p);

/// The device ordinal of a device pointer (-1 for host memory).
int device_of(const void* p);

/// One contiguous copy: `length` bytes from src_base + src_offset to dst_base + dst_offset.
struct copy_range {
  uint64_t src_offset = 0;
  uint64_t dst_offset = 0;
  uint64_t length = 0;
};

/// Copies every range (host<->device, device<->device across peers) on the calling thread's stream, then waits
/// until all of them landed. Throws std::runtime_error with CUDA's reason.
void copy_ranges(void* dst_base, const void* src_base, const std::vector<copy_range>& ranges);

/// Synchronous copy of n bytes in any direction.
void copy(void* dst, const void* src, size_t n);

/// n bytes of device memory on GPU `device` (its own cudaMalloc allocation, zeroed); free with free_device.
void* alloc_device(size_t n, int device);
void free_device(void* p);

/// Page-locked host memory (visible to every device), zeroed; free with free_pinned.
void* alloc_pinned(size_t n);
void free_pinned(void* p);

/// An exported GPU allocation: the opaque CUDA IPC handle (64 bytes) and the device it lives on. `p` must be the
/// start of a cudaMalloc allocation (the cuda backend's allocator hands those out for KV pools).
struct ipc_export {
  std::vector<uint8_t> handle;
  int device = -1;
};
ipc_export export_ipc(const void* p);

/// Maps a handle exported by ANOTHER process of this host (CUDA refuses a process's own handles). Returns the
/// mapped address; throws std::runtime_error when CUDA cannot open it (other host, other container, bad bytes).
void* open_ipc(const std::vector<uint8_t>& handle, int device);
void close_ipc(void* mapped);

/// CRC32C of pages `pages` (each `page_bytes` long, page p at base + p * page_bytes) of a GPU pool, computed on
/// its GPU: equal to kv_page_crc32c of the same bytes. Needs crc32c_on_device_fits(page_bytes); throws otherwise
/// or on a CUDA error.
bool crc32c_on_device_fits(uint64_t page_bytes);
std::vector<uint32_t> crc32c_pages(const void* base, const std::vector<int32_t>& pages, uint64_t page_bytes);

/// Identity of this machine's kernel (boot id): equal ids on two processes mean one host, where CUDA IPC may work.
uint64_t host_id();

} // namespace petrel::device_memory
