// Fused CPU kernels for the on-the-fly adapter work of a mixed batch (float32 and bfloat16).
//
// Each function does, in one call, what the family's torch code in server/methods/ does in 4-12
// small ops for the token rows of one slot pool: gather each row's slot parameters, apply them,
// write the result back into the batch's activations. At decode sizes (a few rows per pool) the
// cost of those small ops is their fixed overhead, not their arithmetic, so one loop per family
// is several times cheaper. The math is the same as the torch code; tests/methods/test_kernels.py
// (float32) and test_kernels_bf16.py (bfloat16) check every kernel against it.
//
// Conventions: ``z``, ``x``, ``y`` are contiguous [N, D] activations of the whole step, float32 or
// bfloat16; ``rows`` [R] (int64) picks this pool's rows, ``slots`` [R] (int64) the slot of each row
// in the pool's stacked tables ``[S, ...]`` (contiguous, float32 or bfloat16, independently of the
// activations). Functions ending in ``_`` write in place.
//
// bfloat16: every value is widened to float32 as it is read, all arithmetic and accumulation is
// float32, and a result is rounded to bfloat16 once, when it is written back (round to nearest
// even, as torch does). The torch code rounds its intermediates too, so the kernels are at least
// as accurate; spectra (FFT families) are float32 in both.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <unordered_map>
#include <cstring>
#include <vector>

