// A small schema walker over yaml-cpp for Petrel's YAML files (cluster.yaml, chaos scenarios):
// every error names FILE:LINE and the fix; unknown keys are refused with a did-you-mean hint.
#pragma once

#include <algorithm>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include <yaml-cpp/yaml.h>

#include "runtime/cluster_config.hpp"

namespace petrel {

/// Edits (insert, delete, substitute, swap two neighbours) that turn a into b.
inline size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::vector<size_t>> d(a.size() + 1, std::vector<size_t>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i)
    d[i][0] = i;
  for (size_t j = 0; j <= b.size(); ++j)
    d[0][j] = j;
  for (size_t i = 1; i <= a.size(); ++i)
    for (size_t j = 1; j <= b.size(); ++j) {
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  return d[a.size()][b.size()];
}

/// " (did you mean 'X'?)" for the closest of `known`, when it is close enough to be a typo
/// (at most 1 edit for short words, at most 3 for long ones), else "".
inline std::string did_you_mean(const std::string& word, const std::vector<std::string>& known) {
  size_t limit = std::clamp<size_t>(word.size() / 3, 1, 3);
  std::string best;
  size_t best_d = limit + 1;
  for (auto& k : known)
    if (size_t d = edit_distance(word, k); d < best_d) {
      best_d = d;
      best = k;
    }
  return best.empty() ? "" : " (did you mean '" + best + "'?)";
}

inline std::string join(const std::vector<std::string>& words, const std::string& last_sep = ", ") {
  std::string out;
  for (size_t i = 0; i < words.size(); ++i)
    out += (i == 0 ? "" : i + 1 == words.size() ? last_sep : ", ") + words[i];
  return out;
}

// -- a small schema walker: every error names file:line, unknown keys are refused -------------

class yaml_reader {
public:
  explicit yaml_reader(std::string file) : file_(std::move(file)) {}

  /// Points at `at`. A null value (`key:` with nothing after it) carries the position of the next
  /// token, which may be lines further down: errors about a section as a whole use fail_key.
  [[noreturn]] void fail(const YAML::Node& at, const std::string& what) const { fail_line(line_of(at), what); }

  /// Points at the line of `key` inside `map` (or at `map` itself when the key is absent).
  [[noreturn]] void fail_key(const YAML::Node& map, const std::string& key, const std::string& what) const {
    int line = key_line(map, key);
    fail_line(line > 0 ? line : line_of(map), what);
  }

  [[noreturn]] void fail_line(int line, const std::string& what) const {
    std::ostringstream os;
    os << file_;
    if (line > 0)
      os << ":" << line;
    os << ": " << what;
    throw config_error(os.str());
  }

  static int line_of(const YAML::Node& n) {
    return n.IsDefined() && n.Mark().line >= 0 ? n.Mark().line + 1 : 0;
  }

  /// The line of the key `key` in `map` (1-based), 0 when absent.
  static int key_line(const YAML::Node& map, const std::string& key) {
    if (!map.IsDefined() || !map.IsMap())
      return 0;
    for (auto it = map.begin(); it != map.end(); ++it)
      if (it->first.IsScalar() && it->first.Scalar() == key)
        return line_of(it->first);
    return 0;
  }

  /// Line of the value of `key` when it has one, else of the key itself.
  static int value_line(const YAML::Node& map, const std::string& key) {
    auto v = map[key];
    return v.IsDefined() && !v.IsNull() && line_of(v) > 0 ? line_of(v) : key_line(map, key);
  }

  /// `map` must be a mapping whose keys are scalars from `known`, each at most once. `line` is where
  /// to point when `map` is not a mapping at all (the line of its key in the parent).
  /// Refuses keys of `map` outside `known`; errors about `map` itself point at its own line.
  void only_keys(const YAML::Node& map, const std::string& where, const std::vector<std::string>& known) const {
    only_keys(map, where, known, line_of(map));
  }

