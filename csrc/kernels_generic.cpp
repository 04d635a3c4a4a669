// The portable kernels: plain C++ over 8-float arrays, which the compiler vectorises for the
// baseline instruction set (SSE2 on x86-64, NEON on arm64). Every CPU can run them.
#include "kernels.h"

namespace cpu_ext {
namespace {

struct V {
  struct R {
    float v[8];
  };
  static constexpr int W = 8;
  static constexpr int MR = 2;
  static constexpr int NR = 2;
  static R zero() {
    R r;
    for (int i = 0; i < 8; ++i) {
      r.v[i] = 0.0f;
    }
    return r;
  }
  static R load(const float* p) {
    R r;
    for (int i = 0; i < 8; ++i) {
      r.v[i] = p[i];
    }
    return r;
  }
  static void store(float* p, R a) {
    for (int i = 0; i < 8; ++i) {
      p[i] = a.v[i];
    }
  }
  static R set1(float f) {
    R r;
    for (int i = 0; i < 8; ++i) {
      r.v[i] = f;
    }
    return r;
  }
  static R fma(R a, R b, R c) {
    R r;
    for (int i = 0; i < 8; ++i) {
      r.v[i] = a.v[i] * b.v[i] + c.v[i];
    }
    return r;
  }
  static float hsum(R a) {
    return ((a.v[0] + a.v[4]) + (a.v[1] + a.v[5])) + ((a.v[2] + a.v[6]) + (a.v[3] + a.v[7]));
  }
  static R bf16(const uint16_t* p);
  static R f16(const uint16_t* p);
  static R q4(const uint32_t* p) {
    R r;
    for (int i = 0; i < 8; ++i) {
      r.v[i] = float((p[0] >> (4 * i)) & 15u);
    }
    return r;
  }
  static R q8(const uint32_t* p) {
    R r;
    for (int i = 0; i < 8; ++i) {
      r.v[i] = float((p[i / 4] >> (8 * (i % 4))) & 255u);
    }
    return r;
  }
  static R mul(R a, R b) {
    R r;
    for (int i = 0; i < 8; ++i) {
      r.v[i] = a.v[i] * b.v[i];
    }
    return r;
  }
  static R add(R a, R b) {
    R r;
    for (int i = 0; i < 8; ++i) {
      r.v[i] = a.v[i] + b.v[i];
    }
    return r;
  }
  struct I {
    uint32_t v[8];
  };
  static I words(const uint32_t* p) {
    I r;
    for (int i = 0; i < 8; ++i) {
      r.v[i] = p[i];
    }
    return r;
  }
  template <int J>
  static R nibble(I a) {
    R r;
    for (int i = 0; i < 8; ++i) {
      r.v[i] = J == 7 ? float(a.v[i] >> 28) : float(a.v[i] & (0xFu << (4 * J)));
    }
    return r;
  }
  template <int PER>
  static R spread(const float* s) {
    R r;
    for (int i = 0; i < 8; ++i) {
      r.v[i] = s[i / PER];
    }
    return r;
  }
};

#include "kernels_impl.h"

V::R V::bf16(const uint16_t* p) {
  R r;
  for (int i = 0; i < 8; ++i) {
    r.v[i] = bf16_to_f32(p[i]);
  }
  return r;
}

V::R V::f16(const uint16_t* p) {
  R r;
  for (int i = 0; i < 8; ++i) {
    r.v[i] = f16_to_f32(p[i]);
  }
  return r;
}

} // namespace

const KernelSet kernels_generic = {"generic", &matmul, &dequantize};

} // namespace cpu_ext