namespace facet {

using torch::Tensor;

// ---- element types ------------------------------------------------------------------------------
// bfloat16 is handled as its bits (the upper half of a float32), so the widening and rounding
// below are plain integer ops the compiler vectorises (-O3 -march=native).
using bf16 = uint16_t;

inline float ld(float v) { return v; }
inline float ld(bf16 v) {
  const uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void st(float& d, float v) { d = v; }
inline void st(bf16& d, float v) {  // round to nearest even; NaN stays a (quiet) NaN
  uint32_t u;
  std::memcpy(&u, &v, 4);
  d = v != v ? bf16(0x7fc0) : bf16((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline bool is_served(const Tensor& t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16; }

template <typename T>
T* ptr(const Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// Calls ``f(A{}, W{})`` with A the activations' element type and W the table's.
template <typename F>
void with_types(const Tensor& act, const Tensor& table, const F& f) {
  const bool a16 = act.scalar_type() == at::kBFloat16, w16 = table.scalar_type() == at::kBFloat16;
  if (a16 && w16) f(bf16{}, bf16{});
  else if (a16) f(bf16{}, float{});
  else if (w16) f(float{}, bf16{});
  else f(float{}, float{});
}

template <typename F>
void with_act_type(const Tensor& act, const F& f) {
  if (act.scalar_type() == at::kBFloat16) f(bf16{});
  else f(float{});
}

// ---- checks ---------------------------------------------------------------------------------------
// Shapes, dtypes, every table width and every row/slot index are checked before any raw pointer
// is used: a wrong table raises a RuntimeError naming it instead of reading past its memory.

// True when every p[i] is in [0, bound). Branch-free (one unsigned compare per entry, OR-reduced)
// so the compiler vectorises it: the DCT kernels check 700 positions per row on every call, and a
// TORCH_CHECK per entry (a branch the loop cannot vectorise past) cost them ~9 us a call.
template <typename I>
inline bool all_below(const I* p, int64_t n, int64_t bound) {
  using U = std::make_unsigned_t<I>;
  U bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= U(U(p[i]) >= U(bound));
  return bad == 0;
}

// ``z`` is contiguous [N, D] float32/bfloat16 and every index in ``rows`` is inside it: the row indices.
inline const int64_t* checked_rows(const Tensor& z, const Tensor& rows) {
  TORCH_CHECK(z.dim() == 2 && z.is_contiguous() && is_served(z), "activations: contiguous [N, D] float32 or bfloat16");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous(), "rows/slots: int64");
  const int64_t* rp = rows.data_ptr<int64_t>();
  TORCH_CHECK(all_below(rp, rows.numel(), z.size(0)), "row index out of range");
  return rp;
}

struct RowSlots {
  const int64_t* row;
  const int64_t* slot;
};

// The above, and every row's slot is inside the stacked slot ``table`` [S, ...].
inline RowSlots checked_row_slots(const Tensor& z, const Tensor& rows, const Tensor& slots, const Tensor& table) {
  const int64_t* rp = checked_rows(z, rows);
  TORCH_CHECK(slots.scalar_type() == at::kLong, "rows/slots: int64");
  TORCH_CHECK(slots.is_contiguous() && rows.numel() == slots.numel(), "rows/slots: same length");
  TORCH_CHECK(table.is_contiguous() && is_served(table), "slot table: contiguous float32 or bfloat16");
  const int64_t* sp = slots.data_ptr<int64_t>();
  TORCH_CHECK(all_below(sp, slots.numel(), table.size(0)), "slot index out of range");
  return {rp, sp};
}

inline void check_same_type(const Tensor& x, const Tensor& y) {
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "x and y: the same dtype");
}

// Threads. A kernel splits its rows (or LoRA blocks) over torch's threads with ``at::parallel_for``
// once they are worth a thread each (about 32k multiply-adds: a prefill's rows, LoRA's blocks),
// and runs a decode step's few cheap rows on the calling thread. The threads are real only because
// the module is built with -fopenmp (server/kernels/__init__.py); before that every kernel ran on
// one thread. Spreading even a decode pool's 6 rows over 2 threads was measured (2026-12-03,
// docs/engine.md) and not kept: the rows' cold reads overlap, but the fork costs as much. What a
// decode step spreads instead is a projection's groups (plan_cpu.cpp, ``Lanes``).
// ``set_kernel_threads_(False)`` puts every kernel and lane on the calling thread, for benchmarks; each
// row being computed alone, the results are the same either way.
inline std::atomic<bool>& threads_switch() {
  static std::atomic<bool> on{true};
  return on;
}
bool set_kernel_threads_(bool on) { return threads_switch().exchange(on); }

// The grain of ``n`` independent items (a thread takes ``grain`` at least); all of them on the
// calling thread with the switch off.
inline int64_t work_grain(int64_t n, int64_t grain) {
  return threads_switch().load(std::memory_order_relaxed) ? std::max<int64_t>(1, grain) : std::max<int64_t>(1, n);
}

// Rows are independent: split them over threads (``work_grain``).
template <typename F>
void for_rows(int64_t n_rows, int64_t row_cost, const F& f) {
  const int64_t grain = work_grain(n_rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_cost)));
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) f(k);
  });
}

// ---- HUT, ETHER -------------------------------------------------------------------------------------

// HUT rank 1, input side: z[row] *= t[slot]   (t [S, D])
void scale_rows_(Tensor z, Tensor rows, Tensor slots, Tensor t) {
  const auto [rp, sp] = checked_row_slots(z, rows, slots, t);
  const int64_t d = z.size(1);
  TORCH_CHECK(t.dim() == 2 && t.size(1) == d, "HUT input scales: table must be [S, D] with D = the row width");
  with_types(z, t, [&](auto a, auto w) {
    using A = decltype(a);
    using W = decltype(w);
    A* zp = ptr<A>(z);
    const W* tp = ptr<W>(t);
    for_rows(rows.numel(), d, [&](int64_t k) {
      A* zr = zp + rp[k] * d;
      const W* tr = tp + sp[k] * d;
      for (int64_t i = 0; i < d; ++i) st(zr[i], ld(zr[i]) * ld(tr[i]));
    });
  });
}

