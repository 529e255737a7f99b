#include "actors/cluster_tls.hpp"

#include <arpa/inet.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <mutex>
#include <stdexcept>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "runtime/metrics.hpp"

namespace petrel {

namespace fs = std::filesystem;

// -- the secret ----------------------------------------------------------------------------------

std::string cluster_secret_path(const cluster_config& cfg) {
  if (!cfg.security.secret_file.empty())
    return cfg.security.secret_file;
  return (fs::path(cfg.cluster.run_dir) / cfg.cluster.name / "secret").string();
}

void create_cluster_secret(const cluster_config& cfg) {
  auto path = cluster_secret_path(cfg);
  std::error_code ec;
  fs::create_directories(fs::path(path).parent_path(), ec);
  unsigned char bytes[32];
  if (RAND_bytes(bytes, sizeof(bytes)) != 1)
    throw config_error(cfg.source + ": cannot draw random bytes for the cluster secret");
  static const char* digits = "0123456789abcdef";
  std::string hex;
  for (unsigned char b : bytes) {
    hex += digits[b >> 4];
    hex += digits[b & 15];
  }
  hex += "\n";
  // Unlink, then create exclusively and without following links: a file or link someone else
  // planted at this path is never written through, and the new file is born 0600.
  ::unlink(path.c_str());
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0)
    throw config_error(cfg.source + ": cannot create the cluster secret " + path + ": " + std::strerror(errno) +
                       " (cluster.run_dir must be writable, or set security.secret_file)");
  bool ok = ::write(fd, hex.data(), hex.size()) == static_cast<ssize_t>(hex.size());
  ::close(fd);
  if (!ok)
    throw config_error(cfg.source + ": cannot write the cluster secret " + path);
}

std::string read_cluster_secret(const std::string& path, bool generated) {
  std::string where = "security: ";
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    throw config_error(where + "cannot read the cluster secret " + path + ": " + std::strerror(errno) +
                       (generated ? " (the head writes it at launch; is the cluster running?)"
                                  : " (create it, e.g. `head -c 32 /dev/urandom | xxd -p -c 64 > " + path +
                                        " && chmod 600 " + path + "`)"));
  struct stat st {};
  ::fstat(fd, &st);
  if (!S_ISREG(st.st_mode) || st.st_uid != ::geteuid() || (st.st_mode & 077) != 0) {
    ::close(fd);
    throw config_error(where + "the cluster secret " + path +
                       " must be a regular file owned by this user and readable by nobody else (chmod 600 " + path +
                       ")");
  }
  std::string text;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof(buf))) > 0 && text.size() < (1u << 20))
    text.append(buf, static_cast<size_t>(n));
  ::close(fd);
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back())))
    text.pop_back();
  if (text.size() < 16)
    throw config_error(where + "the cluster secret " + path + " has " + std::to_string(text.size()) +
                       " bytes; it needs at least 16 (32 random bytes in hex is the norm)");
  return text;
}

// -- certificates ----------------------------------------------------------------------------------

namespace {

[[noreturn]] void throw_ssl(const std::string& what) {
  std::string reason;
  while (auto e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    reason += reason.empty() ? "" : "; ";
    reason += buf;
  }
  throw std::runtime_error("TLS identity: " + what + (reason.empty() ? "" : ": " + reason));
}

template <class T, void (*Free)(T*)>
struct ssl_ptr {
  T* p = nullptr;
  explicit ssl_ptr(T* x) : p(x) {}
  ~ssl_ptr() {
    if (p)
      Free(p);
  }
  ssl_ptr(const ssl_ptr&) = delete;
  ssl_ptr& operator=(const ssl_ptr&) = delete;
  T* get() const { return p; }
};

using pkey_ptr = ssl_ptr<EVP_PKEY, EVP_PKEY_free>;
using x509_ptr = ssl_ptr<X509, X509_free>;
using bio_ptr = ssl_ptr<BIO, BIO_free_all>;

void add_extension(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
  if (!ext || X509_add_ext(cert, ext, -1) != 1) {
    if (ext)
      X509_EXTENSION_free(ext);
    throw_ssl(std::string("cannot add extension ") + OBJ_nid2sn(nid));
  }
  X509_EXTENSION_free(ext);
}

void set_common_name(X509_NAME* name, std::string cn) {
  if (cn.size() > 64) // the X.509 upper bound of a CN
    cn.resize(64);
  if (X509_NAME_add_entry_by_txt(name, "O", MBSTRING_UTF8, reinterpret_cast<const unsigned char*>("Petrel"), -1, -1,
                                 0) != 1 ||
      X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, reinterpret_cast<const unsigned char*>(cn.c_str()), -1,
                                 -1, 0) != 1)
    throw_ssl("cannot set a certificate name");
}

