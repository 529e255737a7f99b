#include "transport/http_server.hpp"

#include <atomic>
#include <deque>
#include <sstream>
#include <thread>
#include <unordered_map>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;

namespace petrel::transport {

namespace {

// OpenAI-shaped error body for transport-level refusals.
std::string error_json(std::string_view message, std::string_view code) {
  nlohmann::json e = {{"error",
                       {{"message", std::string(message)},
                        {"type", "invalid_request_error"},
                        {"param", nullptr},
                        {"code", std::string(code)}}}};
  return e.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

bool header_safe(std::string_view s) { return s.find_first_of("\r\n") == std::string_view::npos; }

template <class Header>
void apply_extra(Header& h, const http_header_list& extra) {
  for (const auto& [k, v] : extra)
    if (!k.empty() && header_safe(k) && header_safe(v)) h.set(k, v);
}

std::string serialize_full(unsigned version, bool keep_alive, int status, std::string_view content_type,
                           std::string body, const http_header_list& extra) {
  http::response<http::string_body> res;
  res.version(version);
  res.result(static_cast<unsigned>(status));
  res.set(http::field::server, "petrel");
  if (!content_type.empty()) res.set(http::field::content_type, beast::string_view(content_type.data(), content_type.size()));
  apply_extra(res, extra);
  res.keep_alive(keep_alive);
  res.body() = std::move(body);
  res.prepare_payload();
  std::ostringstream os;
  os << res;
  return std::move(os).str();
}

std::string chunk(std::string_view payload) {
  char size[24];
  int n = std::snprintf(size, sizeof size, "%zx\r\n", payload.size());
  std::string out;
  out.reserve(static_cast<std::size_t>(n) + payload.size() + 2);
  out.append(size, static_cast<std::size_t>(n));
  out.append(payload);
  out.append("\r\n");
  return out;
}

constexpr std::size_t max_buffered_pipeline = 64u << 10;

} // namespace

namespace detail {

// Shared by the server object and every session, so that the io_context outlives every socket even
// when the gateway keeps a response_stream past the server's stop().
struct http_server_core {
  net::io_context ioc;
  std::optional<tcp::acceptor> acceptor; // destroyed before ioc
  http_server_options options;
  std::map<std::string, std::map<std::string, http_handler>> routes; // path -> method -> handler
  std::mutex mutex;
  bool stopped = false;
  std::unordered_map<http_session*, std::weak_ptr<http_session>> sessions;
  std::atomic<std::size_t> open_connections{0};
  std::optional<net::executor_work_guard<net::io_context::executor_type>> work;
  std::vector<std::thread> threads;

  // Runs f on ex unless the server is stopping; the lock orders this against stop().
  template <class F>
  bool post_if_running(const net::any_io_executor& ex, F&& f) {
    std::lock_guard lock(mutex);
    if (stopped) return false;
    net::post(ex, std::forward<F>(f));
    return true;
  }
};

// One connection. Everything below runs on the connection's strand, except enqueue() (any thread,
// posts) and release_socket() (after the io threads have been joined).
class http_session : public std::enable_shared_from_this<http_session> {
public:
  http_session(std::shared_ptr<http_server_core> core, tcp::socket socket)
    : core_(std::move(core)), ex_(socket.get_executor()) {
    beast::error_code ec;
    auto ep = socket.remote_endpoint(ec);
    if (!ec) remote_ = ep.address().to_string() + ":" + std::to_string(ep.port());
    stream_.emplace(std::move(socket));
    core_->open_connections.fetch_add(1);
  }

  ~http_session() {
    std::lock_guard lock(core_->mutex);
    core_->sessions.erase(this);
  }

  const net::any_io_executor& executor() const { return ex_; }

  void start() {
    bool stopped;
    {
      std::lock_guard lock(core_->mutex);
      stopped = core_->stopped;
      if (!stopped) core_->sessions.emplace(this, weak_from_this());
    }
    if (stopped) {
      net::post(ex_, [self = shared_from_this()] { self->close(); });
      return;
    }
    net::post(ex_, [self = shared_from_this()] { self->do_read_request(); });
  }

  // From any thread: queue bytes of the current answer. `final` marks its last piece.
  bool enqueue(std::string bytes, bool final, bool close_after) {
    return core_->post_if_running(ex_, [self = shared_from_this(), bytes = std::move(bytes), final,
                                        close_after]() mutable {
      self->push_out({std::move(bytes), final, close_after, false});
    });
  }