// HUT rank 1, output side: y[row] = y[row] * t[slot, 0] + t[slot, 1]   (t [S, 2, D])
void scale_shift_rows_(Tensor y, Tensor rows, Tensor slots, Tensor t) {
  const auto [rp, sp] = checked_row_slots(y, rows, slots, t);
  const int64_t d = y.size(1);
  TORCH_CHECK(t.dim() == 3 && t.size(1) == 2 && t.size(2) == d,
              "HUT output scale/shift: table must be [S, 2, D] with D = the row width");
  with_types(y, t, [&](auto a, auto w) {
    using A = decltype(a);
    using W = decltype(w);
    A* yp = ptr<A>(y);
    const W* tp = ptr<W>(t);
    for_rows(rows.numel(), d, [&](int64_t k) {
      A* yr = yp + rp[k] * d;
      const W* g = tp + sp[k] * 2 * d;
      const W* b = g + d;
      for (int64_t i = 0; i < d; ++i) st(yr[i], ld(yr[i]) * ld(g[i]) + ld(b[i]));
    });
  });
}

// ETHER, block by block (t [S, n, b], n * b = D):  z_k -= 2 u (u . z_k)
// ETHER+ (t [S, 2, n, b] = (p0, p1)):              z_k -= 1/2 p1 (p0 . z_k) + 1/2 p0 (p1 . z_k)
void reflect_rows_(Tensor z, Tensor rows, Tensor slots, Tensor t) {
  const auto [rp, sp] = checked_row_slots(z, rows, slots, t);
  TORCH_CHECK(t.dim() == 3 || (t.dim() == 4 && t.size(1) == 2),
              "ETHER table must be [S, n, b] (ETHER) or [S, 2, n, b] (ETHER+)");
  const bool plus = t.dim() == 4;
  const int64_t d = z.size(1), n = t.size(-2), b = t.size(-1);
  TORCH_CHECK(n * b == d, "ETHER table blocks do not cover the row");
  const int64_t per_slot = plus ? 2 * d : d;
  with_types(z, t, [&](auto a, auto w) {
    using A = decltype(a);
    using W = decltype(w);
    A* zp = ptr<A>(z);
    const W* tp = ptr<W>(t);
    for_rows(rows.numel(), 4 * d, [&](int64_t k) {
      A* zr = zp + rp[k] * d;
      const W* p0 = tp + sp[k] * per_slot;
      for (int64_t blk = 0; blk < n; ++blk) {
        A* zb = zr + blk * b;
        const W* u = p0 + blk * b;
        if (!plus) {
          float s = 0.f;
          for (int64_t i = 0; i < b; ++i) s += ld(u[i]) * ld(zb[i]);
          const float c = -2.f * s;
          for (int64_t i = 0; i < b; ++i) st(zb[i], ld(zb[i]) + c * ld(u[i]));
        } else {
          const W* v = u + d;  // p1 of the same block
          float s0 = 0.f, s1 = 0.f;
          for (int64_t i = 0; i < b; ++i) {
            s0 += ld(u[i]) * ld(zb[i]);
            s1 += ld(v[i]) * ld(zb[i]);
          }
          const float c0 = -0.5f * s0, c1 = -0.5f * s1;
          for (int64_t i = 0; i < b; ++i) st(zb[i], ld(zb[i]) + c0 * ld(v[i]) + c1 * ld(u[i]));
        }
      }
    });
  });
}

// Fast paths: the hand-vectorised LoRA block (lora_avx512.cpp), used where the build has its
// instructions, and MKL's DFTI called directly by the spectral kernels (fft_cpu.cpp), used where
// torch carries MKL. Both are on by default; this switch turns them off together, so tests and
// benchmarks can run the portable code (and torch's FFT) on the same machine.
inline std::atomic<bool>& fast_paths_switch() {
  static std::atomic<bool> on{true};
  return on;
}
inline bool fast_paths_enabled() { return fast_paths_switch().load(std::memory_order_relaxed); }
bool set_fast_paths_(bool on) { return fast_paths_switch().exchange(on); }

}  // namespace facet

#include "lora_avx512.cpp"

