// Fused CPU kernels for the on-the-fly adapter work of a mixed batch (float32).
//
// Each function does, in one call, what the family's torch code in server/methods/ does in 4-12
// small ops for the token rows of one slot pool: gather each row's slot parameters, apply them,
// write the result back into the batch's activations. At decode sizes (a few rows per pool) the
// cost of those small ops is their fixed overhead, not their arithmetic, so one loop per family
// is several times cheaper. The math is the same as the torch code; tests/methods/test_kernels.py
// checks every kernel against it.
//
// Conventions: ``z``, ``x``, ``y`` are contiguous [N, D] float32 activations of the whole step;
// ``rows`` [R] (int64) picks this pool's rows, ``slots`` [R] (int64) the slot of each row in the
// pool's stacked tables ``[S, ...]`` (contiguous float32). Functions ending in ``_`` write in place.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <vector>

namespace {

using torch::Tensor;

// Shapes, dtypes, every table width and every row/slot index are checked before any raw pointer
// is used: a wrong table raises a RuntimeError naming it instead of reading past its memory.

// ``z`` is contiguous [N, D] float32 and every index in ``rows`` is inside it: the row indices.
const int64_t* checked_rows(const Tensor& z, const Tensor& rows) {
  TORCH_CHECK(z.dim() == 2 && z.is_contiguous() && z.scalar_type() == at::kFloat, "activations: contiguous [N, D] float32");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous(), "rows/slots: int64");
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t k = 0; k < rows.numel(); ++k) TORCH_CHECK(rp[k] >= 0 && rp[k] < z.size(0), "row index out of range");
  return rp;
}

struct RowSlots {
  const int64_t* row;
  const int64_t* slot;
};

// The above, and every row's slot is inside the stacked slot ``table`` [S, ...].
RowSlots checked_row_slots(const Tensor& z, const Tensor& rows, const Tensor& slots, const Tensor& table) {
  const int64_t* rp = checked_rows(z, rows);
  TORCH_CHECK(slots.scalar_type() == at::kLong, "rows/slots: int64");
  TORCH_CHECK(slots.is_contiguous() && rows.numel() == slots.numel(), "rows/slots: same length");
  TORCH_CHECK(table.is_contiguous() && table.scalar_type() == at::kFloat, "slot table: contiguous float32");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t k = 0; k < slots.numel(); ++k) TORCH_CHECK(sp[k] >= 0 && sp[k] < table.size(0), "slot index out of range");
  return {rp, sp};
}

// Rows are independent: split them over threads when there are enough of them (prefill).
template <typename F>
void for_rows(int64_t n_rows, int64_t row_cost, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_cost));
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) f(k);
  });
}

// HUT rank 1, input side: z[row] *= t[slot]   (t [S, D])
void scale_rows_(Tensor z, Tensor rows, Tensor slots, Tensor t) {
  const auto [rp, sp] = checked_row_slots(z, rows, slots, t);
  const int64_t d = z.size(1);
  TORCH_CHECK(t.dim() == 2 && t.size(1) == d, "HUT input scales: table must be [S, D] with D = the row width");
  float* zp = z.data_ptr<float>();
  const float* tp = t.data_ptr<float>();
  for_rows(rows.numel(), d, [&](int64_t k) {
    float* zr = zp + rp[k] * d;
    const float* tr = tp + sp[k] * d;
    for (int64_t i = 0; i < d; ++i) zr[i] *= tr[i];
  });
}

