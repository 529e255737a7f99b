// Test support: run the petrel binary as a real process, in the foreground or in the background.
#pragma once

#include <cstdlib>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace petrel::test {

/// The petrel binary and the source tree the tests use: the build's, unless PETREL_BINARY / PETREL_SOURCE_DIR in
/// the environment say otherwise (the GPU machine runs binaries built here from another path).
inline std::string petrel_binary() {
  const char* e = std::getenv("PETREL_BINARY");
  return e && *e ? e : PETREL_BINARY;
}
inline std::string source_dir() {
  const char* e = std::getenv("PETREL_SOURCE_DIR");
  return e && *e ? e : PETREL_SOURCE_DIR;
}

struct command_result {
  int exit_code = -1;
  std::string output; // stdout and stderr together
};

/// Runs `petrel ARGS` to completion and captures its output.
inline command_result run_petrel(const std::string& args) {
  command_result r;
  std::string cmd = petrel_binary() + " " + args + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p)
    return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0)
    r.output.append(buf.data(), n);
  int status = ::pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

/// A petrel process in the background, its output going to a file. Killed at destruction.
class background_process {
public:
  background_process(const std::vector<std::string>& args, const std::string& log_path) : log_(log_path) {
    std::vector<std::string> full{petrel_binary()};
    full.insert(full.end(), args.begin(), args.end());
    pid_ = ::fork();
    if (pid_ == 0) {
      int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      std::vector<char*> argv;
      for (auto& a : full)
        argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
  }
  ~background_process() {
    if (pid_ > 0 && !exited_) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  pid_t pid() const { return pid_; }

  /// Waits for the process to exit; returns its exit code, or nullopt on timeout.
  std::optional<int> wait_exit(std::chrono::milliseconds timeout) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      int status = 0;
      pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        exited_ = true;
        exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        return exit_code_;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return exited_ ? std::optional<int>(exit_code_) : std::nullopt;
  }

  std::string output() const {
    std::ifstream in(log_);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

private:
  pid_t pid_ = -1;
  bool exited_ = false;
  int exit_code_ = -1;
  std::string log_;
};

inline bool process_alive(int pid) {
  if (pid <= 0)
    return false;
  // A zombie still answers kill(0): read its state to tell.
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  if (!stat)
    return false;
  std::string s;
  std::getline(stat, s);
  auto close = s.rfind(')');
  return close != std::string::npos && close + 2 < s.size() && s[close + 2] != 'Z';
}

/// Polls `pred` every 50 ms until it holds or `timeout` passes.
inline bool eventually(std::chrono::milliseconds timeout, const std::function<bool()>& pred) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred())
      return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return pred();
}

/// A fresh directory under /tmp, removed at destruction.
struct temp_dir {
  std::filesystem::path path;
  temp_dir() {
    char tmpl[] = "/tmp/petrel-test-XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string file(const std::string& name, const std::string& content) const {
    auto p = path / name;
    std::filesystem::create_directories(p.parent_path());
    std::ofstream(p) << content;
    return p.string();
  }
};

/// True when something accepts TCP connections on 127.0.0.1:port.
bool port_open(int port);

} // namespace petrel::test

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

inline bool petrel::test::port_open(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  ::close(fd);
  return ok;
}