  void only_keys(const YAML::Node& map, const std::string& where, const std::vector<std::string>& known,
                 int line) const {
    if (!map.IsMap())
      fail_line(line > 0 ? line : line_of(map), where + " must be a mapping (key: value lines or {key: value})");
    std::map<std::string, int> seen;
    for (auto it = map.begin(); it != map.end(); ++it) {
      if (!it->first.IsScalar())
        fail(it->first, "a key in " + where + " must be a plain word, not a list or a mapping");
      auto key = it->first.Scalar();
      if (auto s = seen.find(key); s != seen.end())
        fail(it->first, "key '" + key + "' appears twice in " + where + " (first on line " +
                            std::to_string(s->second) + "); keep one");
      seen[key] = line_of(it->first);
      if (std::find(known.begin(), known.end(), key) != known.end())
        continue;
      fail(it->first,
           "unknown key '" + key + "' in " + where + did_you_mean(key, known) + "; known keys: " + join(known));
    }
  }

  template <class T>
  T scalar(const YAML::Node& n, const std::string& what) const {
    if (!n.IsScalar())
      fail(n, what + " must be a single value, not a list or a mapping");
    try {
      return n.as<T>();
    } catch (const YAML::Exception&) {
      fail(n, what + " has the wrong type ('" + n.Scalar() + "' is not " + type_name<T>() + ")");
    }
  }

  void opt_string(const YAML::Node& map, const char* key, std::string& out, const std::string& where,
                  bool allow_empty = false) const {
    auto n = map[key];
    if (!n.IsDefined() || n.IsNull())
      return;
    auto v = scalar<std::string>(n, where + "." + key);
    if (v.empty() && !allow_empty)
      fail(n, where + "." + key + " must not be empty");
    out = v;
  }

  /// A string that must be one of `options`.
  void opt_choice(const YAML::Node& map, const char* key, std::string& out, const std::string& where,
                  const std::vector<std::string>& options) const {
    auto n = map[key];
    if (!n.IsDefined() || n.IsNull())
      return;
    auto v = scalar<std::string>(n, where + "." + key);
    if (std::find(options.begin(), options.end(), v) == options.end())
      fail(n, where + "." + key + " '" + v + "' is unknown" + did_you_mean(v, options) + "; use " +
                  join(options, " or "));
    out = v;
  }

  void opt_int(const YAML::Node& map, const char* key, int& out, const std::string& where, int lo,
               int hi = 1 << 30) const {
    auto n = map[key];
    if (!n.IsDefined() || n.IsNull())
      return;
    long long v = scalar<long long>(n, where + "." + key);
    if (v < lo || v > hi)
      fail(n, where + "." + key + " = " + std::to_string(v) + " is out of range [" + std::to_string(lo) + ", " +
                  std::to_string(hi) + "]");
    out = static_cast<int>(v);
  }

  /// A duration; `positive` refuses 0.
  void opt_duration(const YAML::Node& map, const char* key, duration_ms& out, const std::string& where,
                    bool positive) const {
    auto n = map[key];
    if (!n.IsDefined() || n.IsNull())
      return;
    try {
      out = parse_duration(scalar<std::string>(n, where + "." + key));
    } catch (const std::invalid_argument& e) {
      fail(n, where + "." + key + ": " + e.what());
    }
    if (positive && out.count() <= 0)
      fail(n, where + "." + key + " must be longer than 0 (write e.g. 500ms or 10s)");
  }

  void opt_endpoint(const YAML::Node& map, endpoint& out, const std::string& where) const {
    opt_string(map, "host", out.host, where);
    int port = out.port;
    opt_int(map, "port", port, where, 0, 65535);
    out.port = static_cast<uint16_t>(port);
  }

private:
  template <class T>
  static const char* type_name() {
    if constexpr (std::is_same_v<T, std::string>)
      return "text";
    else if constexpr (std::is_same_v<T, bool>)
      return "true or false";
    else
      return "a whole number";
  }

  std::string file_;
};

} // namespace petrel
