// Test support: a real HTTP client (curl) against a running gateway.
#pragma once

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <string>

namespace petrel::test {

struct http_reply {
  int status = 0;
  std::string body;
  std::string headers;
};

inline std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s)
    out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

/// One request with curl; `extra` is added to curl's arguments (e.g. "--max-time 0.2").
inline http_reply http_call(int port, const std::string& method, const std::string& path, const std::string& body = {},
                            const std::string& extra = {}) {
  char hdr_tmpl[] = "/tmp/petrel-hdr-XXXXXX";
  int fd = ::mkstemp(hdr_tmpl);
  ::close(fd);
  std::string cmd = "curl -s -N -X " + method + " -D " + hdr_tmpl + " -w '\\n%{http_code}' " + extra + " ";
  if (!body.empty())
    cmd += "-H 'Content-Type: application/json' --data-binary " + shell_quote(body) + " ";
  cmd += "http://127.0.0.1:" + std::to_string(port) + path + " 2>/dev/null";
  http_reply r;
  FILE* p = ::popen(cmd.c_str(), "r");
  std::array<char, 4096> buf;
  size_t n;
  std::string out;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0)
    out.append(buf.data(), n);
  ::pclose(p);
  auto nl = out.rfind('\n');
  if (nl != std::string::npos) {
    r.status = std::atoi(out.c_str() + nl + 1);
    r.body = out.substr(0, nl);
  }
  FILE* h = ::fopen(hdr_tmpl, "r");
  while (h && (n = fread(buf.data(), 1, buf.size(), h)) > 0)
    r.headers.append(buf.data(), n);
  if (h)
    ::fclose(h);
  ::unlink(hdr_tmpl);
  return r;
}

inline http_reply http_post(int port, const std::string& path, const std::string& body, const std::string& extra = {}) {
  return http_call(port, "POST", path, body, extra);
}

inline http_reply http_get(int port, const std::string& path) {
  return http_call(port, "GET", path);
}

} // namespace petrel::test
