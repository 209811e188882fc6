// One projection's adapter work in one call: the kernels bound to their groups once, run around
// the base GEMM without returning to Python between them. Not compiled on its own:
// adapters_cpu.cpp includes it after the kernels.
//
// Why: a mixed decode step of the 5 families calls about 1,500 kernels (7 projections x 30 layers
// x 6 hooks, and the spectra); each call from Python costs several microseconds of interpreter
// work (closure, attribute and dict lookups, argument conversion), measured at ~14 ms of a
// ~130 ms step. A binding is reused across decode steps, so its ops are bound once: each
// projection is then one Python call (``Projection.run``), the work of ``_fused_plan`` in
// ``server/engine/adapted_linear.py`` in the same order with the same ATen ops and kernels.
#pragma once

#include <algorithm>
#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

namespace facet {

// A binding's input spectra, shared by sibling projections (q/k/v, gate/up read the same
// activations): the C++ twin of ``SharedSpectra`` in ``server/kernels/fast.py``. An entry holds its
// input and rows, so that memory cannot be reused by another tensor while the entry exists; a new
// input replaces the entry of its kind and rows, and ``compute(reuse)`` is handed the old entry's
// spectrum to write into when nothing else holds it (the next layer's spectrum has its shape).
class Spectra {
 public:
  // The entry key of one op: its spectrum kind and its (held, so never reused) rows tensor.
  static std::string key(const std::string& kind, const Tensor& rows) {
    return kind + "@" + std::to_string(reinterpret_cast<uintptr_t>(rows.unsafeGetTensorImpl()));
  }

  template <typename F>
  Tensor get(const std::string& key, const std::string& scope, const Tensor& x, const Tensor& rows, const F& compute) {
    Tensor reuse;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = entries_.find(key);
      if (it != entries_.end()) {
        if (it->second.same_input(scope, x)) return it->second.spec;
        reuse = std::move(it->second.spec);
        entries_.erase(it);  // stale: its spectrum is about to be overwritten
      }
    }
    Tensor spec = compute(reuse);
    std::lock_guard<std::mutex> lock(mu_);
    entries_[key] = Entry{scope, x, rows, spec};
    return spec;
  }

 private:
  struct Entry {
    std::string scope;
    Tensor x, rows, spec;  // rows is held only so that its address (in the key) is not reused
    bool same_input(const std::string& s, const Tensor& t) const {
      return s == scope && t.data_ptr() == x.data_ptr() && t.sizes().equals(x.sizes()) &&
             t.strides().equals(x.strides());
    }
  };
  std::mutex mu_;
  std::unordered_map<std::string, Entry> entries_;
};

// One group's hook, bound: ``run(target, x)`` does it in place on ``target`` (the pre-transformed
// input for ``pre``, the base output for ``post`` and ``delta``); ``x`` is the projection's input.
// ``rows`` are the rows it touches; ``cost`` a rough size of its work (for spreading a projection's
// ops over threads: ``Lanes``).
struct NativeOp {
  std::string name;
  Tensor rows;
  double cost;
  std::function<void(Tensor&, const Tensor&)> run;
};
using OpPtr = std::shared_ptr<NativeOp>;

// ``per_row``: the kernel's relative cost per row, from the decode-step kernel profile
// (bench/kernel_profile.py, µs per row at the default model's widths); only an ordering hint.
OpPtr make_op(std::string name, const Tensor& rows, double per_row, std::function<void(Tensor&, const Tensor&)> f) {
  return std::make_shared<NativeOp>(NativeOp{std::move(name), rows, per_row * double(rows.numel()), std::move(f)});
}

// ---- the ops, one factory per kernel ----------------------------------------------------------

OpPtr op_scale_rows(Tensor rows, Tensor slots, Tensor t) {
  return make_op("scale_rows_", rows, 1.0, [=](Tensor& z, const Tensor&) { scale_rows_(z, rows, slots, t); });
}

