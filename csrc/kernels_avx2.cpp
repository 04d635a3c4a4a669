// The kernels for x86-64 with AVX2, FMA and F16C (8 float lanes). Built with those flags; ops.cpp
// calls them only when the CPU has all three.
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

namespace cpu_ext {
namespace {

struct V {
  using R = __m256;
  static constexpr int W = 8;
  static constexpr int MR = 4; // 4 x 3 accumulators + 3 weight vectors + x: all 16 registers
  static constexpr int NR = 3;
  static R zero() {
    return _mm256_setzero_ps();
  }
  static R load(const float* p) {
    return _mm256_loadu_ps(p);
  }
  static void store(float* p, R v) {
    _mm256_storeu_ps(p, v);
  }
  static R set1(float f) {
    return _mm256_set1_ps(f);
  }
  static R fma(R a, R b, R c) {
    return _mm256_fmadd_ps(a, b, c);
  }
  static float hsum(R v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static R bf16(const uint16_t* p) {
    __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  }
  static R f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static R q4(const uint32_t* p) {
    // One word, broadcast; lane i takes bits 4i..4i+3.
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(*p)), shifts);
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
  }
  static R q8(const uint32_t* p) {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
  }
  static R mul(R a, R b) {
    return _mm256_mul_ps(a, b);
  }
  static R add(R a, R b) {
    return _mm256_add_ps(a, b);
  }
  static R sub(R a, R b) {
    return _mm256_sub_ps(a, b);
  }
  static R max(R a, R b) {
    return _mm256_max_ps(a, b);
  }
  static R min(R a, R b) {
    return _mm256_min_ps(a, b);
  }
  static R pow2n(R t) {
    __m256i e = _mm256_slli_epi32(_mm256_castps_si256(t), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(e, _mm256_set1_epi32(0x3f800000)));
  }
  // W words, one a lane; nibble J of each in place (times 16^J, J < 7), or shifted down (J = 7).
  using I = __m256i;
  static I words(const uint32_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  template <int J>
  static R nibble(I v) {
    if constexpr (J == 7) {
      return _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 28));
    } else {
      return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF << (4 * J))));
    }
  }
  // Lane l gets s[l / per]: the scale of each word's group (per words a group; s padded to W).
  template <int PER>
  static R spread(const float* s) {
    if constexpr (PER >= 8) {
      return _mm256_set1_ps(s[0]);
    } else {
      static_assert(PER == 4, "groups of 32 are 4 words");
      return _mm256_permutevar8x32_ps(_mm256_loadu_ps(s), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    }
  }
};

#include "kernels_impl.h"
#include "attention_impl.h"

} // namespace

const KernelSet kernels_avx2 = {"avx2", &matmul, &dequantize, &attention};

} // namespace cpu_ext
#endif
