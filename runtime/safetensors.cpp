#include "runtime/safetensors.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

namespace petrel {

size_t dtype_size(dtype t) {
  switch (t) {
    case dtype::f32: return 4;
    case dtype::f16: return 2;
    case dtype::bf16: return 2;
    case dtype::f8_e4m3: return 1;
    case dtype::i32: return 4;
    case dtype::i64: return 8;
    case dtype::u8: return 1;
  }
  return 0;
}

const char* dtype_name(dtype t) {
  switch (t) {
    case dtype::f32: return "F32";
    case dtype::f16: return "F16";
    case dtype::bf16: return "BF16";
    case dtype::f8_e4m3: return "F8_E4M3";
    case dtype::i32: return "I32";
    case dtype::i64: return "I64";
    case dtype::u8: return "U8";
  }
  return "?";
}

namespace {

std::optional<dtype> parse_dtype(const std::string& s) {
  if (s == "F32") return dtype::f32;
  if (s == "F16") return dtype::f16;
  if (s == "BF16") return dtype::bf16;
  if (s == "F8_E4M3") return dtype::f8_e4m3;
  if (s == "I32") return dtype::i32;
  if (s == "I64") return dtype::i64;
  if (s == "U8") return dtype::u8;
  return std::nullopt;
}

std::string shape_to_string(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

} // namespace

int64_t safetensor_info::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}
std::string safetensor_info::shape_str() const { return shape_to_string(shape); }

// -- conversions -------------------------------------------------------------------------------------------

float bf16_to_f32(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  float f;
  if (exp == 0) {
    f = std::ldexp(float(mant), -24); // subnormal (or zero)
    return sign ? -f : f;
  }
  uint32_t bits;
  if (exp == 31) bits = sign | 0x7f800000u | (mant << 13); // inf / nan
  else bits = sign | ((exp + 112) << 23) | (mant << 13);
  std::memcpy(&f, &bits, 4);
  return f;
}

float fp8_e4m3_to_f32(uint8_t v) {
  // e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa; no infinities, S.1111.111 is NaN.
  bool neg = v & 0x80;
  int exp = (v >> 3) & 0xf, mant = v & 0x7;
  float f;
  if (exp == 0xf && mant == 0x7) return std::numeric_limits<float>::quiet_NaN();
  if (exp == 0) f = std::ldexp(float(mant), -9); // mant/8 * 2^-6
  else f = std::ldexp(1.0f + float(mant) / 8.0f, exp - 7);
  return neg ? -f : f;
}

void dequant_fp8_blocks(const uint8_t* q, const float* scale_inv, int64_t rows, int64_t cols, int64_t bn, int64_t bk,
                        float* out) {
  static const auto table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = fp8_e4m3_to_f32(uint8_t(i));
    return t;
  }();
  const int64_t scale_cols = (cols + bk - 1) / bk;
  for (int64_t r = 0; r < rows; ++r) {
    const float* srow = scale_inv + (r / bn) * scale_cols;
    for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = table[q[r * cols + c]] * srow[c / bk];
  }
}

void convert_to_f32(const safetensor_info& t, float* out) {
  if (!t.type) throw model_load_error(t.file + ": tensor '" + t.name + "' has unsupported dtype '" + t.dtype_str + "'");
  const int64_t n = t.numel();
  switch (*t.type) {
    case dtype::f32: std::memcpy(out, t.data, size_t(n) * 4); break;
    case dtype::bf16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, t.data + 2 * i, 2);
        out[i] = bf16_to_f32(v);
      }
      break;
    case dtype::f16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, t.data + 2 * i, 2);
        out[i] = f16_to_f32(v);
      }
      break;
    case dtype::f8_e4m3:
      for (int64_t i = 0; i < n; ++i) out[i] = fp8_e4m3_to_f32(t.data[i]);
      break;
    default:
      throw model_load_error(t.file + ": tensor '" + t.name + "' has dtype " + t.dtype_str +
                             ", expected a floating-point dtype (F32, BF16, F16, F8_E4M3)");
  }
}

// -- safetensors_file -------------------------------------------------------------------------------------

safetensors_file::~safetensors_file() {
  if (map_) munmap(map_, size_);
}

