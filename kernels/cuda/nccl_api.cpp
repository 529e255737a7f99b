#include "kernels/cuda/nccl_api.hpp"

#include <dlfcn.h>

#include <stdexcept>
#include <type_traits>

namespace petrel::cuda {

const nccl_api& nccl_api::get() {
  static const nccl_api api;
  return api;
}

nccl_api::nccl_api() {
  void* lib = nullptr;
  for (const char* name : {"libnccl.so.2", "libnccl.so"})
    if ((lib = dlopen(name, RTLD_NOW | RTLD_LOCAL))) break;
  if (!lib) {
    const char* why = dlerror();
    load_error_ = std::string("cannot dlopen libnccl.so.2 (NCCL is not installed or not on the library path): ") +
                  (why ? why : "");
    return;
  }
  auto bind = [&](auto& fn, const char* name) {
    void* p = dlsym(lib, name);
    if (!p && load_error_.empty()) load_error_ = std::string("the loaded libnccl lacks ") + name;
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(p);
  };
  bind(get_unique_id, "ncclGetUniqueId");
  bind(comm_init_rank, "ncclCommInitRank");
  bind(comm_destroy, "ncclCommDestroy");
  bind(comm_abort, "ncclCommAbort");
  bind(comm_get_async_error, "ncclCommGetAsyncError");
  bind(send, "ncclSend");
  bind(recv, "ncclRecv");
  bind(group_start, "ncclGroupStart");
  bind(group_end, "ncclGroupEnd");
  bind(error_string, "ncclGetErrorString");
  bind(get_version, "ncclGetVersion");
  comm_init_rank_config = reinterpret_cast<decltype(comm_init_rank_config)>(dlsym(lib, "ncclCommInitRankConfig"));
}

void nccl_api::check(ncclResult_t r, const char* op) const {
  // ncclInProgress: a call on a non-blocking communicator that NCCL finishes in the background (callers that need
  // it finished poll ncclCommGetAsyncError).
  if (r != ncclSuccess && r != ncclInProgress)
    throw std::runtime_error(std::string(op) + ": " + (error_string ? error_string(r) : "NCCL error") + " (" +
                             std::to_string(int(r)) + ")");
}

} // namespace petrel::cuda
