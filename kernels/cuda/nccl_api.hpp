// NCCL, opened at run time. Nothing links libnccl: a build machine with only Debian's packages has no NCCL, and
// the device machine's copy comes with PyTorch. nccl_api::get() dlopens libnccl.so.2 once per process and resolves
// the few entry points Petrel calls; ok() says whether that worked and load_error() why not.
#pragma once

#include <string>

#include <cuda_runtime_api.h>
#include <nccl.h>

namespace petrel::cuda {

class nccl_api {
public:
  /// The process's one instance (thread-safe first use).
  static const nccl_api& get();

  bool ok() const { return load_error_.empty(); }
  const std::string& load_error() const { return load_error_; }
  /// Throws std::runtime_error "<op>: <NCCL's message>" unless r is ncclSuccess or ncclInProgress.
  void check(ncclResult_t r, const char* op) const;

  ncclResult_t (*get_unique_id)(ncclUniqueId*) = nullptr;
  ncclResult_t (*comm_init_rank)(ncclComm_t*, int, ncclUniqueId, int) = nullptr;
  ncclResult_t (*comm_destroy)(ncclComm_t) = nullptr;
  ncclResult_t (*comm_abort)(ncclComm_t) = nullptr;
  ncclResult_t (*comm_get_async_error)(ncclComm_t, ncclResult_t*) = nullptr;
  ncclResult_t (*send)(const void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t) = nullptr;
  ncclResult_t (*recv)(void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t) = nullptr;
  ncclResult_t (*group_start)() = nullptr;
  ncclResult_t (*group_end)() = nullptr;
  const char* (*error_string)(ncclResult_t) = nullptr;
  ncclResult_t (*get_version)(int*) = nullptr;
  /// Optional (NCCL >= 2.14): non-blocking communicator creation. nullptr when the library lacks it.
  ncclResult_t (*comm_init_rank_config)(ncclComm_t*, int, ncclUniqueId, int, ncclConfig_t*) = nullptr;

private:
  nccl_api();
  std::string load_error_;
};

} // namespace petrel::cuda
