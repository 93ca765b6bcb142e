// Float vectors for the kernels written once for any instruction set (decode_attention_simd.inc,
// dense_gemv_simd.inc): `Vec` in namespaces avx512, avx2 and portable, each compiled for its instruction set, with
// W floats per vector and the loads (float32, and bfloat16 widened), stores, arithmetic, sums and 2^n those kernels
// use.
#pragma once

#include <immintrin.h>

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>

#ifndef ALWAYS_INLINE
#define ALWAYS_INLINE inline __attribute__((always_inline))
#endif

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
namespace avx512 {

struct Vec {
  using V = __m512;
  static constexpr int W = 16;
  ALWAYS_INLINE static V zero() { return _mm512_setzero_ps(); }
  ALWAYS_INLINE static V set1(float x) { return _mm512_set1_ps(x); }
  ALWAYS_INLINE static V load(const float* p) { return _mm512_loadu_ps(p); }
  ALWAYS_INLINE static V load(const c10::BFloat16* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  ALWAYS_INLINE static void store(float* p, V x) { _mm512_storeu_ps(p, x); }
  ALWAYS_INLINE static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  ALWAYS_INLINE static V add(V a, V b) { return _mm512_add_ps(a, b); }
  ALWAYS_INLINE static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  ALWAYS_INLINE static float sum(V x) { return _mm512_reduce_add_ps(x); }
  ALWAYS_INLINE static V min(V a, V b) { return _mm512_min_ps(a, b); }
  ALWAYS_INLINE static V max(V a, V b) { return _mm512_max_ps(a, b); }
  ALWAYS_INLINE static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  ALWAYS_INLINE static V floor(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  // 2^n for whole numbers n in the float exponent's range
  ALWAYS_INLINE static V pow2(V n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  // y where x >= limit, else 0
  ALWAYS_INLINE static V zero_below(V y, V x, float limit) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, set1(limit), _CMP_GE_OQ), y);
  }
};

}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {

struct Vec {
  using V = __m256;
  static constexpr int W = 8;
  ALWAYS_INLINE static V zero() { return _mm256_setzero_ps(); }
  ALWAYS_INLINE static V set1(float x) { return _mm256_set1_ps(x); }
  ALWAYS_INLINE static V load(const float* p) { return _mm256_loadu_ps(p); }
  ALWAYS_INLINE static V load(const c10::BFloat16* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
  ALWAYS_INLINE static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
  ALWAYS_INLINE static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  ALWAYS_INLINE static V add(V a, V b) { return _mm256_add_ps(a, b); }
  ALWAYS_INLINE static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  ALWAYS_INLINE static float sum(V x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  ALWAYS_INLINE static V min(V a, V b) { return _mm256_min_ps(a, b); }
  ALWAYS_INLINE static V max(V a, V b) { return _mm256_max_ps(a, b); }
  ALWAYS_INLINE static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  ALWAYS_INLINE static V floor(V x) { return _mm256_floor_ps(x); }
  ALWAYS_INLINE static V pow2(V n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  ALWAYS_INLINE static V zero_below(V y, V x, float limit) {
    return _mm256_and_ps(_mm256_cmp_ps(x, set1(limit), _CMP_GE_OQ), y);
  }
};

}  // namespace avx2
#pragma GCC pop_options

namespace portable {

struct Vec {
  using V = float;
  static constexpr int W = 1;
  static V zero() { return 0.0f; }
  static V set1(float x) { return x; }
  static V load(const float* p) { return *p; }
  static V load(const c10::BFloat16* p) { return static_cast<float>(*p); }
  static void store(float* p, V x) { *p = x; }
  static V fmadd(V a, V b, V c) { return a * b + c; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static float sum(V x) { return x; }
  static V min(V a, V b) { return std::min(a, b); }
  static V max(V a, V b) { return std::max(a, b); }
  static V mul(V a, V b) { return a * b; }
  static V floor(V x) { return std::floor(x); }
  static V pow2(V n) { return std::ldexp(1.0f, int(n)); }
  static V zero_below(V y, V x, float limit) { return x >= limit ? y : 0.0f; }
};

}  // namespace portable