std::string pem_of(X509* cert) {
  bio_ptr bio(BIO_new(BIO_s_mem()));
  if (!bio.get() || PEM_write_bio_X509(bio.get(), cert) != 1)
    throw_ssl("cannot encode a certificate");
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(len));
}

std::string pem_of(EVP_PKEY* key) {
  bio_ptr bio(BIO_new(BIO_s_mem()));
  if (!bio.get() || PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr) != 1)
    throw_ssl("cannot encode a private key");
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(len));
}

/// A memfd holding `content`; its /proc path is readable by this process only.
int memfd_with(const char* name, const std::string& content) {
  int fd = ::memfd_create(name, MFD_CLOEXEC);
  if (fd < 0)
    throw std::runtime_error(std::string("TLS identity: memfd_create failed: ") + std::strerror(errno));
  size_t off = 0;
  while (off < content.size()) {
    auto n = ::write(fd, content.data() + off, content.size() - off);
    if (n <= 0) {
      ::close(fd);
      throw std::runtime_error("TLS identity: cannot write a memfd");
    }
    off += static_cast<size_t>(n);
  }
  return fd;
}

} // namespace

tls_identity::~tls_identity() {
  for (int fd : fds_)
    if (fd >= 0)
      ::close(fd);
}

std::unique_ptr<tls_identity> tls_identity::make(const std::string& secret, const std::string& cluster,
                                                 const std::string& role) {
  // The CA key: an Ed25519 seed derived from the secret, bound to the cluster's name so that two
  // clusters sharing a secret file still cannot join each other.
  std::string label = "petrel cluster CA v1/" + cluster;
  unsigned char seed[EVP_MAX_MD_SIZE];
  unsigned int seed_len = 0;
  if (!HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()),
            reinterpret_cast<const unsigned char*>(label.data()), label.size(), seed, &seed_len) ||
      seed_len < 32)
    throw_ssl("cannot derive the CA key");
  pkey_ptr ca_key(EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr, seed, 32));
  OPENSSL_cleanse(seed, sizeof(seed));
  if (!ca_key.get())
    throw_ssl("cannot make the CA key");

  // The CA certificate: every field fixed, so that every holder of the secret builds the same bytes.
  x509_ptr ca(X509_new());
  if (!ca.get() || X509_set_version(ca.get(), 2) != 1 || ASN1_INTEGER_set(X509_get_serialNumber(ca.get()), 1) != 1 ||
      ASN1_TIME_set_string_X509(X509_getm_notBefore(ca.get()), "20200101000000Z") != 1 ||
      ASN1_TIME_set_string_X509(X509_getm_notAfter(ca.get()), "21200101000000Z") != 1)
    throw_ssl("cannot fill the CA certificate");
  set_common_name(X509_get_subject_name(ca.get()), "petrel cluster CA " + cluster);
  if (X509_set_issuer_name(ca.get(), X509_get_subject_name(ca.get())) != 1 ||
      X509_set_pubkey(ca.get(), ca_key.get()) != 1)
    throw_ssl("cannot fill the CA certificate");
  add_extension(ca.get(), ca.get(), NID_basic_constraints, "critical,CA:TRUE,pathlen:0");
  add_extension(ca.get(), ca.get(), NID_key_usage, "critical,keyCertSign,cRLSign");
  add_extension(ca.get(), ca.get(), NID_subject_key_identifier, "hash");
  if (X509_sign(ca.get(), ca_key.get(), nullptr) <= 0) // Ed25519 signs without a separate digest
    throw_ssl("cannot sign the CA certificate");

  // This process's own key and certificate.
  pkey_ptr key(EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519"));
  if (!key.get())
    throw_ssl("cannot make a key");
  x509_ptr leaf(X509_new());
  uint64_t serial = 0;
  if (RAND_bytes(reinterpret_cast<unsigned char*>(&serial), sizeof(serial)) != 1)
    throw_ssl("cannot draw a serial number");
  serial = (serial >> 2) | 2; // positive and never the CA's 1
  if (!leaf.get() || X509_set_version(leaf.get(), 2) != 1 ||
      ASN1_INTEGER_set_uint64(X509_get_serialNumber(leaf.get()), serial) != 1 ||
      !X509_gmtime_adj(X509_getm_notBefore(leaf.get()), -24 * 3600) ||
      !X509_gmtime_adj(X509_getm_notAfter(leaf.get()), 3650L * 24 * 3600))
    throw_ssl("cannot fill the certificate");
  set_common_name(X509_get_subject_name(leaf.get()), "petrel " + cluster + " " + role);
  if (X509_set_issuer_name(leaf.get(), X509_get_subject_name(ca.get())) != 1 ||
      X509_set_pubkey(leaf.get(), key.get()) != 1)
    throw_ssl("cannot fill the certificate");
  add_extension(leaf.get(), ca.get(), NID_basic_constraints, "critical,CA:FALSE");
  add_extension(leaf.get(), ca.get(), NID_key_usage, "critical,digitalSignature");
  add_extension(leaf.get(), ca.get(), NID_ext_key_usage, "serverAuth,clientAuth");
  add_extension(leaf.get(), ca.get(), NID_authority_key_identifier, "keyid:always");
  if (X509_sign(leaf.get(), ca_key.get(), nullptr) <= 0)
    throw_ssl("cannot sign the certificate");

  std::unique_ptr<tls_identity> id(new tls_identity);
  id->fds_[0] = memfd_with("petrel-tls-ca", pem_of(ca.get()));
  id->fds_[1] = memfd_with("petrel-tls-cert", pem_of(leaf.get()));
  id->fds_[2] = memfd_with("petrel-tls-key", pem_of(key.get()));
  auto proc = [](int fd) { return "/proc/" + std::to_string(::getpid()) + "/fd/" + std::to_string(fd); };
  id->ca_path_ = proc(id->fds_[0]);
  id->cert_path_ = proc(id->fds_[1]);
  id->key_path_ = proc(id->fds_[2]);
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int md_len = 0;
  if (X509_digest(ca.get(), EVP_sha256(), md, &md_len) != 1)
    throw_ssl("cannot fingerprint the CA");
  static const char* digits = "0123456789abcdef";
  for (unsigned i = 0; i < md_len; ++i) {
    id->ca_fingerprint_ += digits[md[i] >> 4];
    id->ca_fingerprint_ += digits[md[i] & 15];
  }
  return id;
}

