// make_backend: the one place that knows which backends are built in.
#include <stdexcept>

#include "kernels/cpu/cpu_backend.hpp"
#include "runtime/backend.hpp"

namespace petrel {

std::unique_ptr<backend> make_backend(const std::string& name) {
  if (name == "cpu") return std::make_unique<kernels::cpu_backend>();
  if (name == "cuda")
    throw std::invalid_argument("backend 'cuda' is not implemented in this build yet (use --backend cpu)");
  throw std::invalid_argument("unknown backend '" + name + "' (known: cpu)");
}

} // namespace petrel
