// A small HTTP/1.1 client for the CLI (Boost.Beast on Asio): one request per connection, a deadline for the
// whole exchange, and Server-Sent Events delivered one event at a time as they arrive.
//
// Two ways to use it:
//   - fetch(req, on_event): blocking, on its own io_context (launch banner, one-off queries);
//   - async_fetch(io, req, on_event, on_done): many exchanges at once on one io_context (petrel bench).
// All callbacks of an async exchange run on the threads that run `io`.
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <string_view>

namespace boost::asio {
class io_context;
}

namespace petrel::http_client {

struct request {
  std::string method = "POST";
  std::string host = "127.0.0.1";
  int port = 0;
  std::string target = "/";
  std::string body;                              // sent as is when non-empty
  std::string content_type = "application/json"; // for a non-empty body
  std::chrono::milliseconds timeout{60'000};     // connect + write + whole response
};

struct result {
  int status = 0;           // HTTP status; 0 when no response head arrived
  std::string content_type; // of the response
  std::string body;         // the whole body, except for an SSE stream that went to on_event
  std::string error;        // transport failure ("connect: Connection refused", "timeout"); empty when none
  bool event_stream = false; // the body was text/event-stream and went to on_event
  bool ok() const { return error.empty() && status >= 200 && status < 300; }
};

/// Called with the data of each SSE event as soon as the event is complete (several `data:` lines of one
/// event are joined with '\n'). Only for 2xx answers whose content type is text/event-stream.
using event_fn = std::function<void(std::string_view data)>;
using done_fn = std::function<void(result)>;

/// Starts one exchange on `io` and returns at once; `on_done` is called exactly once.
void async_fetch(boost::asio::io_context& io, request req, event_fn on_event, done_fn on_done);

/// Runs one exchange to completion on a private io_context.
result fetch(const request& req, const event_fn& on_event = {});

/// GET host:port/target.
result get(const std::string& host, int port, const std::string& target,
           std::chrono::milliseconds timeout = std::chrono::milliseconds(10'000));

/// POST a JSON body; with on_event, an SSE answer is delivered event by event.
result post_json(const std::string& host, int port, const std::string& target, const std::string& json_body,
                 const event_fn& on_event = {}, std::chrono::milliseconds timeout = std::chrono::milliseconds(60'000));

/// Splits an SSE byte stream into events. Feed it bytes as they arrive; it calls `on_event` per complete event.
class sse_splitter {
public:
  explicit sse_splitter(event_fn on_event) : on_event_(std::move(on_event)) {}
  void feed(std::string_view bytes);
  /// Bytes received that do not (yet) form a complete event.
  const std::string& pending() const { return buf_; }

private:
  void dispatch(std::string_view block);
  event_fn on_event_;
  std::string buf_;
};

} // namespace petrel::http_client
