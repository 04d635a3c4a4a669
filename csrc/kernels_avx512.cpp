// The kernels for x86-64 with AVX-512F (16 float lanes). Built with that flag; ops.cpp calls them
// only when the CPU has it (and AVX2, FMA, F16C).
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

// GCC 12 warns about the deliberately undefined vector inside its AVX-512 intrinsics.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace cpu_ext {
namespace {

struct V {
  using R = __m512;
  static constexpr int W = 16;
  static constexpr int MR = 4; // 4 x 4 accumulators + 4 weight vectors + x: 21 of 32 registers
  static constexpr int NR = 4;
  static R zero() {
    return _mm512_setzero_ps();
  }
  static R load(const float* p) {
    return _mm512_loadu_ps(p);
  }
  static void store(float* p, R v) {
    _mm512_storeu_ps(p, v);
  }
  static R set1(float f) {
    return _mm512_set1_ps(f);
  }
  static R fma(R a, R b, R c) {
    return _mm512_fmadd_ps(a, b, c);
  }
  static float hsum(R v) {
    return _mm512_reduce_add_ps(v);
  }
  static R bf16(const uint16_t* p) {
    __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
  }
  static R f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static R q4(const uint32_t* p) {
    // Two words: lanes 0-7 take the first, 8-15 the second; lane i takes bits 4(i % 8)...
    const __m512i pick = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i shifts =
        _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    __m512i words =
        _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    __m512i v = _mm512_srlv_epi32(_mm512_permutexvar_epi32(pick, words), shifts);
    return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
  }
  static R q8(const uint32_t* p) {
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
  }
  static R mul(R a, R b) {
    return _mm512_mul_ps(a, b);
  }
  static R add(R a, R b) {
    return _mm512_add_ps(a, b);
  }
  static R sub(R a, R b) {
    return _mm512_sub_ps(a, b);
  }
  static R max(R a, R b) {
    return _mm512_max_ps(a, b);
  }
  static R min(R a, R b) {
    return _mm512_min_ps(a, b);
  }
  static R pow2n(R t) {
    __m512i e = _mm512_slli_epi32(_mm512_castps_si512(t), 23);
    return _mm512_castsi512_ps(_mm512_add_epi32(e, _mm512_set1_epi32(0x3f800000)));
  }
  // W words, one a lane; nibble J of each in place (times 16^J, J < 7), or shifted down (J = 7).
  using I = __m512i;
  static I words(const uint32_t* p) {
    return _mm512_loadu_si512(p);
  }
  template <int J>
  static R nibble(I v) {
    if constexpr (J == 7) {
      return _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 28));
    } else {
      return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF << (4 * J))));
    }
  }
  // Lane l gets s[l / per]: the scale of each word's group (per words a group; s padded to W).
  template <int PER>
  static R spread(const float* s) {
    if constexpr (PER >= 16) {
      return _mm512_set1_ps(s[0]);
    } else if constexpr (PER == 8) {
      return _mm512_permutexvar_ps(
          _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1), _mm512_loadu_ps(s));
    } else {
      static_assert(PER == 4, "groups of 32 are 4 words");
      return _mm512_permutexvar_ps(
          _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3), _mm512_loadu_ps(s));
    }
  }
};

#include "kernels_impl.h"
#include "attention_impl.h"

} // namespace

const KernelSet kernels_avx512 = {"avx512", &matmul, &dequantize, &attention};

} // namespace cpu_ext
#endif
