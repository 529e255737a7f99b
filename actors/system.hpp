// The actor-system configuration every Petrel process uses: middleman, Petrel's type IDs and its
// error category, quiet logging, and TLS on the cluster links (actors/cluster_tls.hpp).
#pragma once

#include <cstdint>
#include <string>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/expected.hpp>
#include <caf/io/middleman.hpp>
#include <caf/openssl/publish.hpp>
#include <caf/openssl/remote_actor.hpp>

namespace petrel {

class tls_identity;

class petrel_config : public caf::actor_system_config {
public:
  /// `testing`: deterministic scheduler (caf::scheduler::test_coordinator), no middleman.
  explicit petrel_config(bool testing = false);

  /// Loads caf-openssl and requires every peer to present a certificate of `id`'s CA; this process
  /// shows `id`'s own certificate. `id` must outlive the actor system built from this config.
  void use_tls(const tls_identity& id);
};

/// Publishes `whom` on a cluster port: over TLS when the system loaded caf-openssl (use_tls).
template <class Handle>
caf::expected<uint16_t> publish_cluster_port(const Handle& whom, uint16_t port, const std::string& host) {
  auto& sys = whom.home_system();
  if (sys.has_openssl_manager())
    return caf::openssl::publish(whom, port, host.c_str(), true);
  return sys.middleman().publish(whom, port, host.c_str(), true);
}

/// Connects to the actor published on a cluster port: over TLS when the system loaded caf-openssl.
template <class Handle>
caf::expected<Handle> connect_cluster_port(caf::actor_system& sys, const std::string& host, uint16_t port) {
  if (sys.has_openssl_manager())
    return caf::openssl::remote_actor<Handle>(sys, host, port);
  return sys.middleman().remote_actor<Handle>(host, port);
}

} // namespace petrel
