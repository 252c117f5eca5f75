// Fused multi-tensor pack / unpack / non-finite scan for CPU tensors (qsr_ds.kernels.cpp).
//
// Same semantics as qsr_ds/kernels/reference.py, bit for bit:
//   pack:    bucket[o:o+n] = float(source) * float(scale)
//   unpack:  target = round(bucket slice); copy = round(bucket slice); resets = 0
//   first_nonfinite: index of the first tensor holding NaN or +-Inf, or -1
// Conversions to bf16 / fp16 round to nearest even, as torch's copy_ does.
//
// The tensors arrive as a pointer table (std::vector<at::Tensor>); the work is cut into
// items of at most kChunk elements (an item never spans two tensors) and OpenMP spreads
// the items over torch's intra-op thread count. The inner loops are plain loops over
// __restrict__ pointers that the compiler vectorizes at -O3 (no -march: the build cache
// may be reused on another CPU).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "convert.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using qsr_ds::Conv;

constexpr int64_t kChunk = int64_t(1) << 15;       // elements per work item
constexpr int64_t kSerialBelow = int64_t(1) << 16;  // fewer elements than this: one thread

struct Item {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

std::vector<Item> split(const std::vector<int64_t>& numels) {
  std::vector<Item> items;
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t b = 0; b < numels[t]; b += kChunk) {
      items.push_back({int64_t(t), b, std::min(numels[t], b + kChunk)});
    }
  }
  return items;
}

int threads_for(int64_t total) {
  return total < kSerialBelow ? 1 : std::max(1, at::get_num_threads());
}

// ---- inner loops ---------------------------------------------------------------------

template <typename S>
void pack_range(const S* __restrict__ src, float* __restrict__ dst, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Conv<S>::load(src[i]) * scale;
}

template <typename T>
void unpack_range(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Conv<T>::store(src[i]);
}

template <typename T, typename C>
void unpack_copy_range(const float* __restrict__ src, T* __restrict__ dst, C* __restrict__ copy, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = src[i];
    dst[i] = Conv<T>::store(v);
    copy[i] = Conv<C>::store(v);
  }
}

// true when any element's exponent bits are all ones (NaN, +Inf, -Inf)
template <typename U, U kExp>
bool any_nonfinite(const void* data, int64_t n) {
  const U* __restrict__ p = static_cast<const U*>(data);
  U hit = 0;
  for (int64_t i = 0; i < n; ++i) hit |= U((p[i] & kExp) == kExp);
  return hit != 0;
}

// ---- dtype dispatch --------------------------------------------------------------------

bool supported(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

template <typename F>
void dispatch(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "qsr_ds multi_tensor: unsupported dtype ", t);
  }
}

void check_tensor(const at::Tensor& t, const char* what, size_t i) {
  TORCH_CHECK(t.device().is_cpu(), "qsr_ds multi_tensor: ", what, " #", i, " is not a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), "qsr_ds multi_tensor: ", what, " #", i, " is not contiguous");
  TORCH_CHECK(supported(t.scalar_type()), "qsr_ds multi_tensor: ", what, " #", i, " has unsupported dtype ",
              t.scalar_type());
}

void check_bucket(const at::Tensor& bucket, const std::vector<at::Tensor>& tensors,
                  const std::vector<int64_t>& offsets, const char* what) {
  TORCH_CHECK(bucket.device().is_cpu() && bucket.scalar_type() == at::kFloat && bucket.is_contiguous(),
              "qsr_ds multi_tensor: the bucket must be a contiguous fp32 CPU tensor");
  TORCH_CHECK(offsets.size() == tensors.size(), "qsr_ds multi_tensor: ", tensors.size(), " ", what, " but ",
              offsets.size(), " offsets");
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_tensor(tensors[i], what, i);
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] + tensors[i].numel() <= bucket.numel(), "qsr_ds multi_tensor: ",
                what, " #", i, " (", tensors[i].numel(), " elements at offset ", offsets[i],
                ") does not fit the bucket of ", bucket.numel());
  }
}

std::vector<int64_t> numels_of(const std::vector<at::Tensor>& tensors) {
  std::vector<int64_t> n;
  n.reserve(tensors.size());
  for (const auto& t : tensors) n.push_back(t.numel());
  return n;
}

int64_t total_of(const std::vector<int64_t>& numels) {
  int64_t s = 0;
  for (auto n : numels) s += n;
  return s;
}

}  // namespace

void pack(const std::vector<at::Tensor>& sources, at::Tensor bucket, const std::vector<int64_t>& offsets,
          double scale) {
  check_bucket(bucket, sources, offsets, "sources");
  const auto numels = numels_of(sources);
  const auto items = split(numels);
  float* const out = bucket.data_ptr<float>();
  const float s = static_cast<float>(scale);
  const int64_t count = int64_t(items.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_for(total_of(numels)))
  for (int64_t k = 0; k < count; ++k) {
    const Item& it = items[k];
    const at::Tensor& src = sources[it.tensor];
    float* dst = out + offsets[it.tensor] + it.begin;
    dispatch(src.scalar_type(), [&](auto tag) {
      using S = decltype(tag);
      pack_range<S>(static_cast<const S*>(src.data_ptr()) + it.begin, dst, it.end - it.begin, s);
    });
  }
}

