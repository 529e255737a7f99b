#include "actors/messages.hpp"

#include <caf/all.hpp>

namespace petrel {

const char* to_string(petrel_errc code) {
  switch (code) {
    case petrel_errc::none: return "none";
    case petrel_errc::stale_epoch: return "stale_epoch";
    case petrel_errc::no_such_child: return "no_such_child";
    case petrel_errc::escalated: return "escalated";
    case petrel_errc::node_exited: return "node_exited";
    case petrel_errc::node_unreachable: return "node_unreachable";
    case petrel_errc::bad_request: return "bad_request";
    case petrel_errc::overloaded: return "overloaded";
    case petrel_errc::aborted: return "aborted";
    case petrel_errc::migration_limit: return "migration_limit";
    case petrel_errc::kv_transfer_failed: return "kv_transfer_failed";
    case petrel_errc::rank_failed: return "rank_failed";
    case petrel_errc::shutting_down: return "shutting_down";
    case petrel_errc::kv_corrupt: return "kv_corrupt";
  }
  return "unknown";
}

caf::error make_error(petrel_errc code, std::string context) {
  return caf::error(static_cast<uint8_t>(code), caf::atom("petrel"), caf::make_message(std::move(context)));
}

std::string describe(const caf::error& err) {
  if (!err)
    return "ok";
  if (err.category() == caf::atom("petrel")) {
    std::string out = to_string(static_cast<petrel_errc>(err.code()));
    if (!err.context().empty() && err.context().match_elements<std::string>()) {
      out += ": ";
      out += err.context().get_as<std::string>(0);
    }
    return out;
  }
  if (err.category() == caf::atom("exit"))
    return caf::to_string(static_cast<caf::exit_reason>(err.code()));
  if (err.category() == caf::atom("system"))
    return caf::to_string(static_cast<caf::sec>(err.code())) +
           (err.context().empty() ? std::string{} : " " + caf::to_string(err.context()));
  return caf::to_string(err);
}

} // namespace petrel