OpPtr op_scale_shift_rows(Tensor rows, Tensor slots, Tensor t) {
  return make_op("scale_shift_rows_", rows, 1.2, [=](Tensor& y, const Tensor&) { scale_shift_rows_(y, rows, slots, t); });
}

OpPtr op_reflect_rows(Tensor rows, Tensor slots, Tensor t) {
  return make_op("reflect_rows_", rows, 1.0, [=](Tensor& z, const Tensor&) { reflect_rows_(z, rows, slots, t); });
}

OpPtr op_lora_add(Tensor rows, Tensor slots, Tensor a, Tensor bt) {
  return make_op("lora_add_", rows, 4.0, [=](Tensor& y, const Tensor& x) { lora_add_(y, x, rows, slots, a, bt); });
}

OpPtr op_kronecker_add(Tensor rows, Tensor slots, Tensor ab, int64_t f) {
  return make_op("kronecker_add_", rows, 8.0, [=](Tensor& y, const Tensor& x) { kronecker_add_(y, x, rows, slots, ab, f); });
}

OpPtr op_circulant(Tensor rows, Tensor slots, Tensor spec, int64_t n, std::shared_ptr<Spectra> sp, std::string scope) {
  const std::string key = Spectra::key("rfft" + std::to_string(n), rows);
  return make_op("circulant_apply_", rows, 4.0, [=](Tensor& y, const Tensor& x) {
    Tensor f = sp->get(key, scope, x, rows, [&](const Tensor& r) { return rfft_rows_into(r, x, rows, n); });
    circulant_apply_(y, f, rows, slots, spec, n);
  });
}

OpPtr op_toeplitz(Tensor rows, Tensor slots, Tensor spec, int64_t n, int64_t length, std::shared_ptr<Spectra> sp,
                  std::string scope) {
  const std::string key = Spectra::key("rfft" + std::to_string(length), rows);
  return make_op("toeplitz_apply_", rows, 10.0, [=](Tensor& y, const Tensor& x) {
    Tensor f = sp->get(key, scope, x, rows, [&](const Tensor& r) { return rfft_rows_into(r, x, rows, length); });
    toeplitz_apply_(y, f, rows, slots, spec, n, length);
  });
}

OpPtr op_dct(Tensor rows, Tensor slots, Tensor pos, Tensor coef, Tensor perm_in, Tensor fwd_in, Tensor inv_out,
             Tensor unperm_out, std::shared_ptr<Spectra> sp, std::string scope) {
  const std::string key = Spectra::key("dct" + std::to_string(perm_in.numel()), rows);
  return make_op("dct_apply_", rows, 6.0, [=](Tensor& y, const Tensor& x) {
    Tensor f = sp->get(key, scope, x, rows,
                      [&](const Tensor& r) { return dct_spectrum_into(r, x, rows, perm_in, fwd_in); });
    dct_apply_(y, f, rows, slots, pos, coef, inv_out, unperm_out);
  });
}

// ---- the projection ---------------------------------------------------------------------------

