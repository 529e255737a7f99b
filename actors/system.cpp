#include "actors/system.hpp"

#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <caf/openssl/manager.hpp>

#include "actors/cluster_tls.hpp"
#include "actors/messages.hpp"

namespace petrel {

petrel_config::petrel_config(bool testing) {
  add_message_types<caf::id_block::petrel>();
  // Vectors of Petrel types travel inside status replies; CAF needs them named too.
  add_message_type<std::vector<child_status>>("petrel.child_status_list");
  add_message_type<std::vector<node_status>>("petrel.node_status_list");
  add_message_type<std::vector<group_load>>("petrel.group_load_list");
  add_error_category(caf::atom("petrel"), [](uint8_t code, caf::atom_value, const caf::message& ctx) {
    std::string out = std::string("petrel.") + to_string(static_cast<petrel_errc>(code));
    if (ctx.match_elements<std::string>())
      out += ": " + ctx.get_as<std::string>(0);
    return out;
  });
  set("logger.file-verbosity", caf::atom("quiet"));
  set("logger.console-verbosity", caf::atom("quiet"));
  if (testing) {
    set("scheduler.policy", caf::atom("testing"));
  } else {
    load<caf::io::middleman>();
    set("scheduler.max-threads", size_t{2});
    set("middleman.heartbeat-interval", caf::timespan{std::chrono::milliseconds(250)});
  }
}

void petrel_config::use_tls(const tls_identity& id) {
  // Setting any of these switches caf-openssl to authenticated mode: TLS with peer verification
  // (SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT) against the CA file, on both sides.
  openssl_certificate = id.certificate_path();
  openssl_key = id.key_path();
  openssl_cafile = id.ca_path();
  load<caf::openssl::manager>();
}

} // namespace petrel
