// Compressed-round kernels for CPU tensors (qsr_ds.kernels.cpp), bit for bit the math of
// qsr_ds/kernels/reference.py (quantize / dequantize; see qsr_ds/kernels/__init__.py):
//   quantize:   d = (x - a) + e; q = Q(d); e = d - deQ(q)       (one pass over x, a, e)
//   dequantize: v = a + (deQ(q_0) + deQ(q_1) + ...) * inv_count; target = anchor = copy = v
// Built with -ffp-contract=off: a fused multiply-add would round differently from torch.
// int8 rounds half to even with the 1.5 * 2^23 trick (|d * inv| <= 127 is far below 2^22),
// which vectorizes where nearbyint would not without SSE4.1.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "convert.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace {

using qsr_ds::Conv;
using OptTensor = std::optional<at::Tensor>;

constexpr int64_t kMaxBlock = 4096;                 // elements of d kept on the stack
constexpr int64_t kTile = 1024;                     // bf16 mode: elements per inner tile
constexpr int64_t kItem = int64_t(1) << 15;         // elements per OpenMP work item (about)
constexpr int64_t kSerialBelow = int64_t(1) << 16;  // fewer elements than this: one thread
constexpr float kRound = 12582912.0f;               // 1.5 * 2^23
constexpr float kInt8Max = 127.0f;

struct Item {
  int64_t tensor, begin, end;
};

// work items of whole tiles (a tile = one int8 block, or kTile elements in bf16 mode)
std::vector<Item> split(const std::vector<at::Tensor>& tensors, int64_t tile) {
  const int64_t step = tile * std::max<int64_t>(1, kItem / tile);
  std::vector<Item> items;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t b = 0; b < n; b += step) items.push_back({int64_t(t), b, std::min(n, b + step)});
  }
  return items;
}

int threads_for(const std::vector<at::Tensor>& tensors) {
  int64_t total = 0;
  for (const auto& t : tensors) total += t.numel();
  return total < kSerialBelow ? 1 : std::max(1, at::get_num_threads());
}

template <typename F>
void dispatch(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "qsr_ds quantize: unsupported dtype ", t);
  }
}

template <typename F>
void dispatch_bool(bool b, F&& f) {
  if (b) f(std::true_type{}); else f(std::false_type{});
}

void check_cpu(const at::Tensor& t, const char* what, size_t i) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "qsr_ds quantize: ", what, " #", i,
              " is not a contiguous CPU tensor");
}

// d = (x - a) + e for m elements
template <typename S, bool HasA, bool HasE>
inline void load_delta(const S* __restrict__ x, const S* __restrict__ a, const float* __restrict__ e,
                       float* __restrict__ d, int64_t m) {
  for (int64_t i = 0; i < m; ++i) {
    float v = Conv<S>::load(x[i]);
    if (HasA) v = v - Conv<S>::load(a[i]);
    if (HasE) v = v + e[i];
    d[i] = v;
  }
}

template <typename S, bool HasA, bool HasE>
void quantize_int8_range(const S* x, const S* a, float* e, int8_t* __restrict__ q, float* scales, int64_t n,
                         int64_t block) {
  float d[kMaxBlock];
  for (int64_t b = 0, k = 0; b < n; b += block, ++k) {
    const int64_t m = std::min(block, n - b);
    load_delta<S, HasA, HasE>(x + b, HasA ? a + b : nullptr, HasE ? e + b : nullptr, d, m);
    float amax = 0.0f;
    uint32_t bad = 0;
    for (int64_t i = 0; i < m; ++i) {
      const float v = std::fabs(d[i]);
      bad |= uint32_t(!(v <= FLT_MAX));  // NaN or Inf
      amax = v > amax ? v : amax;
    }
    float scale, inv;
    if (bad) {
      scale = std::numeric_limits<float>::quiet_NaN();
      inv = 0.0f;
    } else {
      scale = amax / kInt8Max;
      inv = kInt8Max / amax;
      if (!(inv <= FLT_MAX)) scale = inv = 0.0f;  // an all-zero (or tiny) block
    }
    scales[k] = scale;
    int8_t* __restrict__ qb = q + b;
    for (int64_t i = 0; i < m; ++i) {
      float r = bad ? 0.0f : (d[i] * inv + kRound) - kRound;
      r = r < -kInt8Max ? -kInt8Max : r;
      r = r > kInt8Max ? kInt8Max : r;
      qb[i] = int8_t(int32_t(r));
    }
    if (HasE) {
      float* __restrict__ eb = e + b;
      for (int64_t i = 0; i < m; ++i) eb[i] = d[i] - float(qb[i]) * scale;
    }
  }
}