// A projection's ops of one side (the input-side ``pre`` ops, or the ``post`` and ``delta`` ops on
// its output) in lanes: ops that share a row are in one lane, in their order; ops in different
// lanes touch disjoint rows (every row is one request's, with one adapter), so lanes may run at
// once, each on one thread. A decode pool has a few rows per group, too few for a kernel to split
// them well (see ``threads_switch``), but a mixed step's groups are several: spreading the groups
// puts both cores to work on the adapters. Every row's values are computed by the same code
// whichever thread runs it, so the output does not depend on the threads.
class Lanes {
 public:
  explicit Lanes(const std::vector<OpPtr>& ops) {
    std::unordered_map<int64_t, size_t> lane_of;  // row -> lane
    for (const auto& op : ops) {
      const Tensor rows = op->rows.to(at::kLong).contiguous();
      const int64_t* rp = rows.data_ptr<int64_t>();
      std::vector<size_t> touched;
      for (int64_t i = 0; i < rows.numel(); ++i) {
        auto it = lane_of.find(rp[i]);
        if (it != lane_of.end() && std::find(touched.begin(), touched.end(), it->second) == touched.end())
          touched.push_back(it->second);
      }
      size_t into;
      if (touched.empty()) {
        into = lanes_.size();
        lanes_.emplace_back();
      } else {  // join every lane it shares a row with (their ops commute with one another)
        std::sort(touched.begin(), touched.end());
        into = touched[0];
        for (size_t j = 1; j < touched.size(); ++j) {
          auto& from = lanes_[touched[j]];
          lanes_[into].ops.insert(lanes_[into].ops.end(), from.ops.begin(), from.ops.end());
          lanes_[into].cost += from.cost;
          from = Lane{};
          for (auto& kv : lane_of)
            if (kv.second == touched[j]) kv.second = into;
        }
      }
      lanes_[into].ops.push_back(op);
      lanes_[into].cost += op->cost;
      for (int64_t i = 0; i < rows.numel(); ++i) lane_of[rp[i]] = into;
    }
    lanes_.erase(std::remove_if(lanes_.begin(), lanes_.end(), [](const Lane& l) { return l.ops.empty(); }),
                 lanes_.end());
    // Costliest first: threads take the next lane as they finish one (longest processing time first).
    std::stable_sort(lanes_.begin(), lanes_.end(), [](const Lane& a, const Lane& b) { return a.cost > b.cost; });
    offload_ = offloaded_cost(2);
  }

  size_t size() const { return lanes_.size(); }
  // Whether ``run`` spreads the lanes over threads (with the threads switch on).
  bool spread() const { return lanes_.size() >= 2 && offload_ >= kMinOffload; }

  void run(Tensor& target, const Tensor& x) const {
    const int64_t threads = threads_switch().load(std::memory_order_relaxed) ? at::get_num_threads() : 1;
    if (!spread() || threads < 2 || at::in_parallel_region()) {
      for (const auto& lane : lanes_)
        for (const auto& op : lane.ops) op->run(target, x);
      return;
    }
    std::atomic<size_t> next{0};
    at::parallel_for(0, std::min<int64_t>(threads, int64_t(lanes_.size())), 1, [&](int64_t, int64_t) {
      for (size_t i = next.fetch_add(1); i < lanes_.size(); i = next.fetch_add(1))
        for (const auto& op : lanes_[i].ops) op->run(target, x);
    });
  }

 private:
  struct Lane {
    std::vector<OpPtr> ops;
    double cost = 0;
  };

  // The work (in cost units) the calling thread is spared by spreading the lanes over ``threads``
  // (2: what a second thread takes): the total less the longest thread's share, the threads taking
  // the lanes as ``run`` hands them.
  double offloaded_cost(int64_t threads) const {
    if (lanes_.empty()) return 0;
    std::vector<double> load(size_t(std::min<int64_t>(threads, int64_t(lanes_.size()))), 0.0);
    double total = 0;
    for (const auto& lane : lanes_) {
      *std::min_element(load.begin(), load.end()) += lane.cost;
      total += lane.cost;
    }
    return total - *std::max_element(load.begin(), load.end());
  }

  // Below this much offloaded work the lanes run in order on the calling thread: waking a thread
  // and joining it costs ~4 us inside a step, about what 6 units are (two lanes of HUT's or ETHER's
  // row scalings over 6 rows each ran 3.5 us slower spread than in order, 2026-12-04).
  static constexpr double kMinOffload = 10.0;
  std::vector<Lane> lanes_;
  double offload_ = 0;
};

class Projection {
 public:
  Projection(Tensor weight, std::optional<Tensor> bias, const std::vector<OpPtr>& pres, const std::vector<OpPtr>& posts,
             const std::vector<OpPtr>& deltas)
      : weight_(std::move(weight)), bias_(std::move(bias)), has_pres_(!pres.empty()), has_posts_(!posts.empty()),
        pres_(pres), outs_(concat(posts, deltas)) {}