// -- refused handshakes --------------------------------------------------------------------------

namespace {

std::atomic<uint64_t> refused{0};

metrics::counter& refused_counter() {
  static auto& counter = metrics::global_registry()
                             .add_counter("petrel_cluster_connections_refused_total",
                                          "Connections to this process's cluster port refused during the TLS "
                                          "handshake (no certificate of this cluster's CA)",
                                          {})
                             .with({});
  return counter;
}

std::mutex name_mutex;
std::string endpoint_name = "petrel"; // guarded by name_mutex

/// The peer's address, remembered on the session at its first handshake step (by the time a
/// handshake fails the peer may have hung up, and getpeername() no longer knows it).
std::string peer_of(SSL* ssl);

int peer_index() {
  static const int index = SSL_get_ex_new_index(
      0, nullptr, nullptr, nullptr,
      [](void*, void* ptr, CRYPTO_EX_DATA*, int, long, void*) { delete static_cast<std::string*>(ptr); });
  return index;
}

void remember_peer(SSL* ssl) {
  int index = peer_index();
  if (index >= 0 && !SSL_get_ex_data(ssl, index))
    SSL_set_ex_data(ssl, index, new std::string(peer_of(ssl)));
}

std::string remembered_peer(SSL* ssl) {
  int index = peer_index();
  if (auto* p = index >= 0 ? static_cast<std::string*>(SSL_get_ex_data(ssl, index)) : nullptr)
    return *p;
  return peer_of(ssl);
}

std::string peer_of(SSL* ssl) {
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  int fd = SSL_get_fd(ssl);
  if (fd < 0 || ::getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0)
    return "an unknown peer";
  char host[INET6_ADDRSTRLEN] = "?";
  int port = 0;
  if (addr.ss_family == AF_INET) {
    auto* a = reinterpret_cast<sockaddr_in*>(&addr);
    ::inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
    port = ntohs(a->sin_port);
  } else if (addr.ss_family == AF_INET6) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&addr);
    ::inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
    port = ntohs(a->sin6_port);
  }
  return std::string(host) + ":" + std::to_string(port);
}

