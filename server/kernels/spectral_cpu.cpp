// The spectral families' CPU kernels (float32 and bfloat16 activations, float32 spectra): SURM
// circulant and Toeplitz, DCT. Not compiled on its own: adapters_cpu.cpp includes it after its
// shared helpers (element types, checks, row loops), so the kernels stay one translation unit and
// one build. Conventions as in adapters_cpu.cpp. The transforms are fft_cpu.cpp's (MKL's DFTI on
// raw buffers; scratch buffers per thread), so a call makes no ATen op but the spectrum it returns.

#include "fft_cpu.cpp"

namespace facet {

namespace {

// Complex multiply of interleaved (re, im) arrays: a[i] *= b[i] for m bins.
template <typename W>
inline void cmul_(float* a, const W* b, int64_t m) {
  for (int64_t i = 0; i < m; ++i) {
    const float br = ld(b[2 * i]), bi = ld(b[2 * i + 1]);
    const float re = a[2 * i] * br - a[2 * i + 1] * bi;
    const float im = a[2 * i] * bi + a[2 * i + 1] * br;
    a[2 * i] = re;
    a[2 * i + 1] = im;
  }
}

// y[row] += v (float32), rounded once in y's dtype.
template <typename A>
inline void add_row(A* yr, const float* v, int64_t n) {
  for (int64_t o = 0; o < n; ++o) st(yr[o], ld(yr[o]) + v[o]);
}

// The FFT families below work on chunks of rows: a decode step's few rows are one chunk on the
// calling thread, a prefill's many rows are split over the threads, 64 rows per chunk.
constexpr int64_t kRowsPerChunk = 64;

template <typename F>
void for_row_chunks(int64_t n_rows, const F& f) {
  if (n_rows == 0) return;
  at::parallel_for(0, n_rows, work_grain(n_rows, std::min(n_rows, kRowsPerChunk)),
                   [&](int64_t begin, int64_t end) { f(begin, end); });
}

// torch's CPU FFT is MKL's, which splits even a 6-row transform over every thread: measured on
// 2 cores, 1.8x slower than one thread. While a chunk runs, MKL is told to use this thread only
// (a thread-local setting; the base model's GEMMs elsewhere keep all threads). The symbol is
// weak: torch builds without MKL (e.g. aarch64) simply skip this.
// (MKL's C API name; the lower-case symbol is its Fortran by-reference twin.)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

struct SingleThreadedFFT {
  // Only torch's FFT needs telling: DFTI's plans here are single-threaded (fft_cpu.cpp), and the
  // call is not free inside a step (MKL's thread-local service state is cold there).
  const bool needed = MKL_Set_Num_Threads_Local != nullptr && !(fft::have_dfti() && fast_paths_enabled());
  int previous = 0;
  SingleThreadedFFT() {
    if (needed) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedFFT() {
    if (needed) MKL_Set_Num_Threads_Local(previous);
  }
};

// The FFT families come in two halves: the spectrum of the pool's input rows, which sibling
// projections reading the same activations (q/k/v, gate/up) share (fast.py keeps it for the
// step), and the per-projection apply. Row k of a spectrum belongs to rows[k]. Spectra are
// float32 whatever the activations' dtype (the torch code's FFTs are float32 as well).

void check_spectrum(const Tensor& f, const Tensor& rows, int64_t m) {
  TORCH_CHECK(f.dim() == 3 && f.is_contiguous() && f.scalar_type() == at::kFloat && f.size(0) == rows.numel() &&
                  f.size(1) == m && f.size(2) == 2, "spectrum does not match the rows");
}

at::TensorOptions f32(const Tensor& t) { return t.options().dtype(at::kFloat); }

// A spectrum's output [R, m, 2]: ``reuse`` where it is one of that shape that nothing else holds
// (``Spectra`` hands back its previous input's spectrum, see plan_cpu.cpp), a new tensor otherwise.
// A decode step makes ~240 spectra, each a 15-45 KB allocation from a fragmented heap; measured in
// the step's profile at several microseconds each.
Tensor spectrum_out(const Tensor& reuse, const Tensor& x, int64_t rcount, int64_t m) {
  if (reuse.defined() && reuse.dim() == 3 && reuse.size(0) == rcount && reuse.size(1) == m && reuse.size(2) == 2 &&
      reuse.scalar_type() == at::kFloat && reuse.device() == x.device() && reuse.is_contiguous() &&
      reuse.use_count() == 1 && reuse.storage().use_count() == 1)
    return reuse;
  return torch::empty({rcount, m, 2}, f32(x));
}

// a[i] = b[i] * c[i], complex, m interleaved (re, im) bins; ``a`` may not alias ``b``.
template <typename W>
inline void cmul_to(float* a, const float* b, const W* c, int64_t m) {
  for (int64_t i = 0; i < m; ++i) {
    const float cr = ld(c[2 * i]), ci = ld(c[2 * i + 1]);
    a[2 * i] = b[2 * i] * cr - b[2 * i + 1] * ci;
    a[2 * i + 1] = b[2 * i] * ci + b[2 * i + 1] * cr;
  }
}

}  // namespace

// rfft of x[rows], each row zero-padded to n (SURM: n = N for circulant, L for Toeplitz).
// ``reuse``: see spectrum_out.
Tensor rfft_rows_into(const Tensor& reuse, const Tensor& x, const Tensor& rows, int64_t n) {
  const int64_t* rp = checked_rows(x, rows);
  const int64_t in_f = x.size(1), m = n / 2 + 1, rcount = rows.numel();
  TORCH_CHECK(n >= in_f, "FFT length shorter than the row");
  Tensor out = spectrum_out(reuse, x, rcount, m);
  with_act_type(x, [&](auto a) {
    using A = decltype(a);
    const A* xp = ptr<A>(x);
    float* op = out.data_ptr<float>();
    for_row_chunks(rcount, [&](int64_t begin, int64_t end) {
      SingleThreadedFFT one_thread;
      const int64_t rc = end - begin;
      float* bp = fft::scratch(0, rc * n);
      for (int64_t k = 0; k < rc; ++k) {
        const A* xr = xp + rp[begin + k] * in_f;
        for (int64_t i = 0; i < in_f; ++i) bp[k * n + i] = ld(xr[i]);
        for (int64_t i = in_f; i < n; ++i) bp[k * n + i] = 0.f;
      }
      fft::rfft(bp, n, n, rc, op + begin * 2 * m, 2 * m);
    });
  });
  return out;
}

Tensor rfft_rows(Tensor x, Tensor rows, int64_t n) { return rfft_rows_into(Tensor(), x, rows, n); }

// SURM circulant: y[row] += irfft(f[row] * spec[slot], N)[:out]   (spec [S, N/2+1, 2])
void circulant_apply_(Tensor y, Tensor f, Tensor rows, Tensor slots, Tensor spec, int64_t n) {
  const auto [rp, sp] = checked_row_slots(y, rows, slots, spec);
  const int64_t out_f = y.size(1), m = n / 2 + 1;
  TORCH_CHECK(spec.dim() == 3 && spec.size(1) == m && spec.size(2) == 2 && n >= out_f,
              "circulant spectrum has the wrong length: table must be [S, N/2+1, 2], N >= out");
  check_spectrum(f, rows, m);
  with_types(y, spec, [&](auto a, auto w) {
    using A = decltype(a);
    using W = decltype(w);
    const W* cp = ptr<W>(spec);
    A* yp = ptr<A>(y);
    for_row_chunks(rows.numel(), [&](int64_t begin, int64_t end) {
      SingleThreadedFFT one_thread;
      const int64_t rc = end - begin;
      float* fp = fft::scratch(0, rc * 2 * m);  // the product; the shared spectrum stays intact
      const float* fin = f.data_ptr<float>() + begin * 2 * m;
      for (int64_t k = 0; k < rc; ++k) cmul_to(fp + k * 2 * m, fin + k * 2 * m, cp + sp[begin + k] * 2 * m, m);
      float* op = fft::scratch(1, rc * n);
      fft::irfft(fp, 2 * m, n, rc, op, n);
      for (int64_t k = 0; k < rc; ++k) add_row(yp + rp[begin + k] * out_f, op + k * n, out_f);
    });
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
  with_types(y, spec, [&](auto a, auto w) {
    using A = decltype(a);
    using W = decltype(w);
    const W* cp = ptr<W>(spec);
    A* yp = ptr<A>(y);
    for_row_chunks(rows.numel(), [&](int64_t begin, int64_t end) {
      SingleThreadedFFT one_thread;
      const int64_t rc = end - begin;
      float* cur = fft::scratch(0, rc * 2 * m);
      std::memcpy(cur, f.data_ptr<float>() + begin * 2 * m, sizeof(float) * rc * 2 * m);
      float* buf = fft::scratch(1, rc * length);
      for (int64_t factor = 0; factor < 2; ++factor) {  // T(a) first, then T(b)
        if (factor == 1) fft::rfft(buf, length, length, rc, cur, 2 * m);
        for (int64_t k = 0; k < rc; ++k) {
          const W* c = cp + (sp[begin + k] * 2 + factor) * 2 * m;
          float* fr = cur + k * 2 * m;
          for (int64_t i = 0; i < 2 * m; ++i) fr[i] *= ld(c[i]);
        }
        fft::irfft(cur, 2 * m, length, rc, buf, length);  // [rc, L]
        if (factor == 0)  // keep T(a) x: the first N entries
          for (int64_t k = 0; k < rc; ++k) std::fill(buf + k * length + n, buf + (k + 1) * length, 0.f);
      }
      for (int64_t k = 0; k < rc; ++k) add_row(yp + rp[begin + k] * out_f, buf + k * length, out_f);
    });
  });
}

// DCT (sDCTFT): y[row] += alpha z C_out with z[u_j] += c_j (x C_in^T)[v_j], both transforms as
// length-N real FFTs (Makhoul). Plan tensors (float32): ``perm_in [in]``, ``fwd_in [in/2+1, 2]``
// (twiddle), ``inv_out [out/2+1, 2]``, ``unperm_out [out]``.

// The twiddled spectrum of x[rows] in Makhoul's order: x_hat[v] sits at flat slot v (see dct.py).
Tensor dct_spectrum_into(const Tensor& reuse, const Tensor& x, const Tensor& rows, const Tensor& perm_in,
                         const Tensor& fwd_in) {
  const int64_t* rp = checked_rows(x, rows);
  const int64_t in_f = x.size(1), m_in = in_f / 2 + 1, rcount = rows.numel();
  TORCH_CHECK(perm_in.scalar_type() == at::kLong && perm_in.is_contiguous() && perm_in.numel() == in_f &&
                  fwd_in.scalar_type() == at::kFloat && fwd_in.is_contiguous() && fwd_in.numel() == 2 * m_in,
              "dct plan does not match the layer");
  const int64_t* pin = perm_in.data_ptr<int64_t>();
  TORCH_CHECK(all_below(pin, in_f, in_f), "dct plan permutation out of range");
  Tensor out = spectrum_out(reuse, x, rcount, m_in);
  const float* fwd = fwd_in.data_ptr<float>();
  with_act_type(x, [&](auto a) {
    using A = decltype(a);
    const A* xp = ptr<A>(x);
    for_row_chunks(rcount, [&](int64_t begin, int64_t end) {
      SingleThreadedFFT one_thread;
      const int64_t rc = end - begin;
      float* bp = fft::scratch(0, rc * in_f);
      for (int64_t k = 0; k < rc; ++k) {
        const A* xr = xp + rp[begin + k] * in_f;
        for (int64_t i = 0; i < in_f; ++i) bp[k * in_f + i] = ld(xr[pin[i]]);
      }
      float* fp = out.data_ptr<float>() + begin * 2 * m_in;
      fft::rfft(bp, in_f, in_f, rc, fp, 2 * m_in);
      for (int64_t k = 0; k < rc; ++k) cmul_(fp + k * 2 * m_in, fwd, m_in);
    });
  });
  return out;
}

Tensor dct_spectrum(Tensor x, Tensor rows, Tensor perm_in, Tensor fwd_in) {
  return dct_spectrum_into(Tensor(), x, rows, perm_in, fwd_in);
}

// ``pos [S, 2, n]`` (int32) = flat spectrum slots of v_j (input) and u_j (output), ``coef [S, n]`` with every
// per-position constant folded in (see dct.py prepare).
void dct_apply_(Tensor y, Tensor spec, Tensor rows, Tensor slots, Tensor pos, Tensor coef, Tensor inv_out,
                Tensor unperm_out) {
  const auto [rp, sp] = checked_row_slots(y, rows, slots, coef);
  TORCH_CHECK(coef.dim() == 2, "dct coefficients: table must be [S, n]");
  const int64_t out_f = y.size(1), npos = coef.size(1), m_out = out_f / 2 + 1;
  TORCH_CHECK(spec.dim() == 3, "dct spectrum: [R, in/2+1, 2]");
  const int64_t m_in = spec.size(1);
  check_spectrum(spec, rows, m_in);
  TORCH_CHECK(pos.scalar_type() == at::kInt && pos.is_contiguous() && pos.size(0) == coef.size(0) &&
                  pos.size(1) == 2 && pos.size(2) == npos, "dct positions: contiguous int32 [S, 2, n]");
  TORCH_CHECK(unperm_out.scalar_type() == at::kLong && unperm_out.is_contiguous() && unperm_out.numel() == out_f &&
                  inv_out.scalar_type() == at::kFloat && inv_out.is_contiguous() && inv_out.numel() == 2 * m_out,
              "dct plan does not match the layer");
  const int64_t* unp = unperm_out.data_ptr<int64_t>();
  TORCH_CHECK(all_below(unp, out_f, out_f), "dct plan permutation out of range");
  const int32_t* pp = pos.data_ptr<int32_t>();
  for (int64_t k = 0; k < rows.numel(); ++k) {
    const int32_t* pk = pp + sp[k] * 2 * npos;
    TORCH_CHECK(all_below(pk, npos, 2 * m_in) && all_below(pk + npos, npos, 2 * m_out), "dct position out of range");
  }
  const float* fp = spec.data_ptr<float>();
  const float* inv = inv_out.data_ptr<float>();
  with_types(y, coef, [&](auto a, auto w) {
    using A = decltype(a);
    using W = decltype(w);
    const W* cp = ptr<W>(coef);
    A* yp = ptr<A>(y);
    for_row_chunks(rows.numel(), [&](int64_t begin, int64_t end) {
      SingleThreadedFFT one_thread;
      const int64_t rc = end - begin;
      // z[u_j] += c_j x_hat[v_j] in the output spectrum's slots, then the inverse twiddle.
      float* op = fft::scratch(0, rc * 2 * m_out);
      std::fill(op, op + rc * 2 * m_out, 0.f);
      for (int64_t k = 0; k < rc; ++k) {
        const int64_t slot = sp[begin + k];
        const int32_t* pv = pp + slot * 2 * npos;
        const int32_t* pu = pv + npos;
        const W* c = cp + slot * npos;
        const float* src = fp + (begin + k) * 2 * m_in;
        float* dst = op + k * 2 * m_out;
        for (int64_t j = 0; j < npos; ++j) dst[pu[j]] += ld(c[j]) * src[pv[j]];
        cmul_(dst, inv, m_out);
      }
      // irfft, back to natural order, added to y.
      float* bk = fft::scratch(1, rc * out_f);
      fft::irfft(op, 2 * m_out, out_f, rc, bk, out_f);
      for (int64_t k = 0; k < rc; ++k) {
        A* yr = yp + rp[begin + k] * out_f;
        const float* br = bk + k * out_f;
        for (int64_t o = 0; o < out_f; ++o) st(yr[o], ld(yr[o]) + br[unp[o]]);
      }
    });
  });
}

}  // namespace facet