template <typename S, bool HasA, bool HasE>
void quantize_bf16_range(const S* x, const S* a, float* e, c10::BFloat16* __restrict__ q, int64_t n) {
  float d[kTile];
  for (int64_t b = 0; b < n; b += kTile) {
    const int64_t m = std::min(kTile, n - b);
    load_delta<S, HasA, HasE>(x + b, HasA ? a + b : nullptr, HasE ? e + b : nullptr, d, m);
    c10::BFloat16* __restrict__ qb = q + b;
    for (int64_t i = 0; i < m; ++i) qb[i] = Conv<c10::BFloat16>::store(d[i]);
    if (HasE) {
      float* __restrict__ eb = e + b;
      for (int64_t i = 0; i < m; ++i) eb[i] = d[i] - Conv<c10::BFloat16>::load(qb[i]);
    }
  }
}

// acc = deQ(q_0) + deQ(q_1) + ... over one tile of m elements (scale rows: one scale per row)
template <bool Int8>
inline void accumulate(const void* q, int64_t row_stride, const float* scales, int64_t scale_stride, int64_t rows,
                       float* __restrict__ acc, int64_t m) {
  for (int64_t r = 0; r < rows; ++r) {
    if (Int8) {
      const int8_t* __restrict__ qr = static_cast<const int8_t*>(q) + r * row_stride;
      const float s = scales[r * scale_stride];
      if (r == 0) {
        for (int64_t i = 0; i < m; ++i) acc[i] = float(qr[i]) * s;
      } else {
        for (int64_t i = 0; i < m; ++i) acc[i] = acc[i] + float(qr[i]) * s;
      }
    } else {
      const c10::BFloat16* __restrict__ qr = static_cast<const c10::BFloat16*>(q) + r * row_stride;
      if (r == 0) {
        for (int64_t i = 0; i < m; ++i) acc[i] = Conv<c10::BFloat16>::load(qr[i]);
      } else {
        for (int64_t i = 0; i < m; ++i) acc[i] = acc[i] + Conv<c10::BFloat16>::load(qr[i]);
      }
    }
  }
}

template <bool Int8, typename T, typename C, bool HasA, bool HasC>
void dequantize_range(const void* q, int64_t row_stride, const float* scales, int64_t scale_stride, int64_t rows,
                      T* __restrict__ dst, T* __restrict__ anchor, C* __restrict__ copy, int64_t n, int64_t tile,
                      float inv_count) {
  float acc[kMaxBlock > kTile ? kMaxBlock : kTile];
  const int64_t qsize = Int8 ? 1 : 2;
  for (int64_t b = 0, k = 0; b < n; b += tile, ++k) {
    const int64_t m = std::min(tile, n - b);
    accumulate<Int8>(static_cast<const char*>(q) + b * qsize, row_stride, Int8 ? scales + k : nullptr, scale_stride,
                     rows, acc, m);
    for (int64_t i = 0; i < m; ++i) {
      float v = acc[i] * inv_count;
      if (HasA) v = Conv<T>::load(anchor[b + i]) + v;
      dst[b + i] = Conv<T>::store(v);
      if (HasA) anchor[b + i] = Conv<T>::store(v);
      if (HasC) copy[b + i] = Conv<C>::store(v);
    }
  }
}

}  // namespace