namespace facet {

// ---- LoRA -------------------------------------------------------------------------------------------
// All of the pool's rows in one call, grouped by slot: rows of one slot go through the slot's
// factors together, up to kLoraBlock rows at a time, so each factor row is read (and widened) once
// per block instead of once per row. Per row the arithmetic is the plain one: h = A x (float32),
// then y += Σ_j h_j Bt_j accumulated in float32 and rounded once.
constexpr int kLoraBlock = 4;

template <int C, typename A, typename W>
void lora_block(const A* const* xs, A* const* ys, const W* ar, const W* br, int64_t r, int64_t in_f,
                int64_t out_f, float* h, float* acc) {
  for (int64_t j = 0; j < r; ++j) {
    const W* aj = ar + j * in_f;
    float s[C] = {};
    for (int64_t i = 0; i < in_f; ++i) {
      const float av = ld(aj[i]);
      for (int c = 0; c < C; ++c) s[c] += av * ld(xs[c][i]);
    }
    for (int c = 0; c < C; ++c) h[c * r + j] = s[c];
  }
  for (int c = 0; c < C; ++c)
    for (int64_t o = 0; o < out_f; ++o) acc[c * out_f + o] = ld(ys[c][o]);
  for (int64_t j = 0; j < r; ++j) {
    const W* bj = br + j * out_f;
    float hj[C];
    for (int c = 0; c < C; ++c) hj[c] = h[c * r + j];
    for (int64_t o = 0; o < out_f; ++o) {
      const float bv = ld(bj[o]);
      for (int c = 0; c < C; ++c) acc[c * out_f + o] += hj[c] * bv;
    }
  }
  for (int c = 0; c < C; ++c)
    for (int64_t o = 0; o < out_f; ++o) st(ys[c][o], acc[c * out_f + o]);
}

// LoRA: y[row] += (A[slot] x[row]) Bt[slot]   (A [S, r, in], Bt [S, r, out], scaling folded in)
void lora_add_(Tensor y, Tensor x, Tensor rows, Tensor slots, Tensor a, Tensor bt) {
  const auto [rp, sp] = checked_row_slots(y, rows, slots, a);
  checked_row_slots(x, rows, slots, bt);
  check_same_type(x, y);
  const int64_t in_f = x.size(1), out_f = y.size(1);
  TORCH_CHECK(a.dim() == 3 && a.size(2) == in_f, "LoRA A: table must be [S, r, in] with in = the input width");
  TORCH_CHECK(bt.dim() == 3 && bt.size(0) == a.size(0) && bt.size(1) == a.size(1) && bt.size(2) == out_f &&
                  bt.scalar_type() == a.scalar_type(),
              "LoRA Bt: table must be [S, r, out] with the S, r and dtype of A and out = the output width");
  const int64_t r = a.size(1), n_rows = rows.numel();
  // The pool's rows ordered by slot (stable), cut into blocks of one slot and <= kLoraBlock rows.
  // Into the thread's buffers, sorted by insertion for a decode pool's few rows: inside a step a
  // heap allocation meets a cold arena (this kernel runs 210 times a step).
  thread_local std::vector<int64_t> order_buffer, starts_buffer;
  std::vector<int64_t>& order = order_buffer;  // named references: the lambda below, which may run
  std::vector<int64_t>& starts = starts_buffer;  // on other threads, captures this thread's buffers
  order.resize(n_rows);
  for (int64_t k = 0; k < n_rows; ++k) order[k] = k;
  if (n_rows <= 64) {
    for (int64_t k = 1; k < n_rows; ++k)
      for (int64_t j = k; j > 0 && sp[order[j]] < sp[order[j - 1]]; --j) std::swap(order[j], order[j - 1]);
  } else {
    std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) { return sp[p] < sp[q]; });
  }
  starts.clear();
  for (int64_t k = 0; k < n_rows; ++k)
    if (k == 0 || sp[order[k]] != sp[order[k - 1]] || k - starts.back() == kLoraBlock) starts.push_back(k);
  starts.push_back(n_rows);
  const int64_t n_blocks = int64_t(starts.size()) - 1;
  const int64_t block_cost = kLoraBlock * r * (in_f + out_f);
  with_types(y, a, [&](auto a_, auto w_) {
    using A = decltype(a_);
    using W = decltype(w_);
    A* yp = ptr<A>(y);
    const A* xp = ptr<A>(x);
    const W* ap = ptr<W>(a);
    const W* bp = ptr<W>(bt);
    const int64_t grain = work_grain(n_blocks, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, block_cost)));
    at::parallel_for(0, n_blocks, grain, [&](int64_t begin, int64_t end) {
      thread_local std::vector<float> h, acc;  // each thread's own (chunks run on several)
      h.resize(size_t(kLoraBlock * r)), acc.resize(size_t(kLoraBlock * out_f));
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t first = starts[blk], count = starts[blk + 1] - first;
        const A* xs[kLoraBlock];
        A* ys[kLoraBlock];
        for (int64_t c = 0; c < count; ++c) {
          const int64_t row = rp[order[first + c]];
          xs[c] = xp + row * in_f;
          ys[c] = yp + row * out_f;
        }
        const int64_t slot = sp[order[first]];
        const W* ar = ap + slot * r * in_f;
        const W* br = bp + slot * r * out_f;
        if constexpr (std::is_same_v<A, bf16> && std::is_same_v<W, bf16>) {
          if (kHaveLoraAvx512 && fast_paths_enabled()) {
            switch (count) {
              case 4: lora_block_bf16<4>(xs, ys, ar, br, r, in_f, out_f, h.data()); break;
              case 3: lora_block_bf16<3>(xs, ys, ar, br, r, in_f, out_f, h.data()); break;
              case 2: lora_block_bf16<2>(xs, ys, ar, br, r, in_f, out_f, h.data()); break;
              default: lora_block_bf16<1>(xs, ys, ar, br, r, in_f, out_f, h.data()); break;
            }
            continue;
          }
        }
        switch (count) {
          case 4: lora_block<4>(xs, ys, ar, br, r, in_f, out_f, h.data(), acc.data()); break;
          case 3: lora_block<3>(xs, ys, ar, br, r, in_f, out_f, h.data(), acc.data()); break;
          case 2: lora_block<2>(xs, ys, ar, br, r, in_f, out_f, h.data(), acc.data()); break;
          default: lora_block<1>(xs, ys, ar, br, r, in_f, out_f, h.data(), acc.data()); break;
        }
      }
    });
  });
}

