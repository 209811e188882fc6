// LoRA's block kernel for bfloat16 rows and tables on CPUs with AVX-512-BF16 (Zen 4, Sapphire
// Rapids and later). Not compiled on its own: adapters_cpu.cpp includes it before lora_add_,
// which calls ``lora_block_bf16`` for a block when the build has these instructions
// (``kHaveLoraAvx512``) and ``fast_paths_enabled()`` says yes, and the portable ``lora_block``
// otherwise. Same math and same rounding points as the portable kernel: h = A x in float32, then
// y + Σ_j h_j Bt_j in float32, rounded to bfloat16 once (round to nearest even, NaN kept).
//
// Why by hand: the portable kernel widens every bf16 value to float32 before its FMA, and the
// compiler keeps its sums in memory between factor rows. Here ``vdpbf16ps`` multiplies 32 bf16
// pairs and adds them into 16 float32 sums in one instruction, four factor rows share each
// loaded input vector, and y's lanes stay in registers across all r factor rows. Row tails are
// masked loads and stores, so every width takes this path.
//
// The float32 sums differ from the portable kernel's only in their order (and vdpbf16ps treats
// bf16 subnormal inputs as zero), both within the float32 accumulation bound the tests allow.

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512BF16__)
#include <immintrin.h>
constexpr bool kHaveLoraAvx512 = true;

namespace facet {
namespace lora_avx512 {

inline __mmask32 mask32(int64_t n) { return n >= 32 ? ~__mmask32(0) : __mmask32((1u << n) - 1); }
inline __mmask16 mask16(int64_t n) { return n >= 16 ? ~__mmask16(0) : __mmask16((1u << n) - 1); }

// 16 bf16 (masked) widened to float32: the bits moved to the upper half.
inline __m512 load16(const bf16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// 16 float32 rounded to bf16 (nearest even, as st() and torch do; NaN becomes the quiet NaN).
inline void store16(bf16* p, __m512 v, __mmask16 m) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}

inline __m512bh load32(const bf16* p, __mmask32 m) { return (__m512bh)_mm512_maskz_loadu_epi16(m, p); }

// h[c * r + j0 + j] = A_{j0+j} . x_c for J factor rows and the block's C rows.
template <int C, int J>
inline void dots(const bf16* const* xs, const bf16* a0, int64_t in_f, float* h, int64_t r, int64_t j0) {
  __m512 s[J][C];
  for (int j = 0; j < J; ++j)
    for (int c = 0; c < C; ++c) s[j][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < in_f; i += 32) {
    const __mmask32 m = mask32(in_f - i);
    __m512bh xv[C];
    for (int c = 0; c < C; ++c) xv[c] = load32(xs[c] + i, m);
    for (int j = 0; j < J; ++j) {
      const __m512bh av = load32(a0 + j * in_f + i, m);
      for (int c = 0; c < C; ++c) s[j][c] = _mm512_dpbf16_ps(s[j][c], av, xv[c]);
    }
  }
  for (int j = 0; j < J; ++j)
    for (int c = 0; c < C; ++c) h[c * r + j0 + j] = _mm512_reduce_add_ps(s[j][c]);
}

template <int C>
void block(const bf16* const* xs, bf16* const* ys, const bf16* ar, const bf16* br, int64_t r, int64_t in_f,
           int64_t out_f, float* h) {
  int64_t j = 0;
  for (; j + 4 <= r; j += 4) dots<C, 4>(xs, ar + j * in_f, in_f, h, r, j);
  switch (r - j) {
    case 3: dots<C, 3>(xs, ar + j * in_f, in_f, h, r, j); break;
    case 2: dots<C, 2>(xs, ar + j * in_f, in_f, h, r, j); break;
    case 1: dots<C, 1>(xs, ar + j * in_f, in_f, h, r, j); break;
    default: break;
  }
  for (int64_t o = 0; o < out_f; o += 16) {
    const __mmask16 m = mask16(out_f - o);
    __m512 acc[C];
    for (int c = 0; c < C; ++c) acc[c] = load16(ys[c] + o, m);
    for (int64_t jj = 0; jj < r; ++jj) {
      const __m512 bv = load16(br + jj * out_f + o, m);
      for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(_mm512_set1_ps(h[c * r + jj]), bv, acc[c]);
    }
    for (int c = 0; c < C; ++c) store16(ys[c] + o, acc[c], m);
  }
}

}  // namespace lora_avx512

template <int C>
inline void lora_block_bf16(const bf16* const* xs, bf16* const* ys, const bf16* ar, const bf16* br, int64_t r,
                            int64_t in_f, int64_t out_f, float* h) {
  lora_avx512::block<C>(xs, ys, ar, br, r, in_f, out_f, h);
}

}  // namespace facet

#else
constexpr bool kHaveLoraAvx512 = false;

namespace facet {
template <int C>
inline void lora_block_bf16(const bf16* const*, bf16* const*, const bf16*, const bf16*, int64_t, int64_t, int64_t,
                            float*) {}
}  // namespace facet
#endif