std::shared_ptr<safetensors_file> safetensors_file::open(const std::filesystem::path& path) {
  const std::string p = path.string();
  int fd = ::open(p.c_str(), O_RDONLY);
  if (fd < 0) throw model_load_error(p + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    throw model_load_error(p + ": cannot stat");
  }
  std::shared_ptr<safetensors_file> f(new safetensors_file());
  f->path_ = p;
  f->size_ = size_t(st.st_size);
  if (f->size_ < 8) {
    ::close(fd);
    throw model_load_error(p + ": truncated: " + std::to_string(f->size_) + " bytes, no safetensors header");
  }
  f->map_ = mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (f->map_ == MAP_FAILED) {
    f->map_ = nullptr;
    throw model_load_error(p + ": mmap failed: " + std::strerror(errno));
  }
  const auto* base = static_cast<const uint8_t*>(f->map_);
  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= uint64_t(base[i]) << (8 * i);
  if (header_len > f->size_ - 8)
    throw model_load_error(p + ": truncated: header says " + std::to_string(header_len) + " bytes but the file has " +
                           std::to_string(f->size_ - 8) + " after the length");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(reinterpret_cast<const char*>(base + 8), reinterpret_cast<const char*>(base + 8 + header_len));
  } catch (const std::exception& e) {
    throw model_load_error(p + ": invalid safetensors header JSON: " + e.what());
  }
  if (!header.is_object()) throw model_load_error(p + ": safetensors header is not a JSON object");
  const uint8_t* data = base + 8 + header_len;
  const size_t data_size = f->size_ - 8 - header_len;
  for (auto& [name, desc] : header.items()) {
    if (name == "__metadata__") continue;
    safetensor_info t;
    t.name = name;
    t.file = p;
    try {
      t.dtype_str = desc.at("dtype").get<std::string>();
      int64_t elements = 1;
      // Integers only: JSON numbers past 2^64 (or with a fraction) parse as doubles, whose conversion to an
      // integer type is undefined, so they are refused here instead.
      auto integer = [](const nlohmann::json& v, const char* what) -> const nlohmann::json& {
        if (!v.is_number_integer())
          throw model_load_error(std::string(what) + " " + v.dump() + " is not an integer in range");
        return v;
      };
      for (auto& d : desc.at("shape")) {
        auto dim = integer(d, "shape dimension").get<int64_t>();
        // A negative dimension, or a product past 2^62, is a corrupt header, not a tensor.
        if (dim < 0 || __builtin_mul_overflow(elements, dim, &elements) || elements > (int64_t(1) << 62))
          throw model_load_error("shape dimension " + std::to_string(dim) + " is negative or too large");
        t.shape.push_back(dim);
      }
      auto offs = desc.at("data_offsets");
      const auto& b = integer(offs.at(0), "data_offsets value");
      const auto& e = integer(offs.at(1), "data_offsets value");
      // nlohmann keeps non-negative integers unsigned: a signed one is negative.
      if (!b.is_number_unsigned() || !e.is_number_unsigned()) throw model_load_error("negative data_offsets");
      uint64_t begin = b.get<uint64_t>(), end = e.get<uint64_t>();
      if (end < begin) throw model_load_error("data_offsets end before begin");
      if (end > data_size)
        throw model_load_error("data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                               ") run past the end of the file's data (" + std::to_string(data_size) +
                               " bytes): file truncated?");
      t.data = data + begin;
      t.nbytes = size_t(end - begin);
    } catch (const model_load_error& e) {
      throw model_load_error(p + ": tensor '" + name + "': " + e.what());
    } catch (const std::exception& e) {
      throw model_load_error(p + ": tensor '" + name + "': malformed header entry: " + e.what());
    }
    t.type = parse_dtype(t.dtype_str);
    if (t.type && size_t(t.numel()) * dtype_size(*t.type) != t.nbytes)
      throw model_load_error(p + ": tensor '" + name + "': " + std::to_string(t.nbytes) + " bytes of data for dtype " +
                             t.dtype_str + " and shape " + t.shape_str() + " (expected " +
                             std::to_string(size_t(t.numel()) * dtype_size(*t.type)) + ")");
    f->tensors_.emplace(name, std::move(t));
  }
  return f;
}

const safetensor_info* safetensors_file::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

// -- checkpoint -------------------------------------------------------------------------------------------

