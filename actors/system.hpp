// The actor-system configuration every Petrel process uses: middleman, Petrel's type IDs and its
// error category, and quiet logging.
#pragma once

#include <caf/actor_system_config.hpp>

namespace petrel {

class petrel_config : public caf::actor_system_config {
public:
  /// `testing`: deterministic scheduler (caf::scheduler::test_coordinator), no middleman.
  explicit petrel_config(bool testing = false);
};

} // namespace petrel