// ---- SURM Kronecker ---------------------------------------------------------------------------------

// Kronecker's two products for one row: t[q, r] = sum_s X[q, s] A[r, s] (``at`` = A transposed,
// [ia, f]), then acc[p, r] += sum_q B[p, q] t[q, r]. ``F`` > 0 fixes f at compile time: the inner
// loop over r is then a few whole vectors, and four rows of each product are computed together so
// every load of ``at`` or ``t`` feeds four FMAs: measured 3x the plain loops at f = 32, bf16, one
// thread (2026-12-03, AVX-512-BF16). Each value sums its terms in the plain
// loops' order (F = 0).
template <int F, typename A, typename W>
inline void kron_products(const A* xr, const float* __restrict__ at, const W* b, float* __restrict__ t,
                          float* __restrict__ acc, int64_t ia, int64_t ob, int64_t f_dyn = 0) {
  const int64_t f = F > 0 ? F : f_dyn;
  int64_t q = 0;
  if constexpr (F > 0) {
    for (; q + 4 <= f; q += 4) {
      float t0[F] = {}, t1[F] = {}, t2[F] = {}, t3[F] = {};
      for (int64_t s2 = 0; s2 < ia; ++s2) {
        const float* __restrict__ as = at + s2 * F;
        const float x0 = ld(xr[q * ia + s2]), x1 = ld(xr[(q + 1) * ia + s2]);
        const float x2 = ld(xr[(q + 2) * ia + s2]), x3 = ld(xr[(q + 3) * ia + s2]);
        for (int r = 0; r < F; ++r) {
          t0[r] += x0 * as[r];
          t1[r] += x1 * as[r];
          t2[r] += x2 * as[r];
          t3[r] += x3 * as[r];
        }
      }
      for (int r = 0; r < F; ++r) {
        t[q * F + r] = t0[r];
        t[(q + 1) * F + r] = t1[r];
        t[(q + 2) * F + r] = t2[r];
        t[(q + 3) * F + r] = t3[r];
      }
    }
  }
  for (; q < f; ++q) {
    float* __restrict__ tq = t + q * f;
    for (int64_t r = 0; r < f; ++r) tq[r] = 0.f;
    for (int64_t s2 = 0; s2 < ia; ++s2) {
      const float xv = ld(xr[q * ia + s2]);
      const float* __restrict__ as = at + s2 * f;
      for (int64_t r = 0; r < f; ++r) tq[r] += xv * as[r];
    }
  }
  int64_t p = 0;
  if constexpr (F > 0) {
    for (; p + 4 <= ob; p += 4) {
      float* __restrict__ a0 = acc + p * F;
      float c0[F], c1[F], c2[F], c3[F];
      for (int r = 0; r < F; ++r) {
        c0[r] = a0[r];
        c1[r] = a0[F + r];
        c2[r] = a0[2 * F + r];
        c3[r] = a0[3 * F + r];
      }
      for (int64_t qq = 0; qq < F; ++qq) {
        const float* __restrict__ tq = t + qq * F;
        const float b0 = ld(b[p * F + qq]), b1 = ld(b[(p + 1) * F + qq]);
        const float b2 = ld(b[(p + 2) * F + qq]), b3 = ld(b[(p + 3) * F + qq]);
        for (int r = 0; r < F; ++r) {
          c0[r] += b0 * tq[r];
          c1[r] += b1 * tq[r];
          c2[r] += b2 * tq[r];
          c3[r] += b3 * tq[r];
        }
      }
      for (int r = 0; r < F; ++r) {
        a0[r] = c0[r];
        a0[F + r] = c1[r];
        a0[2 * F + r] = c2[r];
        a0[3 * F + r] = c3[r];
      }
    }
  }
  for (; p < ob; ++p) {
    float* __restrict__ ap = acc + p * f;
    for (int64_t qq = 0; qq < f; ++qq) {
      const float bpq = ld(b[p * f + qq]);
      const float* __restrict__ tq = t + qq * f;
      for (int64_t r = 0; r < f; ++r) ap[r] += bpq * tq[r];
    }
  }
}