void quantize(int64_t int8_mode, int64_t block, const std::vector<at::Tensor>& sources,
              const std::vector<OptTensor>& anchors, const std::vector<OptTensor>& residuals, at::Tensor q,
              const OptTensor& scales, const std::vector<int64_t>& offsets, const std::vector<int64_t>& block_offsets) {
  const size_t n = sources.size();
  TORCH_CHECK(anchors.size() == n && residuals.size() == n && offsets.size() == n && block_offsets.size() == n,
              "qsr_ds quantize: ", n, " sources but ", anchors.size(), " anchors, ", residuals.size(),
              " residuals, ", offsets.size(), " offsets, ", block_offsets.size(), " block offsets");
  TORCH_CHECK(block >= 1 && block <= kMaxBlock, "qsr_ds quantize: block must be in [1, ", kMaxBlock, "], got ",
              block);
  TORCH_CHECK(q.device().is_cpu() && q.is_contiguous() && q.dim() == 1 &&
                  q.scalar_type() == (int8_mode ? at::kChar : at::kBFloat16),
              "qsr_ds quantize: q must be a flat contiguous CPU ", int8_mode ? "int8" : "bf16", " tensor");
  if (int8_mode) {
    TORCH_CHECK(scales.has_value() && scales->device().is_cpu() && scales->is_contiguous() &&
                    scales->scalar_type() == at::kFloat,
                "qsr_ds quantize: int8 needs a contiguous fp32 CPU scales tensor");
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& x = sources[i];
    check_cpu(x, "source", i);
    const int64_t m = x.numel();
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] + m <= q.numel(), "qsr_ds quantize: source #", i, " (", m,
                " elements at offset ", offsets[i], ") does not fit q of ", q.numel());
    if (int8_mode) {
      const int64_t nb = (m + block - 1) / block;
      TORCH_CHECK(block_offsets[i] >= 0 && block_offsets[i] + nb <= scales->numel(), "qsr_ds quantize: source #",
                  i, " (", nb, " blocks at ", block_offsets[i], ") does not fit scales of ", scales->numel());
    }
    if (anchors[i].has_value()) {
      check_cpu(*anchors[i], "anchor", i);
      TORCH_CHECK(anchors[i]->scalar_type() == x.scalar_type() && anchors[i]->numel() == m,
                  "qsr_ds quantize: anchor #", i, " must match its source's dtype and size");
    }
    if (residuals[i].has_value()) {
      check_cpu(*residuals[i], "residual", i);
      TORCH_CHECK(residuals[i]->scalar_type() == at::kFloat && residuals[i]->numel() == m,
                  "qsr_ds quantize: residual #", i, " must be fp32 with its source's size");
    }
  }
  const auto items = split(sources, int8_mode ? block : kTile);
  const int64_t count = int64_t(items.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_for(sources))
  for (int64_t k = 0; k < count; ++k) {
    const Item& it = items[k];
    const at::Tensor& x = sources[it.tensor];
    const auto& a = anchors[it.tensor];
    const auto& e = residuals[it.tensor];
    const int64_t m = it.end - it.begin;
    dispatch(x.scalar_type(), [&](auto tag) {
      using S = decltype(tag);
      const S* xp = static_cast<const S*>(x.data_ptr()) + it.begin;
      const S* ap = a.has_value() ? static_cast<const S*>(a->data_ptr()) + it.begin : nullptr;
      float* ep = e.has_value() ? e->data_ptr<float>() + it.begin : nullptr;
      dispatch_bool(ap != nullptr, [&](auto has_a) {
        dispatch_bool(ep != nullptr, [&](auto has_e) {
          if (int8_mode) {
            int8_t* qp = q.data_ptr<int8_t>() + offsets[it.tensor] + it.begin;
            float* sp = scales->data_ptr<float>() + block_offsets[it.tensor] + it.begin / block;
            quantize_int8_range<S, decltype(has_a)::value, decltype(has_e)::value>(xp, ap, ep, qp, sp, m, block);
          } else {
            c10::BFloat16* qp = static_cast<c10::BFloat16*>(q.data_ptr()) + offsets[it.tensor] + it.begin;
            quantize_bf16_range<S, decltype(has_a)::value, decltype(has_e)::value>(xp, ap, ep, qp, m);
          }
        });
      });
    });
  }
}