  // y = the adapted projection of x [..., in]; None where the kernels do not take these rows
  // (autograd, another dtype or device, a strided input): the caller's torch code serves them.
  std::optional<Tensor> run(const Tensor& x) const {
    const Tensor x2 = x.reshape({-1, x.size(-1)});
    if (!x2.device().is_cpu() || !is_served(x2) || !x2.is_contiguous() || at::GradMode::is_enabled())
      return std::nullopt;
    Tensor xin = has_pres_ ? input_copy(x2) : x2;
    pres_.run(xin, x2);
    const bool bias_last = has_posts_ && bias_.has_value();
    Tensor y = at::linear(xin, weight_, bias_last ? std::nullopt : bias_);
    outs_.run(y, x2);  // a group's post ops before its delta ops: one lane, in that order
    if (bias_last) y = y + *bias_;
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = weight_.size(0);
    return y.reshape(shape);
  }

  // The number of lanes of the input side and of the output side (for tests).
  std::pair<size_t, size_t> lanes() const { return {pres_.size(), outs_.size()}; }
  // Whether each side's lanes are spread over the threads or run in order (for tests).
  std::pair<bool, bool> spread() const { return {pres_.spread(), outs_.spread()}; }

 private:
  // A copy of x2 for the input-side ops to transform: into the previous call's copy where it has
  // the shape and nothing else holds it (a binding runs a projection once per decode step with the
  // same row count), saving an allocation per call. ``at::linear`` keeps no reference to it.
  Tensor input_copy(const Tensor& x2) const {
    std::unique_lock<std::mutex> lock(copy_mu_, std::try_to_lock);
    if (!lock.owns_lock()) return x2.clone();  // another thread runs this projection right now
    if (!(copy_.defined() && copy_.sizes().equals(x2.sizes()) && copy_.scalar_type() == x2.scalar_type() &&
          copy_.device() == x2.device() && copy_.use_count() == 1 && copy_.storage().use_count() == 1))
      copy_ = at::empty_like(x2, at::MemoryFormat::Contiguous);
    // Both contiguous, one dtype: a memcpy (at::copy_'s dispatch and TensorIterator code are cold
    // inside a step: a projection with one input-side op took 16 us more than none with copy_,
    // 11 us with the memcpy, measured with bench-style cold caches).
    if (x2.nbytes() > 0) std::memcpy(copy_.data_ptr(), x2.data_ptr(), x2.nbytes());
    return copy_;
  }

  static std::vector<OpPtr> concat(std::vector<OpPtr> a, const std::vector<OpPtr>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  }
  Tensor weight_;
  std::optional<Tensor> bias_;
  bool has_pres_, has_posts_;
  Lanes pres_, outs_;
  mutable std::mutex copy_mu_;
  mutable Tensor copy_;
};

void register_plans(py::module& m) {
  using release = py::call_guard<py::gil_scoped_release>;
  py::class_<Spectra, std::shared_ptr<Spectra>>(m, "Spectra", "a binding's shared input spectra")
      .def(py::init<>());
  py::class_<NativeOp, OpPtr>(m, "NativeOp", "one group's hook bound to its rows, slots and tables")
      .def_readonly("name", &NativeOp::name)
      .def("__call__", [](const NativeOp& op, Tensor target, Tensor x) { op.run(target, x); }, release());
  py::class_<Projection, std::shared_ptr<Projection>>(m, "Projection", "one projection's kernels around its GEMM")
      .def(py::init<Tensor, std::optional<Tensor>, std::vector<OpPtr>, std::vector<OpPtr>, std::vector<OpPtr>>())
      .def("run", &Projection::run, release())
      .def_property_readonly("lanes", &Projection::lanes)
      .def_property_readonly("spread", &Projection::spread);
  m.def("op_scale_rows", &op_scale_rows);
  m.def("op_scale_shift_rows", &op_scale_shift_rows);
  m.def("op_reflect_rows", &op_reflect_rows);
  m.def("op_lora_add", &op_lora_add);
  m.def("op_kronecker_add", &op_kronecker_add);
  m.def("op_circulant", &op_circulant);
  m.def("op_toeplitz", &op_toeplitz);
  m.def("op_dct", &op_dct);
}

}  // namespace facet