checkpoint checkpoint::open(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  checkpoint c;
  c.dir_ = dir.string();
  if (!fs::is_directory(dir)) throw model_load_error(c.dir_ + ": not a directory");
  fs::path index = dir / "model.safetensors.index.json";
  if (fs::exists(index)) {
    std::ifstream in(index);
    nlohmann::json j;
    try {
      in >> j;
    } catch (const std::exception& e) {
      throw model_load_error(index.string() + ": invalid JSON: " + e.what());
    }
    if (!j.contains("weight_map") || !j["weight_map"].is_object())
      throw model_load_error(index.string() + ": no \"weight_map\" object");
    std::map<std::string, std::shared_ptr<safetensors_file>> opened;
    for (auto& [name, file] : j["weight_map"].items()) {
      if (!file.is_string()) throw model_load_error(index.string() + ": weight_map entry '" + name + "' is not a file name");
      std::string fname = file.get<std::string>();
      auto it = opened.find(fname);
      if (it == opened.end()) {
        if (!fs::exists(dir / fname))
          throw model_load_error(index.string() + ": tensor '" + name + "' is in shard '" + fname + "', which does not exist");
        it = opened.emplace(fname, safetensors_file::open(dir / fname)).first;
        c.files_.push_back(it->second);
      }
      const safetensor_info* t = it->second->find(name);
      if (!t)
        throw model_load_error(index.string() + ": tensor '" + name + "' is listed in shard '" + fname +
                               "' but that file does not contain it");
      c.by_name_[name] = t;
    }
    return c;
  }
  std::vector<fs::path> files;
  if (fs::exists(dir / "model.safetensors")) {
    files.push_back(dir / "model.safetensors");
  } else {
    for (auto& e : fs::directory_iterator(dir))
      if (e.path().extension() == ".safetensors") files.push_back(e.path());
    std::sort(files.begin(), files.end());
  }
  if (files.empty())
    throw model_load_error(c.dir_ + ": no model.safetensors, model.safetensors.index.json or *.safetensors found");
  for (auto& p : files) {
    c.files_.push_back(safetensors_file::open(p));
    for (auto& [name, t] : c.files_.back()->tensors()) c.by_name_[name] = &t;
  }
  return c;
}

const safetensor_info* checkpoint::find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second;
}

const safetensor_info& checkpoint::require(const std::string& name) const {
  const safetensor_info* t = find(name);
  if (!t) throw model_load_error(dir_ + ": missing tensor '" + name + "'");
  return *t;
}

std::vector<float> checkpoint::read_f32(const std::string& name, const std::vector<int64_t>& shape, int64_t bn,
                                        int64_t bk) const {
  const safetensor_info& t = require(name);
  if (!t.type)
    throw model_load_error(t.file + ": tensor '" + name + "' has unsupported dtype '" + t.dtype_str +
                           "' (supported: F32, BF16, F16, F8_E4M3)");
  if (t.shape != shape)
    throw model_load_error(t.file + ": tensor '" + name + "' has shape " + t.shape_str() + ", expected " +
                           shape_to_string(shape));
  std::vector<float> out(size_t(t.numel()));
  if (*t.type == dtype::f8_e4m3) {
    const std::string sname = name + "_scale_inv";
    const safetensor_info* s = find(sname);
    if (!s) throw model_load_error(dir_ + ": fp8 tensor '" + name + "' has no scale tensor '" + sname + "'");
    int64_t rows = shape.size() >= 1 ? shape[0] : 1, cols = shape.size() >= 2 ? shape[1] : 1;
    if (shape.size() > 2)
      throw model_load_error(t.file + ": fp8 tensor '" + name + "' must be 1-D or 2-D, has shape " + t.shape_str());
    if (shape.size() == 1) {
      cols = rows;
      rows = 1;
    }
    std::vector<int64_t> sshape = {(rows + bn - 1) / bn, (cols + bk - 1) / bk};
    if (shape.size() == 1) sshape = {(cols + bk - 1) / bk};
    std::vector<float> scale = read_f32(sname, sshape, bn, bk);
    dequant_fp8_blocks(t.data, scale.data(), rows, cols, bn, bk, out.data());
  } else {
    convert_to_f32(t, out.data());
  }
  return out;
}

} // namespace petrel
