// Who may join a cluster: the CAF links between the head, the node processes and the CLI clients
// run over TLS (caf-openssl), and every peer must present a certificate signed by the cluster's CA.
//
// CAF 0.17's openssl module takes certificate, key and CA files and nothing else (no pre-shared
// keys), so the cluster secret is turned into a CA: every process derives the same Ed25519 CA key
// from the secret (HMAC-SHA256), rebuilds the same self-signed CA certificate (fixed fields, and
// Ed25519 signatures are deterministic), then makes itself a fresh leaf key and certificate signed by
// that CA. Peers verify each other against the CA. A process without the secret cannot make a
// certificate the cluster accepts, so it can neither join nor send a message. The PEM files live in
// memfds (/proc/self/fd/N): no key material of a process touches the disk.
//
// docs/reliability.md ("Who may join") has the design and the threat model.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "runtime/cluster_config.hpp"

namespace petrel {

/// The secret's file for `cfg`: security.secret_file, or RUN_DIR/CLUSTER/secret (made by the head).
std::string cluster_secret_path(const cluster_config& cfg);

/// The head, at launch, without security.secret_file: writes 32 fresh random bytes (hex) to
/// RUN_DIR/CLUSTER/secret, mode 0600, replacing an older one. Throws config_error.
void create_cluster_secret(const cluster_config& cfg);

/// Reads the cluster secret at `path`. Refuses (config_error naming the file and the fix) a missing
/// file, one shorter than 16 bytes, one another user owns, or one that group or others may read.
/// `generated`: the head made it (the hint for a missing file differs).
std::string read_cluster_secret(const std::string& path, bool generated);

/// A process's TLS identity: the cluster CA and a leaf certificate + key of its own, as PEM files in
/// memfds. Paths stay valid as long as this object lives (CAF reads them for every new connection).
class tls_identity {
public:
  ~tls_identity();
  tls_identity(const tls_identity&) = delete;
  tls_identity& operator=(const tls_identity&) = delete;

  const std::string& ca_path() const { return ca_path_; }
  const std::string& certificate_path() const { return cert_path_; }
  const std::string& key_path() const { return key_path_; }
  /// SHA-256 of the CA certificate (hex): equal on every process that holds the same secret.
  const std::string& ca_fingerprint() const { return ca_fingerprint_; }

  /// Derives the CA from `secret` and issues a leaf named "petrel <cluster> <role>". Throws
  /// std::runtime_error with OpenSSL's reason when a step fails.
  static std::unique_ptr<tls_identity> make(const std::string& secret, const std::string& cluster,
                                            const std::string& role);

private:
  tls_identity() = default;
  int fds_[3] = {-1, -1, -1};
  std::string ca_path_, cert_path_, key_path_, ca_fingerprint_;
};

/// Names this process in refusal log lines ("head", "node d0").
void set_tls_endpoint_name(const std::string& name);

/// TLS handshakes this process refused as a server (no certificate, a certificate of another CA,
/// plain CAF, garbage, a connection dropped mid-handshake). Each refusal is also logged to stderr
/// (the first 20, then every 100th) with the peer's address and OpenSSL's reason, and counted in
/// the metric petrel_cluster_connections_refused_total.
uint64_t tls_refused_count();

} // namespace petrel