void unpack(const at::Tensor& bucket, const std::vector<at::Tensor>& targets, const std::vector<int64_t>& offsets,
            const std::vector<std::optional<at::Tensor>>& copies, const std::vector<at::Tensor>& resets) {
  check_bucket(bucket, targets, offsets, "targets");
  TORCH_CHECK(copies.size() == targets.size(), "qsr_ds multi_tensor: ", targets.size(), " targets but ",
              copies.size(), " copies");
  for (size_t i = 0; i < copies.size(); ++i) {
    if (!copies[i].has_value()) continue;
    check_tensor(*copies[i], "copies", i);
    TORCH_CHECK(copies[i]->numel() == targets[i].numel(), "qsr_ds multi_tensor: copy #", i, " has ",
                copies[i]->numel(), " elements, its target ", targets[i].numel());
  }
  for (size_t i = 0; i < resets.size(); ++i) {
    TORCH_CHECK(resets[i].device().is_cpu() && resets[i].is_contiguous(), "qsr_ds multi_tensor: reset #", i,
                " is not a contiguous CPU tensor");
  }
  // targets first, then resets (zeroed bytewise), in one parallel pass
  auto numels = numels_of(targets);
  const size_t n_targets = numels.size();
  for (const auto& r : resets) numels.push_back(r.numel() * int64_t(r.element_size()));
  const auto items = split(numels);
  const float* const in = bucket.data_ptr<float>();
  const int64_t count = int64_t(items.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_for(total_of(numels)))
  for (int64_t k = 0; k < count; ++k) {
    const Item& it = items[k];
    const int64_t n = it.end - it.begin;
    if (size_t(it.tensor) >= n_targets) {
      char* bytes = static_cast<char*>(resets[it.tensor - n_targets].data_ptr());
      std::memset(bytes + it.begin, 0, size_t(n));
      continue;
    }
    const at::Tensor& dst = targets[it.tensor];
    const float* src = in + offsets[it.tensor] + it.begin;
    const auto& copy = copies[it.tensor];
    dispatch(dst.scalar_type(), [&](auto ttag) {
      using T = decltype(ttag);
      T* d = static_cast<T*>(dst.data_ptr()) + it.begin;
      if (!copy.has_value()) {
        unpack_range<T>(src, d, n);
        return;
      }
      dispatch(copy->scalar_type(), [&](auto ctag) {
        using C = decltype(ctag);
        unpack_copy_range<T, C>(src, d, static_cast<C*>(copy->data_ptr()) + it.begin, n);
      });
    });
  }
}

int64_t first_nonfinite(const std::vector<at::Tensor>& tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) check_tensor(tensors[i], "tensors", i);
  const auto numels = numels_of(tensors);
  const auto items = split(numels);
  const int64_t count = int64_t(items.size());
  std::atomic<int64_t> first{int64_t(tensors.size())};
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_for(total_of(numels)))
  for (int64_t k = 0; k < count; ++k) {
    const Item& it = items[k];
    if (it.tensor >= first.load(std::memory_order_relaxed)) continue;  // an earlier tensor is already bad
    const at::Tensor& t = tensors[it.tensor];
    const int64_t n = it.end - it.begin;
    bool bad = false;
    switch (t.scalar_type()) {
      case at::kFloat:
        bad = any_nonfinite<uint32_t, 0x7F800000u>(static_cast<const uint32_t*>(t.data_ptr()) + it.begin, n);
        break;
      case at::kDouble:
        bad = any_nonfinite<uint64_t, 0x7FF0000000000000ull>(static_cast<const uint64_t*>(t.data_ptr()) + it.begin, n);
        break;
      case at::kBFloat16:
        bad = any_nonfinite<uint16_t, uint16_t(0x7F80)>(static_cast<const uint16_t*>(t.data_ptr()) + it.begin, n);
        break;
      default:  // kHalf (checked above)
        bad = any_nonfinite<uint16_t, uint16_t(0x7C00)>(static_cast<const uint16_t*>(t.data_ptr()) + it.begin, n);
        break;
    }
    if (bad) {
      int64_t seen = first.load(std::memory_order_relaxed);
      while (it.tensor < seen && !first.compare_exchange_weak(seen, it.tensor, std::memory_order_relaxed)) {
      }
    }
  }
  const int64_t found = first.load();
  return found == int64_t(tensors.size()) ? -1 : found;
}

void qsr_ds_register_quantize(py::module& m);  // csrc/quantize.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qsr_ds fused multi-tensor pack / unpack / non-finite scan for CPU tensors";
  m.def("pack", &pack, "bucket[o:o+n] = source * scale for each source (fp32 bucket)", py::arg("sources"),
        py::arg("bucket"), py::arg("offsets"), py::arg("scale"), py::call_guard<py::gil_scoped_release>());
  m.def("unpack", &unpack, "targets (and copies) = bucket slices rounded once; resets zeroed", py::arg("bucket"),
        py::arg("targets"), py::arg("offsets"), py::arg("copies"), py::arg("resets"),
        py::call_guard<py::gil_scoped_release>());
  m.def("first_nonfinite", &first_nonfinite, "index of the first tensor with NaN/Inf, or -1", py::arg("tensors"),
        py::call_guard<py::gil_scoped_release>());
  m.def("openmp_threads", []() { return at::get_num_threads(); });
  qsr_ds_register_quantize(m);
}
