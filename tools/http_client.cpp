// A small HTTP/1.1 client on Boost.Beast; see http_client.hpp.
#include "tools/http_client.hpp"

#include <array>
#include <memory>
#include <utility>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

namespace petrel::http_client {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;

// -- SSE ----------------------------------------------------------------------------------------------------

void sse_splitter::feed(std::string_view bytes) {
  buf_.append(bytes);
  // An event ends at a blank line: "\n\n", or "\r\n\r\n" from servers that use CRLF.
  size_t start = 0;
  for (;;) {
    size_t lf = buf_.find("\n\n", start);
    size_t crlf = buf_.find("\r\n\r\n", start);
    size_t end;
    size_t sep;
    if (crlf != std::string::npos && (lf == std::string::npos || crlf < lf)) {
      end = crlf;
      sep = 4;
    } else if (lf != std::string::npos) {
      end = lf;
      sep = 2;
    } else {
      break;
    }
    dispatch(std::string_view(buf_).substr(start, end - start));
    start = end + sep;
  }
  buf_.erase(0, start);
}

void sse_splitter::dispatch(std::string_view block) {
  std::string data;
  bool any = false;
  while (!block.empty()) {
    auto nl = block.find('\n');
    auto line = block.substr(0, nl);
    block = nl == std::string_view::npos ? std::string_view{} : block.substr(nl + 1);
    if (!line.empty() && line.back() == '\r')
      line.remove_suffix(1);
    if (line.substr(0, 5) != "data:")
      continue; // comments (":"), event:, id:, retry: carry nothing Petrel clients need
    line.remove_prefix(5);
    if (!line.empty() && line.front() == ' ')
      line.remove_prefix(1);
    if (any)
      data += '\n';
    data.append(line);
    any = true;
  }
  if (any && on_event_)
    on_event_(data);
}

// -- one exchange -------------------------------------------------------------------------------------------

namespace {

class exchange : public std::enable_shared_from_this<exchange> {
public:
  exchange(asio::io_context& io, request req, event_fn on_event, done_fn on_done)
      : resolver_(io), stream_(io), req_(std::move(req)), on_done_(std::move(on_done)),
        sse_(std::move(on_event)), has_event_fn_(false) {
    deadline_ = std::chrono::steady_clock::now() + req_.timeout;
  }

  void start(bool has_event_fn) {
    has_event_fn_ = has_event_fn;
    parser_.body_limit(std::uint64_t(1) << 34);
    parser_.header_limit(64 * 1024);
    if (req_.port <= 0 || req_.port > 65535)
      return finish("bad port " + std::to_string(req_.port));
    auto self = shared_from_this();
    resolver_.async_resolve(req_.host, std::to_string(req_.port),
                            [self](beast::error_code ec, tcp::resolver::results_type results) {
                              if (ec)
                                return self->finish("resolve " + self->req_.host + ": " + ec.message());
                              self->connect(results);
                            });
  }

private:
  void connect(const tcp::resolver::results_type& results) {
    stream_.expires_at(deadline_);
    auto self = shared_from_this();
    stream_.async_connect(results, [self](beast::error_code ec, const tcp::endpoint&) {
      if (ec)
        return self->finish(self->describe("connect", ec));
      self->write();
    });
  }

  void write() {
    out_.method(bhttp::string_to_verb(req_.method));
    out_.target(req_.target);
    out_.version(11);
    out_.set(bhttp::field::host, req_.host + ":" + std::to_string(req_.port));
    out_.set(bhttp::field::user_agent, "petrel");
    out_.set(bhttp::field::accept, has_event_fn_ ? "text/event-stream, application/json" : "*/*");
    out_.keep_alive(false);
    if (!req_.body.empty()) {
      out_.set(bhttp::field::content_type, req_.content_type);
      out_.body() = req_.body;
    }
    out_.prepare_payload();
    stream_.expires_at(deadline_);
    auto self = shared_from_this();
    bhttp::async_write(stream_, out_, [self](beast::error_code ec, std::size_t) {
      if (ec)
        return self->finish(self->describe("write", ec));
      self->read_header();
    });
  }