void dequantize(int64_t int8_mode, int64_t block, const at::Tensor& q_rows, const OptTensor& scale_rows,
                const std::vector<at::Tensor>& targets, const std::vector<OptTensor>& anchors,
                const std::vector<OptTensor>& copies, const std::vector<int64_t>& offsets,
                const std::vector<int64_t>& block_offsets, double inv_count) {
  const size_t n = targets.size();
  TORCH_CHECK(anchors.size() == n && copies.size() == n && offsets.size() == n && block_offsets.size() == n,
              "qsr_ds dequantize: ", n, " targets but ", anchors.size(), " anchors, ", copies.size(), " copies, ",
              offsets.size(), " offsets, ", block_offsets.size(), " block offsets");
  TORCH_CHECK(block >= 1 && block <= kMaxBlock, "qsr_ds dequantize: block must be in [1, ", kMaxBlock, "], got ",
              block);
  TORCH_CHECK(q_rows.device().is_cpu() && q_rows.dim() == 2 && q_rows.stride(1) == 1 &&
                  q_rows.scalar_type() == (int8_mode ? at::kChar : at::kBFloat16),
              "qsr_ds dequantize: q_rows must be a [R, n] CPU ", int8_mode ? "int8" : "bf16",
              " tensor with contiguous rows");
  if (int8_mode) {
    TORCH_CHECK(scale_rows.has_value() && scale_rows->device().is_cpu() && scale_rows->dim() == 2 &&
                    scale_rows->stride(1) == 1 && scale_rows->scalar_type() == at::kFloat &&
                    scale_rows->size(0) == q_rows.size(0),
                "qsr_ds dequantize: int8 needs [R, blocks] fp32 CPU scale rows with contiguous rows");
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = targets[i];
    check_cpu(t, "target", i);
    const int64_t m = t.numel();
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] + m <= q_rows.size(1), "qsr_ds dequantize: target #", i, " (", m,
                " elements at offset ", offsets[i], ") does not fit q rows of ", q_rows.size(1));
    if (int8_mode) {
      const int64_t nb = (m + block - 1) / block;
      TORCH_CHECK(block_offsets[i] >= 0 && block_offsets[i] + nb <= scale_rows->size(1),
                  "qsr_ds dequantize: target #", i, " (", nb, " blocks at ", block_offsets[i],
                  ") does not fit scale rows of ", scale_rows->size(1));
    }
    if (anchors[i].has_value()) {
      check_cpu(*anchors[i], "anchor", i);
      TORCH_CHECK(anchors[i]->scalar_type() == t.scalar_type() && anchors[i]->numel() == m,
                  "qsr_ds dequantize: anchor #", i, " must match its target's dtype and size");
    }
    if (copies[i].has_value()) {
      check_cpu(*copies[i], "copy", i);
      TORCH_CHECK(copies[i]->numel() == m, "qsr_ds dequantize: copy #", i, " has ", copies[i]->numel(),
                  " elements, its target ", m);
    }
  }
  const int64_t tile = int8_mode ? block : kTile;
  const auto items = split(targets, tile);
  const int64_t count = int64_t(items.size());
  const int64_t rows = q_rows.size(0);
  const int64_t row_stride = q_rows.stride(0);
  const int64_t scale_stride = int8_mode ? scale_rows->stride(0) : 0;
  const float inv = static_cast<float>(inv_count);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_for(targets))
  for (int64_t k = 0; k < count; ++k) {
    const Item& it = items[k];
    const at::Tensor& t = targets[it.tensor];
    const auto& a = anchors[it.tensor];
    const auto& c = copies[it.tensor];
    const int64_t m = it.end - it.begin;
    const char* qp = static_cast<const char*>(q_rows.data_ptr()) +
                     (offsets[it.tensor] + it.begin) * q_rows.element_size();
    const float* sp = int8_mode ? scale_rows->data_ptr<float>() + block_offsets[it.tensor] + it.begin / block
                                : nullptr;
    dispatch(t.scalar_type(), [&](auto ttag) {
      using T = decltype(ttag);
      T* tp = static_cast<T*>(t.data_ptr()) + it.begin;
      T* ap = a.has_value() ? static_cast<T*>(a->data_ptr()) + it.begin : nullptr;
      auto run = [&](auto ctag, auto has_c) {
        using C = decltype(ctag);
        C* cp = has_c ? static_cast<C*>(c->data_ptr()) + it.begin : nullptr;
        dispatch_bool(ap != nullptr, [&](auto has_a) {
          if (int8_mode) {
            dequantize_range<true, T, C, decltype(has_a)::value, decltype(has_c)::value>(
                qp, row_stride, sp, scale_stride, rows, tp, ap, cp, m, tile, inv);
          } else {
            dequantize_range<false, T, C, decltype(has_a)::value, decltype(has_c)::value>(
                qp, row_stride, sp, scale_stride, rows, tp, ap, cp, m, tile, inv);
          }
        });
      };
      if (c.has_value()) {
        dispatch(c->scalar_type(), [&](auto ctag) { run(ctag, std::true_type{}); });
      } else {
        run(float{}, std::false_type{});
      }
    });
  }
}

void qsr_ds_register_quantize(py::module& m) {
  m.def("quantize", &quantize, "d = (x - a) + e; q = Q(d); e = d - deQ(q) (bf16, or int8 with block scales)",
        py::arg("int8_mode"), py::arg("block"), py::arg("sources"), py::arg("anchors"), py::arg("residuals"),
        py::arg("q"), py::arg("scales"), py::arg("offsets"), py::arg("block_offsets"),
        py::call_guard<py::gil_scoped_release>());
  m.def("dequantize", &dequantize, "target = anchor = copy = a + (deQ(q_0) + deQ(q_1) + ...) * inv_count",
        py::arg("int8_mode"), py::arg("block"), py::arg("q_rows"), py::arg("scale_rows"), py::arg("targets"),
        py::arg("anchors"), py::arg("copies"), py::arg("offsets"), py::arg("block_offsets"), py::arg("inv_count"),
        py::call_guard<py::gil_scoped_release>());
}