void note_refusal(SSL* ssl, int ssl_error) {
  // CAF may call SSL_accept again on a session whose handshake already failed: count it once.
  static const int mark = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  if (mark >= 0) {
    if (SSL_get_ex_data(ssl, mark))
      return;
    SSL_set_ex_data(ssl, mark, ssl);
  }
  auto n = ++refused;
  refused_counter().inc();
  if (n > 20 && n % 100 != 0)
    return;
  std::string reason;
  auto verify = SSL_get_verify_result(ssl);
  if (verify != X509_V_OK) {
    reason = std::string("certificate refused: ") + X509_verify_cert_error_string(verify);
  } else if (auto e = ERR_peek_last_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    reason = buf;
  } else {
    reason = ssl_error == SSL_ERROR_SYSCALL ? "the peer closed the connection during the TLS handshake"
                                            : "TLS handshake failed (SSL error " + std::to_string(ssl_error) + ")";
  }
  std::string name;
  {
    std::lock_guard<std::mutex> guard(name_mutex);
    name = endpoint_name;
  }
  std::cerr << "petrel " << name << ": refused a cluster connection from " << remembered_peer(ssl) << ": " << reason
            << " (refusal #" << n << ")" << std::endl;
}

} // namespace

void set_tls_endpoint_name(const std::string& name) {
  refused_counter(); // shows 0 in /metrics from the start
  std::lock_guard<std::mutex> guard(name_mutex);
  endpoint_name = name;
}

uint64_t tls_refused_count() {
  return refused.load();
}

} // namespace petrel

// Two gaps in CAF 0.17's openssl module, closed by wrapping the four libssl calls it makes (ELF
// symbol interposition: these definitions in the executable come before libssl's in the dynamic
// linker's search order; each forwards to the real function, found with dlsym(RTLD_NEXT)).
//
// 1. It never clears OpenSSL's per-thread error queue, which SSL_get_error() consults first. One
//    failed handshake (a rogue, a port scanner) left an error there, and the next SSL_read on the
//    same multiplexer thread that merely wanted more bytes was taken for a fatal error: CAF closed a
//    healthy head <-> node link and the node was restarted. OpenSSL's rule is to clear the queue
//    before every TLS I/O call; the wrappers do.
// 2. It drops a failed server handshake without a word (no hook, logging compiled out). The
//    SSL_accept wrapper counts and logs every refusal.
namespace {

template <class Fn>
Fn real_ssl_function(const char* name) {
  return reinterpret_cast<Fn>(::dlsym(RTLD_NEXT, name));
}

} // namespace

extern "C" int SSL_accept(SSL* ssl) {
  using accept_fn = int (*)(SSL*);
  static accept_fn real = real_ssl_function<accept_fn>("SSL_accept");
  if (!real)
    return -1;
  ERR_clear_error();
  petrel::remember_peer(ssl);
  int ret = real(ssl);
  if (ret <= 0) {
    int err = SSL_get_error(ssl, ret);
    if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE)
      petrel::note_refusal(ssl, err);
  }
  return ret;
}

extern "C" int SSL_connect(SSL* ssl) {
  using connect_fn = int (*)(SSL*);
  static connect_fn real = real_ssl_function<connect_fn>("SSL_connect");
  if (!real)
    return -1;
  ERR_clear_error();
  return real(ssl);
}

extern "C" int SSL_read(SSL* ssl, void* buf, int num) {
  using read_fn = int (*)(SSL*, void*, int);
  static read_fn real = real_ssl_function<read_fn>("SSL_read");
  if (!real)
    return -1;
  ERR_clear_error();
  return real(ssl, buf, num);
}

extern "C" int SSL_write(SSL* ssl, const void* buf, int num) {
  using write_fn = int (*)(SSL*, const void*, int);
  static write_fn real = real_ssl_function<write_fn>("SSL_write");
  if (!real)
    return -1;
  ERR_clear_error();
  return real(ssl, buf, num);
}