  void read_header() {
    stream_.expires_at(deadline_);
    auto self = shared_from_this();
    bhttp::async_read_header(stream_, buf_, parser_, [self](beast::error_code ec, std::size_t) {
      if (ec)
        return self->finish(self->describe("read", ec));
      auto& head = self->parser_.get();
      self->result_.status = static_cast<int>(head.result_int());
      self->result_.content_type = std::string(head[bhttp::field::content_type]);
      self->result_.event_stream = self->has_event_fn_ && self->result_.status >= 200 &&
                                   self->result_.status < 300 &&
                                   self->result_.content_type.find("text/event-stream") != std::string::npos;
      self->read_body();
    });
  }

  void read_body() {
    if (parser_.is_done())
      return finish({});
    parser_.get().body().data = chunk_.data();
    parser_.get().body().size = chunk_.size();
    stream_.expires_at(deadline_);
    auto self = shared_from_this();
    bhttp::async_read_some(stream_, buf_, parser_, [self](beast::error_code ec, std::size_t) {
      if (ec == bhttp::error::need_buffer)
        ec = {};
      size_t got = self->chunk_.size() - self->parser_.get().body().size;
      if (got) {
        std::string_view bytes(self->chunk_.data(), got);
        if (self->result_.event_stream)
          self->sse_.feed(bytes);
        else
          self->result_.body.append(bytes);
      }
      if (ec)
        return self->finish(self->describe("read", ec));
      self->read_body();
    });
  }

  std::string describe(const char* what, const beast::error_code& ec) const {
    if (ec == beast::error::timeout)
      return std::string("timeout after ") + std::to_string(req_.timeout.count()) + " ms (" + what + ")";
    if (ec == bhttp::error::end_of_stream || ec == bhttp::error::partial_message || ec == asio::error::eof)
      return std::string(what) + ": connection closed by the server before the response ended";
    return std::string(what) + ": " + ec.message();
  }

  void finish(std::string error) {
    if (finished_)
      return;
    finished_ = true;
    result_.error = std::move(error);
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    stream_.close();
    auto done = std::move(on_done_);
    if (done)
      done(std::move(result_));
  }

  tcp::resolver resolver_;
  beast::tcp_stream stream_;
  request req_;
  done_fn on_done_;
  sse_splitter sse_;
  bool has_event_fn_;
  bool finished_ = false;
  std::chrono::steady_clock::time_point deadline_;
  bhttp::request<bhttp::string_body> out_;
  beast::flat_buffer buf_;
  bhttp::response_parser<bhttp::buffer_body> parser_;
  std::array<char, 16 * 1024> chunk_{};
  result result_;
};

} // namespace

void async_fetch(asio::io_context& io, request req, event_fn on_event, done_fn on_done) {
  bool has_event_fn = static_cast<bool>(on_event);
  auto ex = std::make_shared<exchange>(io, std::move(req), std::move(on_event), std::move(on_done));
  ex->start(has_event_fn);
}

result fetch(const request& req, const event_fn& on_event) {
  asio::io_context io;
  result out;
  async_fetch(io, req, on_event, [&](result r) { out = std::move(r); });
  io.run();
  return out;
}

result get(const std::string& host, int port, const std::string& target, std::chrono::milliseconds timeout) {
  request req;
  req.method = "GET";
  req.host = host;
  req.port = port;
  req.target = target;
  req.timeout = timeout;
  return fetch(req);
}

result post_json(const std::string& host, int port, const std::string& target, const std::string& json_body,
                 const event_fn& on_event, std::chrono::milliseconds timeout) {
  request req;
  req.host = host;
  req.port = port;
  req.target = target;
  req.body = json_body;
  req.timeout = timeout;
  return fetch(req, on_event);
}

} // namespace petrel::http_client
