// An HTTP/1.1 server on Boost.Beast (Asio): a small thread pool, keep-alive, routes by exact path and
// method, full responses or Server-Sent Events, and client-disconnect detection. No CAF here: the
// gateway actor registers callbacks, and answers later, from any thread, through response_stream.
//
// Transport-level errors are answered here with OpenAI-shaped JSON ({"error": {...}}): 400 malformed
// HTTP, 404 unknown path, 405 wrong method (with Allow), 413 body over max_body_bytes, 431 headers
// over max_header_bytes, 500 when a handler throws or drops its response_stream unanswered.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace petrel::transport {

using http_header_list = std::vector<std::pair<std::string, std::string>>;

/// One parsed request.
struct http_request {
  std::string method;        // "GET", "POST", ...
  std::string target;        // as sent: path + "?" + query
  std::string path;          // the target up to '?'
  std::string query;         // after '?', without it ("" when none)
  http_header_list headers;  // in arrival order, names as sent
  std::string body;
  std::string remote;        // "ip:port" of the client
  unsigned version = 11;     // 10 or 11

  /// The first header of that name (case-insensitive), or "".
  std::string header(std::string_view name) const;
};

namespace detail {
class http_session;
struct http_server_core;
} // namespace detail

/// The answer to one request. Thread-safe: every call may come from any thread, at any time, also
/// after the handler returned. Answer exactly once: either respond(), or begin_sse() + any number of
/// send_event() + end_sse(). Calls that come too late (answered already, client gone, server
/// stopped) return false and do nothing. If the last reference is dropped unanswered, the client
/// gets a 500 (or an open SSE stream is ended), so a request can never hang.
class response_stream {
public:
  ~response_stream();
  response_stream(const response_stream&) = delete;
  response_stream& operator=(const response_stream&) = delete;

  /// One full response. `extra` are added headers (e.g. {"Retry-After", "1"}).
  bool respond(int status, std::string_view content_type, std::string body, const http_header_list& extra = {});
  /// respond() with Content-Type application/json.
  bool respond_json(int status, std::string body, const http_header_list& extra = {});

  /// Starts a text/event-stream response (chunked on HTTP/1.1; on HTTP/1.0 the connection closes at the end).
  bool begin_sse(int status = 200, const http_header_list& extra = {});
  /// Sends "data: <data>\n\n" (a multi-line payload becomes one data: line per line). On a fresh
  /// response it calls begin_sse() first, so an event that overtakes begin_sse() is not lost.
  bool send_event(std::string_view data);
  /// Ends the stream; the connection is then reused (keep-alive) or closed.
  bool end_sse();

  /// `cb` runs once, on a server thread, when the client goes away (or the server stops) before the
  /// answer was complete; at once if that already happened. Not called after respond()/end_sse().
  /// Keep it short: post a message, free resources.
  void on_disconnect(std::function<void()> cb);

  /// False once the client is known to be gone.
  bool connected() const;
  /// True once respond() or end_sse() was called.
  bool finished() const;
  bool streaming() const;

private:
  friend class detail::http_session;
  explicit response_stream(std::shared_ptr<detail::http_session> session, bool keep_alive, unsigned version);
  void notify_disconnect();

  enum class state { fresh, streaming, done };
  std::shared_ptr<detail::http_session> session_;
  const bool keep_alive_;
  const unsigned version_;
  mutable std::mutex mutex_;
  state state_ = state::fresh;
  bool disconnected_ = false;
  std::function<void()> on_disconnect_;
};

/// Runs on a server thread, inside the connection's strand: must not block. Keep `out` to answer later.
using http_handler = std::function<void(const http_request& req, std::shared_ptr<response_stream> out)>;

struct http_server_options {
  std::string host = "127.0.0.1";
  uint16_t port = 0;                          // 0: an ephemeral port (see http_server::port())
  int threads = 2;
  std::size_t max_body_bytes = 8u << 20;      // larger bodies get 413
  std::size_t max_header_bytes = 16u << 10;   // larger headers get 431
  std::chrono::milliseconds idle_timeout{60'000};  // keep-alive idle / slow request read
  std::chrono::milliseconds write_timeout{30'000}; // a client that stops reading is dropped
};

class http_server {
public:
  explicit http_server(http_server_options options = {});
  ~http_server(); // stop()
  http_server(const http_server&) = delete;
  http_server& operator=(const http_server&) = delete;

  /// Registers `handler` for METHOD PATH (exact match, query ignored). Call before start().
  void route(std::string method, std::string path, http_handler handler);

  /// Binds, listens and starts the threads. Returns an error message ("cannot listen on
  /// 127.0.0.1:80: Permission denied") instead of throwing.
  std::optional<std::string> start();

  /// The bound port (the real one when options.port was 0); 0 before start().
  uint16_t port() const { return bound_port_; }

  /// Closes the listener and every connection (open requests see on_disconnect), waits for the
  /// threads. Idempotent. response_streams kept after stop() return false on every call.
  void stop();

  /// Open connections right now (for tests and the dashboard).
  std::size_t connection_count() const;

private:
  http_server_options options_;
  std::shared_ptr<detail::http_server_core> core_;
  uint16_t bound_port_ = 0;
  bool started_ = false;
};

} // namespace petrel::transport
