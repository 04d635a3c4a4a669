// The portable kernels: 8-float vectors in the compiler's generic vector extension (GCC and Clang),
// which it lowers to the baseline instruction set (two SSE2 registers on x86-64, two NEON registers
// on arm64). Every CPU can run them.
#include "kernels.h"

// The vectors never cross an ABI boundary (everything here is internal): GCC's note on passing them
// without AVX does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace cpu_ext {
namespace {

typedef float f8 __attribute__((vector_size(32)));
typedef uint32_t u8x __attribute__((vector_size(32)));
typedef int32_t i8x __attribute__((vector_size(32)));

struct V {
  using R = f8;
  using I = u8x;
  static constexpr int W = 8;
  static constexpr int MR = 2;
  static constexpr int NR = 2;
  static R zero() {
    return R{};
  }
  static R load(const float* p) {
    R r;
    __builtin_memcpy(&r, p, sizeof(r));
    return r;
  }
  static void store(float* p, R a) {
    __builtin_memcpy(p, &a, sizeof(a));
  }
  static R set1(float f) {
    return R{f, f, f, f, f, f, f, f};
  }
  static R fma(R a, R b, R c) {
    return a * b + c;
  }
  static R mul(R a, R b) {
    return a * b;
  }
  static R add(R a, R b) {
    return a + b;
  }
  static R sub(R a, R b) {
    return a - b;
  }
  static R max(R a, R b) {
    return a > b ? a : b;
  }
  static R min(R a, R b) {
    return a < b ? a : b;
  }
  static R pow2n(R t) {
    I u;
    __builtin_memcpy(&u, &t, sizeof(u));
    return from_bits((u << 23) + 0x3f800000u);
  }
  static float hsum(R a) {
    return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
  }
  static R from_bits(I u) {
    R r;
    __builtin_memcpy(&r, &u, sizeof(r));
    return r;
  }
  static R bf16(const uint16_t* p) {
    I u;
    for (int i = 0; i < 8; ++i) {
      u[i] = uint32_t(p[i]) << 16;
    }
    return from_bits(u);
  }
  static R f16(const uint16_t* p);
  static R q4(const uint32_t* p) {
    const I shifts = {0, 4, 8, 12, 16, 20, 24, 28};
    I v = (I{} + p[0]) >> shifts;
    return __builtin_convertvector(i8x(v & 15u), R);
  }
  static R q8(const uint32_t* p) {
    const I shifts = {0, 8, 16, 24, 0, 8, 16, 24};
    I v = {p[0], p[0], p[0], p[0], p[1], p[1], p[1], p[1]};
    return __builtin_convertvector(i8x((v >> shifts) & 255u), R);
  }
  static I words(const uint32_t* p) {
    I r;
    __builtin_memcpy(&r, p, sizeof(r));
    return r;
  }
  template <int J>
  static R nibble(I v) {
    if constexpr (J == 7) {
      return __builtin_convertvector(i8x(v >> 28), R);
    } else {
      return __builtin_convertvector(i8x(v & (0xFu << (4 * J))), R);
    }
  }
  template <int PER>
  static R spread(const float* s) {
    R r;
    for (int i = 0; i < 8; ++i) {
      r[i] = s[i / PER];
    }
    return r;
  }
};

#include "kernels_impl.h"
#include "attention_impl.h"

V::R V::f16(const uint16_t* p) {
  R r;
  for (int i = 0; i < 8; ++i) {
    r[i] = f16_to_f32(p[i]);
  }
  return r;
}

} // namespace

const KernelSet kernels_generic = {"generic", &matmul, &dequantize, &attention};

} // namespace cpu_ext