  void stop_from_server() { close(); }

  // After the io threads are gone: drop the socket while the io_context still exists.
  void release_socket() {
    parser_.reset();
    stream_.reset();
  }

private:
  struct out_item {
    std::string bytes;
    bool final;
    bool close_after;
    bool linger; // half-close and drain before closing, so the client reads our error first
  };

  // -- reading requests ------------------------------------------------------------

  void do_read_request() {
    if (closed_) return;
    parser_.emplace();
    parser_->body_limit(core_->options.max_body_bytes);
    parser_->header_limit(static_cast<std::uint32_t>(core_->options.max_header_bytes));
    stream_->expires_after(core_->options.idle_timeout);
    http::async_read(*stream_, buffer_, *parser_,
                     [self = shared_from_this()](beast::error_code ec, std::size_t) { self->on_read_request(ec); });
  }

  void on_read_request(beast::error_code ec) {
    if (closed_) return;
    if (ec) {
      if (ec == http::error::body_limit) {
        reply_error_and_close(413, "request_too_large",
                              "the request body exceeds " + std::to_string(core_->options.max_body_bytes) + " bytes");
      } else if (ec == http::error::header_limit) {
        reply_error_and_close(431, "headers_too_large",
                              "the request headers exceed " + std::to_string(core_->options.max_header_bytes) +
                                  " bytes");
      } else if (ec.category() == http::make_error_code(http::error::bad_method).category() &&
                 ec != http::error::end_of_stream && ec != http::error::partial_message) {
        reply_error_and_close(400, "bad_request", "malformed HTTP request: " + ec.message());
      } else {
        close(); // the client closed, reset, or idled out: nothing to answer
      }
      return;
    }
    stream_->expires_never();
    auto& msg = parser_->get();
    http_request req;
    req.method = std::string(msg.method_string());
    req.target = std::string(msg.target());
    auto q = req.target.find('?');
    req.path = req.target.substr(0, q);
    if (q != std::string::npos) req.query = req.target.substr(q + 1);
    for (const auto& f : msg) req.headers.emplace_back(std::string(f.name_string()), std::string(f.value()));
    req.body = std::move(msg.body());
    req.remote = remote_;
    req.version = msg.version();
    const bool keep_alive = msg.keep_alive();
    parser_.reset();
    dispatch(std::move(req), keep_alive);
  }

  void dispatch(http_request req, bool keep_alive) {
    in_request_ = true;
    auto out = std::shared_ptr<response_stream>(new response_stream(shared_from_this(), keep_alive, req.version));
    current_ = out;
    start_monitor();
    auto path_it = core_->routes.find(req.path);
    if (path_it == core_->routes.end()) {
      out->respond_json(404, error_json("no route for " + req.method + " " + req.path, "not_found"));
      return;
    }
    auto method_it = path_it->second.find(req.method);
    if (method_it == path_it->second.end()) {
      std::string allow;
      for (const auto& [m, h] : path_it->second) allow += (allow.empty() ? "" : ", ") + m;
      out->respond_json(405, error_json("method " + req.method + " is not allowed on " + req.path + "; use " + allow,
                                        "method_not_allowed"),
                        {{"Allow", allow}});
      return;
    }
    try {
      method_it->second(req, out);
    } catch (const std::exception& e) {
      out->respond_json(500, error_json(std::string("internal error: ") + e.what(), "internal_error"));
    } catch (...) {
      out->respond_json(500, error_json("internal error", "internal_error"));
    }
  }

  void reply_error_and_close(int status, std::string_view code, const std::string& message) {
    in_request_ = true;
    push_out({serialize_full(11, false, status, "application/json", error_json(message, code), {}), true, true, true});
  }

  // While a request is answered, keep one read open: it is how a vanished client shows (EOF or
  // reset). Bytes that arrive (a pipelined request) are kept for the next parse.
  void start_monitor() {
    if (monitoring_ || closed_ || buffer_.size() >= max_buffered_pipeline) return;
    monitoring_ = true;
    stream_->async_read_some(buffer_.prepare(4096), [self = shared_from_this()](beast::error_code ec, std::size_t n) {
      self->on_monitor(ec, n);
    });
  }

