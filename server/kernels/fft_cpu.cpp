// Real FFTs of a few rows for the spectral kernels (spectral_cpu.cpp includes this file), called
// on raw float32 buffers: MKL's DFTI directly where torch's build carries it (the x86-64 wheels do,
// and export its C API) and the fast paths are on (``set_fast_paths_``), torch's own FFT otherwise.
//
// Why not at::fft_rfft: inside a decode step every ATen op runs with cold caches (the base GEMMs
// before it have streamed hundreds of MB of weights), and an at::fft call is several ops (plan
// cache lookup, output allocation, the transform, a copy). Measured on 6 rows of 576 after four
// bf16 GEMMs of 1536x576: at::fft_rfft plus its copy 51.6 us, DftiComputeForward on the same rows
// 5.6 us (warm: 11.9 vs 3.5 us), bit for bit the same result (the same MKL code).
//
// Plans: one committed descriptor per (length, direction) and thread, made on first use and kept
// (a thread's plans are freed when it exits). A descriptor transforms one row; a call loops over
// its rows. Every plan is single-threaded (DFTI_THREAD_LIMIT 1): the callers split rows over
// threads themselves.

namespace facet {

extern "C" {
// MKL's DFTI C API (mkl_dfti.h), declared weak: absent symbols are null and the ATen path runs.
long DftiCreateDescriptor_s_1d(void** handle, int domain, long length) __attribute__((weak));
long DftiSetValue(void* handle, int param, ...) __attribute__((weak));
long DftiCommitDescriptor(void* handle) __attribute__((weak));
long DftiComputeForward(void* handle, void* in, ...) __attribute__((weak));
long DftiComputeBackward(void* handle, void* in, ...) __attribute__((weak));
long DftiFreeDescriptor(void** handle) __attribute__((weak));
}

namespace fft {

// mkl_dfti.h's enum values used here.
enum : int {
  kConjugateEvenStorage = 10,
  kPlacement = 11,
  kThreadLimit = 27,
  kReal = 33,
  kComplexComplex = 39,
  kNotInplace = 44,
};

inline bool have_dfti() {
  return DftiCreateDescriptor_s_1d != nullptr && DftiSetValue != nullptr && DftiCommitDescriptor != nullptr &&
         DftiComputeForward != nullptr && DftiComputeBackward != nullptr && DftiFreeDescriptor != nullptr;
}

struct Plans {
  std::unordered_map<int64_t, void*> by_key;  // +n forward, -n backward
  ~Plans() {
    for (auto& kv : by_key) DftiFreeDescriptor(&kv.second);
  }
};

// The thread's committed real-to-complex plan of length n (out of place, the n/2+1 bins
// interleaved), or null when DFTI refuses (the caller then uses torch's FFT).
inline void* plan(int64_t n, bool forward) {
  thread_local Plans plans;
  const int64_t key = forward ? n : -n;
  auto it = plans.by_key.find(key);
  if (it != plans.by_key.end()) return it->second;
  void* d = nullptr;
  if (DftiCreateDescriptor_s_1d(&d, kReal, long(n)) != 0) return nullptr;
  if (DftiSetValue(d, kConjugateEvenStorage, kComplexComplex) != 0 || DftiSetValue(d, kPlacement, kNotInplace) != 0 ||
      DftiSetValue(d, kThreadLimit, 1) != 0 || DftiCommitDescriptor(d) != 0) {
    DftiFreeDescriptor(&d);
    return nullptr;
  }
  plans.by_key.emplace(key, d);
  return d;
}

// spec[k] = rfft(in[k]) for rc rows: ``in`` rows of n floats (``in_stride`` apart), ``spec`` rows of
// n/2+1 interleaved (re, im) pairs (``spec_stride`` floats apart).
inline void rfft(const float* in, int64_t in_stride, int64_t n, int64_t rc, float* spec, int64_t spec_stride) {
  void* d = have_dfti() && fast_paths_enabled() ? plan(n, true) : nullptr;
  if (d != nullptr) {
    for (int64_t k = 0; k < rc; ++k) {
      const long status = DftiComputeForward(d, const_cast<float*>(in + k * in_stride), spec + k * spec_stride);
      TORCH_CHECK(status == 0, "MKL forward FFT failed (status ", status, ")");
    }
    return;
  }
  const auto f32 = torch::TensorOptions().dtype(at::kFloat);
  auto x = torch::from_blob(const_cast<float*>(in), {rc, n}, {in_stride, 1}, f32);
  auto out = torch::from_blob(spec, {rc, n / 2 + 1, 2}, {spec_stride, 2, 1}, f32);
  out.copy_(at::view_as_real(at::fft_rfft(x, n, 1)));
}

// out[k] = irfft(spec[k], n) (normalised by 1/n, as torch's irfft) for rc rows; layouts as rfft's.
// ``spec`` is the caller's scratch: a complex-to-real transform may overwrite its input.
inline void irfft(const float* spec, int64_t spec_stride, int64_t n, int64_t rc, float* out, int64_t out_stride) {
  void* d = have_dfti() && fast_paths_enabled() ? plan(n, false) : nullptr;
  if (d != nullptr) {
    const float scale = 1.0f / float(n);
    for (int64_t k = 0; k < rc; ++k) {
      float* o = out + k * out_stride;
      const long status = DftiComputeBackward(d, const_cast<float*>(spec + k * spec_stride), o);
      TORCH_CHECK(status == 0, "MKL backward FFT failed (status ", status, ")");
      for (int64_t i = 0; i < n; ++i) o[i] *= scale;
    }
    return;
  }
  const auto f32 = torch::TensorOptions().dtype(at::kFloat);
  auto s = torch::from_blob(const_cast<float*>(spec), {rc, n / 2 + 1, 2}, {spec_stride, 2, 1}, f32);
  auto o = torch::from_blob(out, {rc, n}, {out_stride, 1}, f32);
  o.copy_(at::fft_irfft(at::view_as_complex(s.contiguous()), n, 1));
}

// A thread's scratch buffer of at least ``count`` floats (reused across calls; contents undefined).
inline float* scratch(int slot, int64_t count) {
  thread_local std::vector<float> buffers[4];
  auto& b = buffers[slot];
  if (int64_t(b.size()) < count) b.resize(count);
  return b.data();
}

}  // namespace fft
}  // namespace facet