// SURM Kronecker: y[row] += ((B ⊗ A) x[row]); with X = x[row] viewed [f, in/f], the update is
// B (X Aᵀ) flattened [out/f, f]. ``ab [S, in + out]`` = [A.flatten(), alpha * B.flatten()].
void kronecker_add_(Tensor y, Tensor x, Tensor rows, Tensor slots, Tensor ab, int64_t f) {
  const auto [rp, sp] = checked_row_slots(y, rows, slots, ab);
  checked_row_slots(x, rows, slots, ab);
  check_same_type(x, y);
  const int64_t in_f = x.size(1), out_f = y.size(1);
  TORCH_CHECK(f > 0 && in_f % f == 0 && out_f % f == 0 && ab.dim() == 2 && ab.size(1) == in_f + out_f,
              "kronecker table shape: must be [S, in + out] with f dividing in and out");
  const int64_t ia = in_f / f, ob = out_f / f;
  with_types(y, ab, [&](auto a_, auto w_) {
    using A = decltype(a_);
    using W = decltype(w_);
    const A* xp = ptr<A>(x);
    const W* tp = ptr<W>(ab);
    A* yp = ptr<A>(y);
    for_rows(rows.numel(), f * (in_f + out_f), [&](int64_t k) {
      const A* xr = xp + rp[k] * in_f;
      const W* a = tp + sp[k] * (in_f + out_f);  // [f, in/f]
      const W* b = a + in_f;                      // [out/f, f]
      A* yr = yp + rp[k] * out_f;
      // Per-thread scratch, reused across rows and calls: widened A transposed (at[s, r]), the
      // products t[q, r] = sum_s X[q, s] A[r, s] and the output row in float32. Both products run
      // their inner loop over f contiguous values (vectorised) instead of short dot products.
      thread_local std::vector<float> scratch;
      scratch.resize(in_f + f * f + out_f);
      float* __restrict__ at = scratch.data();
      float* __restrict__ t = at + in_f;
      float* __restrict__ acc = t + f * f;
      for (int64_t r = 0; r < f; ++r)
        for (int64_t s2 = 0; s2 < ia; ++s2) at[s2 * f + r] = ld(a[r * ia + s2]);
      for (int64_t o = 0; o < out_f; ++o) acc[o] = ld(yr[o]);
      switch (f) {  // the widths the configs use, unrolled; any other f as written
        case 16: kron_products<16>(xr, at, b, t, acc, ia, ob); break;
        case 32: kron_products<32>(xr, at, b, t, acc, ia, ob); break;
        case 64: kron_products<64>(xr, at, b, t, acc, ia, ob); break;
        default: kron_products<0>(xr, at, b, t, acc, ia, ob, f); break;
      }
      for (int64_t o = 0; o < out_f; ++o) st(yr[o], acc[o]);
    });
  });
}

}  // namespace facet