  void on_monitor(beast::error_code ec, std::size_t n) {
    monitoring_ = false;
    if (closed_) return;
    if (!ec) buffer_.commit(n);
    const bool cancelled_by_us = ec == net::error::operation_aborted && (want_request_ || want_drain_);
    if (ec && !cancelled_by_us) {
      close(); // EOF or reset: the client is gone; notifies the open request, if any
      return;
    }
    if (want_request_) {
      want_request_ = false;
      do_read_request();
    } else if (want_drain_) {
      want_drain_ = false;
      drain();
    } else if (in_request_) {
      start_monitor();
    }
  }

  // The answer is complete while the monitor read still waits: stop it, and let its completion
  // start what comes next (the next request, or the drain before closing).
  void stop_monitor() {
    beast::error_code ec;
    stream_->socket().cancel(ec);
  }

  // -- writing --------------------------------------------------------------------------

  void push_out(out_item item) {
    if (closed_) return;
    outbox_.push_back(std::move(item));
    if (!writing_) do_write();
  }

  void do_write() {
    if (closed_ || outbox_.empty()) {
      writing_ = false;
      return;
    }
    writing_ = true;
    stream_->expires_after(core_->options.write_timeout);
    net::async_write(*stream_, net::buffer(outbox_.front().bytes),
                     [self = shared_from_this()](beast::error_code ec, std::size_t) { self->on_write(ec); });
  }

  void on_write(beast::error_code ec) {
    writing_ = false;
    if (closed_) return;
    if (ec) {
      close(); // the client is gone (or stopped reading for write_timeout)
      return;
    }
    stream_->expires_never();
    out_item item = std::move(outbox_.front());
    outbox_.pop_front();
    if (item.final) {
      in_request_ = false;
      current_.reset();
      outbox_.clear(); // nothing may follow the end of an answer
      if (item.close_after) {
        if (item.linger) linger_close();
        else close();
        return;
      }
      if (monitoring_) {
        want_request_ = true; // a pipelined request may already sit in buffer_
        stop_monitor();
      } else {
        do_read_request();
      }
      return;
    }
    do_write();
  }

  // Half-close and read until the client closes (bounded by a timeout), so that unread request bytes
  // do not turn our close into a reset that destroys the error response in flight.
  void linger_close() {
    beast::error_code ec;
    stream_->socket().shutdown(tcp::socket::shutdown_send, ec);
    if (monitoring_) {
      want_drain_ = true;
      stop_monitor();
      return;
    }
    drain();
  }

  void drain() {
    monitoring_ = true;
    buffer_.clear();
    stream_->expires_after(std::chrono::seconds(2));
    stream_->async_read_some(buffer_.prepare(4096), [self = shared_from_this()](beast::error_code ec, std::size_t) {
      self->monitoring_ = false;
      if (self->closed_) return;
      if (ec) self->close();
      else self->drain();
    });
  }

  void close() {
    if (closed_) return;
    closed_ = true;
    outbox_.clear();
    beast::error_code ec;
    stream_->socket().shutdown(tcp::socket::shutdown_both, ec);
    stream_->close();
    core_->open_connections.fetch_sub(1);
    if (in_request_) {
      in_request_ = false;
      if (auto out = current_.lock()) out->notify_disconnect();
    }
    current_.reset();
  }