// HUT rank 1, output side: y[row] = y[row] * t[slot, 0] + t[slot, 1]   (t [S, 2, D])
void scale_shift_rows_(Tensor y, Tensor rows, Tensor slots, Tensor t) {
  const auto [rp, sp] = checked_row_slots(y, rows, slots, t);
  const int64_t d = y.size(1);
  TORCH_CHECK(t.dim() == 3 && t.size(1) == 2 && t.size(2) == d,
              "HUT output scale/shift: table must be [S, 2, D] with D = the row width");
  float* yp = y.data_ptr<float>();
  const float* tp = t.data_ptr<float>();
  for_rows(rows.numel(), d, [&](int64_t k) {
    float* yr = yp + rp[k] * d;
    const float* g = tp + sp[k] * 2 * d;
    const float* b = g + d;
    for (int64_t i = 0; i < d; ++i) yr[i] = yr[i] * g[i] + b[i];
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
  float* zp = z.data_ptr<float>();
  const float* tp = t.data_ptr<float>();
  const int64_t per_slot = plus ? 2 * d : d;
  for_rows(rows.numel(), 4 * d, [&](int64_t k) {
    float* zr = zp + rp[k] * d;
    const float* p0 = tp + sp[k] * per_slot;
    for (int64_t blk = 0; blk < n; ++blk) {
      float* zb = zr + blk * b;
      const float* u = p0 + blk * b;
      if (!plus) {
        float s = 0.f;
        for (int64_t i = 0; i < b; ++i) s += u[i] * zb[i];
        const float c = -2.f * s;
        for (int64_t i = 0; i < b; ++i) zb[i] += c * u[i];
      } else {
        const float* v = u + d;  // p1 of the same block
        float s0 = 0.f, s1 = 0.f;
        for (int64_t i = 0; i < b; ++i) {
          s0 += u[i] * zb[i];
          s1 += v[i] * zb[i];
        }
        const float c0 = -0.5f * s0, c1 = -0.5f * s1;
        for (int64_t i = 0; i < b; ++i) zb[i] += c0 * v[i] + c1 * u[i];
      }
    }
  });
}

// LoRA: y[row] += (A[slot] x[row]) Bt[slot]   (A [S, r, in], Bt [S, r, out], scaling folded in)
void lora_add_(Tensor y, Tensor x, Tensor rows, Tensor slots, Tensor a, Tensor bt) {
  const auto [rp, sp] = checked_row_slots(y, rows, slots, a);
  checked_row_slots(x, rows, slots, bt);
  const int64_t in_f = x.size(1), out_f = y.size(1);
  TORCH_CHECK(a.dim() == 3 && a.size(2) == in_f, "LoRA A: table must be [S, r, in] with in = the input width");
  TORCH_CHECK(bt.dim() == 3 && bt.size(0) == a.size(0) && bt.size(1) == a.size(1) && bt.size(2) == out_f,
              "LoRA Bt: table must be [S, r, out] with the S and r of A and out = the output width");
  const int64_t r = a.size(1);
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* bp = bt.data_ptr<float>();
  for_rows(rows.numel(), r * (in_f + out_f), [&](int64_t k) {
    const float* xr = xp + rp[k] * in_f;
    float* yr = yp + rp[k] * out_f;
    const float* ar = ap + sp[k] * r * in_f;
    const float* br = bp + sp[k] * r * out_f;
    for (int64_t j = 0; j < r; ++j) {
      const float* aj = ar + j * in_f;
      float h = 0.f;
      for (int64_t i = 0; i < in_f; ++i) h += aj[i] * xr[i];
      const float* bj = br + j * out_f;
      for (int64_t o = 0; o < out_f; ++o) yr[o] += h * bj[o];
    }
  });
}

// Complex multiply of interleaved (re, im) arrays: a[i] *= b[i] for m bins.
inline void cmul_(float* a, const float* b, int64_t m) {
  for (int64_t i = 0; i < m; ++i) {
    const float re = a[2 * i] * b[2 * i] - a[2 * i + 1] * b[2 * i + 1];
    const float im = a[2 * i] * b[2 * i + 1] + a[2 * i + 1] * b[2 * i];
    a[2 * i] = re;
    a[2 * i + 1] = im;
  }
}

// The FFT families below work on chunks of rows: a decode step's few rows are one chunk on the
// calling thread, a prefill's many rows are split over the threads, 64 rows per chunk.
constexpr int64_t kRowsPerChunk = 64;

template <typename F>
void for_row_chunks(int64_t n_rows, const F& f) {
  if (n_rows == 0) return;
  at::parallel_for(0, n_rows, std::min(n_rows, kRowsPerChunk), [&](int64_t begin, int64_t end) { f(begin, end); });
}

// torch's CPU FFT is MKL's, which splits even a 6-row transform over every thread: measured on
// 2 cores, 1.8x slower than one thread. While a chunk runs, MKL is told to use this thread only
// (a thread-local setting; the base model's GEMMs elsewhere keep all threads). The symbol is
// weak: torch builds without MKL (e.g. aarch64) simply skip this.
// (MKL's C API name; the lower-case symbol is its Fortran by-reference twin.)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

struct SingleThreadedFFT {
  int previous = 0;
  SingleThreadedFFT() {
    if (MKL_Set_Num_Threads_Local != nullptr) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedFFT() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous);
  }
};

// The FFT families come in two halves: the spectrum of the pool's input rows, which sibling
// projections reading the same activations (q/k/v, gate/up) share (fast.py keeps it for the
// step), and the per-projection apply. Row k of a spectrum belongs to rows[k].

void check_spectrum(const Tensor& f, const Tensor& rows, int64_t m) {
  TORCH_CHECK(f.dim() == 3 && f.is_contiguous() && f.scalar_type() == at::kFloat && f.size(0) == rows.numel() &&
                  f.size(1) == m && f.size(2) == 2, "spectrum does not match the rows");
}

// rfft of x[rows], each row zero-padded to n (SURM: n = N for circulant, L for Toeplitz).
Tensor rfft_rows(Tensor x, Tensor rows, int64_t n) {
  const int64_t* rp = checked_rows(x, rows);
  const int64_t in_f = x.size(1), m = n / 2 + 1, rcount = rows.numel();
  TORCH_CHECK(n >= in_f, "FFT length shorter than the row");
  auto out = torch::empty({rcount, m, 2}, x.options());
  const float* xp = x.data_ptr<float>();
  for_row_chunks(rcount, [&](int64_t begin, int64_t end) {
    SingleThreadedFFT one_thread;
    const int64_t rc = end - begin;
    auto buf = torch::zeros({rc, n}, x.options());
    float* bp = buf.data_ptr<float>();
    for (int64_t k = 0; k < rc; ++k) {
      const float* xr = xp + rp[begin + k] * in_f;
      std::copy(xr, xr + in_f, bp + k * n);
    }
    out.narrow(0, begin, rc).copy_(at::view_as_real(at::fft_rfft(buf, n, 1)));
  });
  return out;
}

// SURM circulant: y[row] += irfft(f[row] * spec[slot], N)[:out]   (spec [S, N/2+1, 2])
void circulant_apply_(Tensor y, Tensor f, Tensor rows, Tensor slots, Tensor spec, int64_t n) {
  const auto [rp, sp] = checked_row_slots(y, rows, slots, spec);
  const int64_t out_f = y.size(1), m = n / 2 + 1;
  TORCH_CHECK(spec.dim() == 3 && spec.size(1) == m && spec.size(2) == 2 && n >= out_f,
              "circulant spectrum has the wrong length: table must be [S, N/2+1, 2], N >= out");
  check_spectrum(f, rows, m);
  const float* cp = spec.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_row_chunks(rows.numel(), [&](int64_t begin, int64_t end) {
    SingleThreadedFFT one_thread;
    const int64_t rc = end - begin;
    Tensor prod = f.narrow(0, begin, rc).clone();  // the shared spectrum stays intact
    float* fp = prod.data_ptr<float>();
    for (int64_t k = 0; k < rc; ++k) cmul_(fp + k * 2 * m, cp + sp[begin + k] * 2 * m, m);
    Tensor out = at::fft_irfft(at::view_as_complex(prod), n, 1).contiguous();  // [rc, N]
    const float* op = out.data_ptr<float>();
    for (int64_t k = 0; k < rc; ++k) {
      float* yr = yp + rp[begin + k] * out_f;
      const float* orow = op + k * n;
      for (int64_t o = 0; o < out_f; ++o) yr[o] += orow[o];
    }
  });
}

// SURM Toeplitz: y[row] += (T(b) T(a) x[row])[:out], each T(v) applied as the top-left block of a
// length-L circulant with a real spectrum; ``f`` = rfft_rows(x, rows, L). ``spec [S, 2, L/2+1, 2]``:
// the real spectra of a and of alpha*b, each value duplicated for the (re, im) pair it scales.
void toeplitz_apply_(Tensor y, Tensor f, Tensor rows, Tensor slots, Tensor spec, int64_t n, int64_t length) {
  const auto [rp, sp] = checked_row_slots(y, rows, slots, spec);
  const int64_t out_f = y.size(1), m = length / 2 + 1;
  TORCH_CHECK(spec.dim() == 4 && spec.size(1) == 2 && spec.size(2) == m && spec.size(3) == 2 && length >= 2 * n - 1 &&
                  n >= out_f, "toeplitz spectra have the wrong shape");
  check_spectrum(f, rows, m);
  const float* cp = spec.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_row_chunks(rows.numel(), [&](int64_t begin, int64_t end) {
    SingleThreadedFFT one_thread;
    const int64_t rc = end - begin;
    Tensor cur = f.narrow(0, begin, rc).clone();
    Tensor buf;
    for (int64_t factor = 0; factor < 2; ++factor) {  // T(a) first, then T(b)
      if (factor == 1) cur = at::view_as_real(at::fft_rfft(buf, length, 1)).contiguous();
      float* fp = cur.data_ptr<float>();
      for (int64_t k = 0; k < rc; ++k) {
        const float* c = cp + (sp[begin + k] * 2 + factor) * 2 * m;
        float* fr = fp + k * 2 * m;
        for (int64_t i = 0; i < 2 * m; ++i) fr[i] *= c[i];
      }
      buf = at::fft_irfft(at::view_as_complex(cur), length, 1).contiguous();  // [rc, L]
      if (factor == 0) buf.narrow(1, n, length - n).zero_();  // keep T(a) x: the first N entries
    }
    const float* op = buf.data_ptr<float>();
    for (int64_t k = 0; k < rc; ++k) {
      float* yr = yp + rp[begin + k] * out_f;
      const float* orow = op + k * length;
      for (int64_t o = 0; o < out_f; ++o) yr[o] += orow[o];
    }
  });
}

// SURM Kronecker: y[row] += ((B ⊗ A) x[row]); with X = x[row] viewed [f, in/f], the update is
// B (X Aᵀ) flattened [out/f, f]. ``ab [S, in + out]`` = [A.flatten(), alpha * B.flatten()].
void kronecker_add_(Tensor y, Tensor x, Tensor rows, Tensor slots, Tensor ab, int64_t f) {
  const auto [rp, sp] = checked_row_slots(y, rows, slots, ab);
  checked_row_slots(x, rows, slots, ab);
  const int64_t in_f = x.size(1), out_f = y.size(1);
  TORCH_CHECK(f > 0 && in_f % f == 0 && out_f % f == 0 && ab.dim() == 2 && ab.size(1) == in_f + out_f,
              "kronecker table shape: must be [S, in + out] with f dividing in and out");
  const int64_t ia = in_f / f, ob = out_f / f;
  const float* xp = x.data_ptr<float>();
  const float* tp = ab.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_rows(rows.numel(), f * (in_f + out_f), [&](int64_t k) {
    const float* xr = xp + rp[k] * in_f;
    const float* a = tp + sp[k] * (in_f + out_f);  // [f, in/f]
    const float* b = a + in_f;                      // [out/f, f]
    float* yr = yp + rp[k] * out_f;
    std::vector<float> t(f * f);  // t[q, r] = sum_s X[q, s] A[r, s]
    for (int64_t q = 0; q < f; ++q)
      for (int64_t r = 0; r < f; ++r) {
        float acc = 0.f;
        for (int64_t s2 = 0; s2 < ia; ++s2) acc += xr[q * ia + s2] * a[r * ia + s2];
        t[q * f + r] = acc;
      }
    for (int64_t p = 0; p < ob; ++p)
      for (int64_t q = 0; q < f; ++q) {
        const float bpq = b[p * f + q];
        for (int64_t r = 0; r < f; ++r) yr[p * f + r] += bpq * t[q * f + r];
      }
  });
}

// DCT (sDCTFT): y[row] += alpha z C_out with z[u_j] += c_j (x C_in^T)[v_j], both transforms as
// length-N real FFTs (Makhoul). Plan tensors: ``perm_in [in]``, ``fwd_in [in/2+1, 2]`` (twiddle),
// ``inv_out [out/2+1, 2]``, ``unperm_out [out]``.

// The twiddled spectrum of x[rows] in Makhoul's order: x_hat[v] sits at flat slot v (see dct.py).
Tensor dct_spectrum(Tensor x, Tensor rows, Tensor perm_in, Tensor fwd_in) {
  const int64_t* rp = checked_rows(x, rows);
  const int64_t in_f = x.size(1), m_in = in_f / 2 + 1, rcount = rows.numel();
  TORCH_CHECK(perm_in.scalar_type() == at::kLong && perm_in.is_contiguous() && perm_in.numel() == in_f &&
                  fwd_in.scalar_type() == at::kFloat && fwd_in.is_contiguous() && fwd_in.numel() == 2 * m_in,
              "dct plan does not match the layer");
  const int64_t* pin = perm_in.data_ptr<int64_t>();
  for (int64_t i = 0; i < in_f; ++i) TORCH_CHECK(pin[i] >= 0 && pin[i] < in_f, "dct plan permutation out of range");
  auto out = torch::empty({rcount, m_in, 2}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* fwd = fwd_in.data_ptr<float>();
  for_row_chunks(rcount, [&](int64_t begin, int64_t end) {
    SingleThreadedFFT one_thread;
    const int64_t rc = end - begin;
    auto buf = torch::empty({rc, in_f}, x.options());
    float* bp = buf.data_ptr<float>();
    for (int64_t k = 0; k < rc; ++k) {
      const float* xr = xp + rp[begin + k] * in_f;
      for (int64_t i = 0; i < in_f; ++i) bp[k * in_f + i] = xr[pin[i]];
    }
    Tensor spec = out.narrow(0, begin, rc);
    spec.copy_(at::view_as_real(at::fft_rfft(buf, c10::nullopt, 1)));
    float* fp = spec.data_ptr<float>();
    for (int64_t k = 0; k < rc; ++k) cmul_(fp + k * 2 * m_in, fwd, m_in);
  });
  return out;
}

// ``pos [S, 2, n]`` = flat spectrum slots of v_j (input) and u_j (output), ``coef [S, n]`` with every
// per-position constant folded in (see dct.py prepare).
void dct_apply_(Tensor y, Tensor spec, Tensor rows, Tensor slots, Tensor pos, Tensor coef, Tensor inv_out,
                Tensor unperm_out) {
  const auto [rp, sp] = checked_row_slots(y, rows, slots, coef);
  TORCH_CHECK(coef.dim() == 2, "dct coefficients: table must be [S, n]");
  const int64_t out_f = y.size(1), npos = coef.size(1), m_out = out_f / 2 + 1;
  TORCH_CHECK(spec.dim() == 3, "dct spectrum: [R, in/2+1, 2]");
  const int64_t m_in = spec.size(1);
  check_spectrum(spec, rows, m_in);
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.is_contiguous() && pos.size(0) == coef.size(0) &&
                  pos.size(1) == 2 && pos.size(2) == npos, "dct positions: contiguous int64 [S, 2, n]");
  TORCH_CHECK(unperm_out.scalar_type() == at::kLong && unperm_out.is_contiguous() && unperm_out.numel() == out_f &&
                  inv_out.scalar_type() == at::kFloat && inv_out.is_contiguous() && inv_out.numel() == 2 * m_out,
              "dct plan does not match the layer");
  const int64_t* unp = unperm_out.data_ptr<int64_t>();
  for (int64_t o = 0; o < out_f; ++o) TORCH_CHECK(unp[o] >= 0 && unp[o] < out_f, "dct plan permutation out of range");
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t k = 0; k < rows.numel(); ++k) {
    const int64_t* pk = pp + sp[k] * 2 * npos;
    for (int64_t j = 0; j < npos; ++j)
      TORCH_CHECK(pk[j] >= 0 && pk[j] < 2 * m_in && pk[npos + j] >= 0 && pk[npos + j] < 2 * m_out,
                  "dct position out of range");
  }
  const float* cp = coef.data_ptr<float>();
  const float* fp = spec.data_ptr<float>();
  const float* inv = inv_out.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_row_chunks(rows.numel(), [&](int64_t begin, int64_t end) {
    SingleThreadedFFT one_thread;
    const int64_t rc = end - begin;
    // z[u_j] += c_j x_hat[v_j] in the output spectrum's slots, then the inverse twiddle.
    auto outs = torch::zeros({rc, m_out, 2}, y.options());
    float* op = outs.data_ptr<float>();
    for (int64_t k = 0; k < rc; ++k) {
      const int64_t slot = sp[begin + k];
      const int64_t* pv = pp + slot * 2 * npos;
      const int64_t* pu = pv + npos;
      const float* c = cp + slot * npos;
      const float* src = fp + (begin + k) * 2 * m_in;
      float* dst = op + k * 2 * m_out;
      for (int64_t j = 0; j < npos; ++j) dst[pu[j]] += c[j] * src[pv[j]];
      cmul_(dst, inv, m_out);
    }
    // irfft, back to natural order, added to y.
    Tensor back = at::fft_irfft(at::view_as_complex(outs), out_f, 1).contiguous();  // [rc, out]
    const float* bk = back.data_ptr<float>();
    for (int64_t k = 0; k < rc; ++k) {
      float* yr = yp + rp[begin + k] * out_f;
      const float* br = bk + k * out_f;
      for (int64_t o = 0; o < out_f; ++o) yr[o] += br[unp[o]];
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while a kernel runs (they touch no Python object), so the HTTP threads
  // and a fine-tune thread keep running, as they do during torch's own ops.
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("scale_rows_", &scale_rows_, "HUT r1 input scale (in place)", release());
  m.def("scale_shift_rows_", &scale_shift_rows_, "HUT r1 output scale and shift (in place)", release());
  m.def("reflect_rows_", &reflect_rows_, "ETHER / ETHER+ block reflections (in place)", release());
  m.def("lora_add_", &lora_add_, "LoRA delta added to y (in place)", release());
  m.def("rfft_rows", &rfft_rows, "rfft of the given rows, zero-padded to n", release());
  m.def("circulant_apply_", &circulant_apply_, "SURM circulant delta added to y (in place)", release());
  m.def("toeplitz_apply_", &toeplitz_apply_, "SURM Toeplitz delta added to y (in place)", release());
  m.def("kronecker_add_", &kronecker_add_, "SURM Kronecker delta added to y (in place)", release());
  m.def("dct_spectrum", &dct_spectrum, "twiddled DCT spectrum of the given rows", release());
  m.def("dct_apply_", &dct_apply_, "DCT delta added to y (in place)", release());
}
