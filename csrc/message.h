// Error messages of fastbert's argument checks, formatted without std::ostream's number formatting.
//
// Why: TORCH_CHECK's ostream number formatting crashed a build whose compiler had copied libstdc++'s
// locale code into the library (docs/perf-notes.md, "Build incidents"). Every fastbert check formats
// its numbers, shapes, dtypes and devices into one std::string here (std::to_string / snprintf, no
// locale facets) and hands TORCH_CHECK that string only.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace fastbert {
namespace msg {

inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(std::string_view s) { return std::string(s.data(), s.size()); }
inline std::string piece(bool b) { return b ? "true" : "false"; }
inline std::string piece(char c) { return std::string(1, c); }
inline std::string piece(c10::ScalarType t) { return c10::toString(t); }
inline std::string piece(const c10::Device& d) { return d.str(); }

template <typename T, typename std::enable_if<std::is_integral<T>::value && !std::is_same<T, bool>::value &&
                                                  !std::is_same<T, char>::value,
                                              int>::type = 0>
inline std::string piece(T v) {
  return std::to_string(v);
}

template <typename T, typename std::enable_if<std::is_floating_point<T>::value, int>::type = 0>
inline std::string piece(T v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.9g", static_cast<double>(v));
  return buf;
}

template <typename T>
inline std::string piece(c10::ArrayRef<T> a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + piece(a[i]);
  return s + "]";
}

template <typename... Args>
inline std::string cat(const Args&... args) {
  std::string s;
  ((s += piece(args)), ...);
  return s;
}

}  // namespace msg
}  // namespace fastbert