// The spectral families (SURM circulant and Toeplitz, DCT): a second file of the same translation
// unit (one build; it uses the helpers above).
#include "spectral_cpu.cpp"

// One call per projection: the kernels above bound to their groups (Projection, NativeOp).
#include "plan_cpu.cpp"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace facet;
  // The GIL is released while a kernel runs (they touch no Python object), so the HTTP threads
  // and a fine-tune thread keep running, as they do during torch's own ops.
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("scale_rows_", &scale_rows_, "HUT r1 input scale (in place)", release());
  m.def("scale_shift_rows_", &scale_shift_rows_, "HUT r1 output scale and shift (in place)", release());
  m.def("reflect_rows_", &reflect_rows_, "ETHER / ETHER+ block reflections (in place)", release());
  m.def("lora_add_", &lora_add_, "LoRA delta added to y (in place)", release());
  m.def("set_fast_paths_", &set_fast_paths_, "fast paths on (True, the default) or off; returns the previous");
  m.def("set_kernel_threads_", &set_kernel_threads_,
        "kernels split their rows, and a projection its groups, over torch's threads (True, the default) "
        "or run on the calling thread; "
        "returns the previous");
  py::list fast;  // the fast paths this build has
  if (kHaveLoraAvx512) fast.append("lora_avx512");
  if (fft::have_dfti()) fast.append("mkl_dfti");
  m.attr("fast_paths") = py::tuple(fast);
  m.def("rfft_rows", &rfft_rows, "rfft of the given rows, zero-padded to n", release());
  m.def("circulant_apply_", &circulant_apply_, "SURM circulant delta added to y (in place)", release());
  m.def("toeplitz_apply_", &toeplitz_apply_, "SURM Toeplitz delta added to y (in place)", release());
  m.def("kronecker_add_", &kronecker_add_, "SURM Kronecker delta added to y (in place)", release());
  m.def("dct_spectrum", &dct_spectrum, "twiddled DCT spectrum of the given rows", release());
  m.def("dct_apply_", &dct_apply_, "DCT delta added to y (in place)", release());
  register_plans(m);
}
