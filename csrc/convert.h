// Element conversions shared by csrc/multi_tensor.cpp and csrc/quantize.cpp: load any
// supported dtype as fp32, store fp32 rounded to nearest even (branch-free, so loops vectorize).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace qsr_ds {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

template <typename T>
struct Conv;

template <>
struct Conv<float> {
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};

template <>
struct Conv<double> {
  static float load(double x) { return static_cast<float>(x); }
  static double store(float x) { return static_cast<double>(x); }
};

template <>
struct Conv<c10::BFloat16> {
  static float load(c10::BFloat16 x) { return bits_to_float(uint32_t(x.x) << 16); }
  static c10::BFloat16 store(float f) {
    // round to nearest even; any NaN becomes 0x7FC0 (what c10::BFloat16 does)
    const uint32_t u = float_to_bits(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const uint16_t bits = (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : uint16_t(rounded);
    return c10::BFloat16(bits, c10::BFloat16::from_bits());
  }
};

template <>
struct Conv<c10::Half> {
  static float load(c10::Half x) { return static_cast<float>(x); }
  static c10::Half store(float f) { return c10::Half(f); }
};

}  // namespace qsr_ds