  std::shared_ptr<http_server_core> core_;
  net::any_io_executor ex_;
  std::optional<beast::tcp_stream> stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::string remote_;
  std::deque<out_item> outbox_;
  bool writing_ = false;
  bool monitoring_ = false;   // a monitor (or drain) read is outstanding
  bool want_request_ = false; // the answer is done: read the next request once the monitor stops
  bool want_drain_ = false;   // the answer is done: drain and close once the monitor stops
  bool in_request_ = false;   // a request was dispatched and its last byte is not written yet
  bool closed_ = false;
  std::weak_ptr<response_stream> current_;
};

} // namespace detail

// -- http_request -----------------------------------------------------------------------

std::string http_request::header(std::string_view name) const {
  for (const auto& [k, v] : headers)
    if (beast::iequals(k, beast::string_view(name.data(), name.size()))) return v;
  return {};
}

// -- response_stream ----------------------------------------------------------------------

response_stream::response_stream(std::shared_ptr<detail::http_session> session, bool keep_alive, unsigned version)
  : session_(std::move(session)), keep_alive_(keep_alive), version_(version) {}

response_stream::~response_stream() {
  state s;
  {
    std::lock_guard lock(mutex_);
    s = state_;
  }
  if (s == state::fresh)
    respond_json(500, error_json("the server dropped the request without an answer", "internal_error"));
  else if (s == state::streaming)
    end_sse();
}

// Each call checks the state, changes it and queues its bytes under one lock, so that pieces sent
// from different threads reach the wire in the order their calls took effect.
bool response_stream::respond(int status, std::string_view content_type, std::string body,
                              const http_header_list& extra) {
  if (status < 100 || status > 999) status = 500;
  std::string bytes = serialize_full(version_, keep_alive_, status, content_type, std::move(body), extra);
  std::lock_guard lock(mutex_);
  if (state_ != state::fresh || disconnected_) return false;
  state_ = state::done;
  on_disconnect_ = nullptr;
  return session_->enqueue(std::move(bytes), true, !keep_alive_);
}

bool response_stream::respond_json(int status, std::string body, const http_header_list& extra) {
  return respond(status, "application/json", std::move(body), extra);
}

namespace {

std::string sse_header(unsigned version, bool keep_alive, int status, const http_header_list& extra) {
  http::response<http::empty_body> res;
  res.version(version);
  res.result(static_cast<unsigned>(status));
  res.set(http::field::server, "petrel");
  res.set(http::field::content_type, "text/event-stream");
  res.set(http::field::cache_control, "no-cache");
  res.set("X-Accel-Buffering", "no");
  apply_extra(res, extra);
  if (version >= 11) {
    res.keep_alive(keep_alive);
    res.chunked(true);
  } else {
    res.keep_alive(false); // HTTP/1.0: the end of the stream is the end of the connection
  }
  std::ostringstream os;
  os << res.base();
  return std::move(os).str();
}

} // namespace

bool response_stream::begin_sse(int status, const http_header_list& extra) {
  if (status < 100 || status > 999) status = 500;
  std::string header = sse_header(version_, keep_alive_, status, extra);
  std::lock_guard lock(mutex_);
  if (state_ != state::fresh || disconnected_) return false;
  state_ = state::streaming;
  return session_->enqueue(std::move(header), false, false);
}

bool response_stream::send_event(std::string_view data) {
  std::string frame;
  frame.reserve(data.size() + 8);
  std::size_t start = 0;
  while (true) { // one "data:" line per payload line
    auto nl = data.find('\n', start);
    frame += "data: ";
    frame.append(data.substr(start, nl == std::string_view::npos ? std::string_view::npos : nl - start));
    frame += '\n';
    if (nl == std::string_view::npos) break;
    start = nl + 1;
  }
  frame += '\n';
  if (version_ >= 11) frame = chunk(frame);
  std::lock_guard lock(mutex_);
  if (state_ == state::done || disconnected_) return false;
  if (state_ == state::fresh) {
    // The first event opens the stream when nobody did: tokens may overtake the code that calls begin_sse().
    if (!session_->enqueue(sse_header(version_, keep_alive_, 200, {}), false, false)) return false;
    state_ = state::streaming;
  }
  return session_->enqueue(std::move(frame), false, false);
}

bool response_stream::end_sse() {
  std::lock_guard lock(mutex_);
  if (state_ != state::streaming) return false;
  state_ = state::done;
  on_disconnect_ = nullptr;
  if (disconnected_) return false;
  if (version_ >= 11) return session_->enqueue("0\r\n\r\n", true, !keep_alive_);
  return session_->enqueue({}, true, true);
}

void response_stream::on_disconnect(std::function<void()> cb) {
  {
    std::lock_guard lock(mutex_);
    if (state_ == state::done) return;
    if (!disconnected_) {
      on_disconnect_ = std::move(cb);
      return;
    }
  }
  if (cb) cb();
}

void response_stream::notify_disconnect() {
  std::function<void()> cb;
  {
    std::lock_guard lock(mutex_);
    if (disconnected_ || state_ == state::done) return;
    disconnected_ = true;
    cb = std::move(on_disconnect_);
    on_disconnect_ = nullptr;
  }
  if (cb) cb();
}

bool response_stream::connected() const {
  std::lock_guard lock(mutex_);
  return !disconnected_;
}

bool response_stream::finished() const {
  std::lock_guard lock(mutex_);
  return state_ == state::done;
}

bool response_stream::streaming() const {
  std::lock_guard lock(mutex_);
  return state_ == state::streaming;
}

// -- http_server -------------------------------------------------------------------------

namespace {

void accept_loop(const std::shared_ptr<detail::http_server_core>& core) {
  core->acceptor->async_accept(net::make_strand(core->ioc), [core](beast::error_code ec, tcp::socket socket) {
    if (ec == net::error::operation_aborted || !core->acceptor->is_open()) return;
    if (!ec) {
      std::make_shared<detail::http_session>(core, std::move(socket))->start();
      accept_loop(core);
      return;
    }
    // Out of descriptors and the like: back off a little instead of spinning.
    auto timer = std::make_shared<net::steady_timer>(core->acceptor->get_executor(), std::chrono::milliseconds(50));
    timer->async_wait([core, timer](beast::error_code) {
      if (core->acceptor->is_open()) accept_loop(core);
    });
  });
}

} // namespace

http_server::http_server(http_server_options options)
  : options_(std::move(options)), core_(std::make_shared<detail::http_server_core>()) {}

http_server::~http_server() { stop(); }

void http_server::route(std::string method, std::string path, http_handler handler) {
  core_->routes[std::move(path)][std::move(method)] = std::move(handler);
}

std::optional<std::string> http_server::start() {
  if (started_) return std::string("the HTTP server is already started");
  const std::string where = options_.host + ":" + std::to_string(options_.port);
  if (options_.threads < 1) return "cannot listen on " + where + ": threads must be at least 1";
  core_->options = options_;
  beast::error_code ec;
  tcp::resolver resolver(core_->ioc);
  auto results = resolver.resolve(options_.host, std::to_string(options_.port),
                                  tcp::resolver::passive | tcp::resolver::numeric_service, ec);
  if (ec || results.empty()) return "cannot listen on " + where + ": " + (ec ? ec.message() : "no address");
  const tcp::endpoint ep = results.begin()->endpoint();
  core_->acceptor.emplace(net::make_strand(core_->ioc));
  auto& acc = *core_->acceptor;
  if (acc.open(ep.protocol(), ec); ec) return "cannot listen on " + where + ": " + ec.message();
  if (acc.set_option(net::socket_base::reuse_address(true), ec); ec)
    return "cannot listen on " + where + ": " + ec.message();
  if (acc.bind(ep, ec); ec) return "cannot listen on " + where + ": " + ec.message();
  if (acc.listen(net::socket_base::max_listen_connections, ec); ec)
    return "cannot listen on " + where + ": " + ec.message();
  bound_port_ = acc.local_endpoint(ec).port();
  started_ = true;
  core_->work.emplace(core_->ioc.get_executor());
  accept_loop(core_);
  for (int i = 0; i < options_.threads; ++i) core_->threads.emplace_back([core = core_.get()] { core->ioc.run(); });
  return std::nullopt;
}

void http_server::stop() {
  if (!started_) return;
  std::vector<std::shared_ptr<detail::http_session>> live;
  {
    std::lock_guard lock(core_->mutex);
    if (core_->stopped) return;
    core_->stopped = true;
    for (auto& [ptr, weak] : core_->sessions)
      if (auto s = weak.lock()) live.push_back(std::move(s));
  }
  net::post(core_->acceptor->get_executor(), [core = core_] {
    beast::error_code ec;
    core->acceptor->close(ec);
  });
  for (auto& s : live) net::post(s->executor(), [s] { s->stop_from_server(); });
  live.clear();
  core_->work.reset();
  for (auto& t : core_->threads)
    if (t.joinable()) t.join();
  core_->threads.clear();
  // Sessions that a gateway still holds through a response_stream keep their object, not the socket.
  {
    std::lock_guard lock(core_->mutex);
    for (auto& [ptr, weak] : core_->sessions)
      if (auto s = weak.lock()) live.push_back(std::move(s));
  }
  for (auto& s : live) s->release_socket();
  live.clear(); // may run session destructors, which take the mutex: outside the lock
}

std::size_t http_server::connection_count() const { return core_->open_connections.load(); }

} // namespace petrel::transport
