// Native kernels of the section 5.1 t-split executor (mnv2/deploy/tsplit.py), compiled on first use by
// mnv2/deploy/native.py for the CPU it runs on.
//
// Why: a t-split bottleneck makes 3 calls per slice instead of 3 per block. At 224x224 the slices are small (a 7x7x240
// depthwise is ~0.1 MFLOP), and PyTorch's oneDNN depthwise call costs ~20-30 us of fixed set-up whatever its size, so
// the split's extra calls, not its arithmetic, set its latency. Here:
//   depthwise_nhwc  a depthwise convolution over channels_last rows, bias and clamp fused, with the activation of its
//                   input (the expansion's bias + ReLU6) applied as it reads: the expansion is then one plain matrix
//                   multiply and the wide slice is written once. 3x3 filters (every MobileNetV2 depthwise) keep their
//                   nine weights in vector registers and skip bounds checks inside the image, dilated ones too (the
//                   atrous backbone of Mobile DeepLabv3, paper section 6.3: rates 2 and 4, stride 1).
//   split_block     a whole bottleneck, every slice: expand (matrix multiply), depthwise, accumulate the projection --
//                   one call from Python per block instead of three per slice.
// Both are inference-only and float32; tsplit.py keeps its PyTorch path for everything else.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace {

struct DwGeom {
  int64_t kh, kw, sh, sw, ph, pw, dh, dw, ho, wo;
};

// GCC vector of V floats (V = 1 is a plain float): loads and stores are unaligned memcpy's, which compile to one
// vector move.
template <int V>
struct Vec {
  typedef float T __attribute__((vector_size(V * 4)));
  static T load(const float* p) { T r; std::memcpy(&r, p, sizeof(T)); return r; }
  static void store(float* p, T v) { std::memcpy(p, &v, sizeof(T)); }
  static T splat(float f) { return T{} + f; }
};

template <typename T>
inline T clampv(T x, T lo, T hi) {
  x = x < lo ? lo : x;
  return x > hi ? hi : x;
}

// Everything one call needs; `in` rows are `ldi` floats apart (a column slice of a wider matrix is fine).
struct DwArgs {
  const float* in;
  int64_t ldi, H, W, C;
  const float* in_bias;  // nullptr: the input is used as it is; else clamp(in + in_bias, in_lo, in_hi)
  float in_lo, in_hi;
  const float* wt;  // (kh * kw, C)
  const float* bias;
  float lo, hi;
  DwGeom g;
  float* out;  // (N * ho * wo, C)
};

template <int V, bool kInAct>
struct Taps {
  using T = typename Vec<V>::T;
  T ib{}, ilo{}, ihi{};
  Taps(const DwArgs& a, int64_t c0) {
    if constexpr (kInAct) {
      ib = Vec<V>::load(a.in_bias + c0);
      ilo = Vec<V>::splat(a.in_lo);
      ihi = Vec<V>::splat(a.in_hi);
    }
  }
  T operator()(const float* p) const {
    T s = Vec<V>::load(p);
    if constexpr (kInAct) s = clampv(s + ib, ilo, ihi);
    return s;
  }
};

// Output row `oh` of image `n`, channels [c0, c0 + V): any kernel size, stride, padding and dilation.
template <int V, bool kInAct>
void dw_row_generic(const DwArgs& a, int64_t n, int64_t oh, int64_t c0) {
  using T = typename Vec<V>::T;
  const DwGeom& g = a.g;
  const Taps<V, kInAct> tap(a, c0);
  const T lo = Vec<V>::splat(a.lo), hi = Vec<V>::splat(a.hi), b = Vec<V>::load(a.bias + c0);
  float* orow = a.out + (n * g.ho + oh) * g.wo * a.C + c0;
  for (int64_t ow = 0; ow < g.wo; ++ow) {
    T acc = b;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t ih = oh * g.sh - g.ph + i * g.dh;
      if (ih < 0 || ih >= a.H) continue;
      const float* srow = a.in + (n * a.H + ih) * a.W * a.ldi + c0;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t iw = ow * g.sw - g.pw + j * g.dw;
        if (iw < 0 || iw >= a.W) continue;
        acc += tap(srow + iw * a.ldi) * Vec<V>::load(a.wt + (i * g.kw + j) * a.C + c0);
      }
    }
    Vec<V>::store(orow + ow * a.C, clampv(acc, lo, hi));
  }
}

// The same for a 3x3 filter, stride S, dilation D: the nine weights live in registers and the columns whose taps all
// fall inside the image (all but the first and last D or so) run without bounds checks.
template <int V, int S, int D, bool kInAct>
void dw_row_3x3(const DwArgs& a, int64_t n, int64_t oh, int64_t c0) {
  using T = typename Vec<V>::T;
  const DwGeom& g = a.g;
  const Taps<V, kInAct> tap(a, c0);
  const T lo = Vec<V>::splat(a.lo), hi = Vec<V>::splat(a.hi), b = Vec<V>::load(a.bias + c0);
  T w[9];
  for (int i = 0; i < 9; ++i) w[i] = Vec<V>::load(a.wt + i * a.C + c0);
  const float* rows[3];
  bool valid[3];
  for (int i = 0; i < 3; ++i) {
    const int64_t ih = oh * S - g.ph + i * D;
    valid[i] = ih >= 0 && ih < a.H;
    rows[i] = a.in + (n * a.H + (valid[i] ? ih : 0)) * a.W * a.ldi + c0;
  }
  float* orow = a.out + (n * g.ho + oh) * g.wo * a.C + c0;
  auto edge = [&](int64_t ow) {
    T acc = b;
    for (int i = 0; i < 3; ++i) {
      if (!valid[i]) continue;
      for (int j = 0; j < 3; ++j) {
        const int64_t iw = ow * S - g.pw + j * D;
        if (iw >= 0 && iw < a.W) acc += tap(rows[i] + iw * a.ldi) * w[i * 3 + j];
      }
    }
    Vec<V>::store(orow + ow * a.C, clampv(acc, lo, hi));
  };
  int64_t first = 0, last = g.wo;  // interior columns: [first, last)
  while (first < g.wo && first * S - g.pw < 0) ++first;
  while (last > first && (last - 1) * S - g.pw + 2 * D >= a.W) --last;
  for (int64_t ow = 0; ow < first; ++ow) edge(ow);
  if (valid[0] && valid[1] && valid[2]) {
    for (int64_t ow = first; ow < last; ++ow) {
      T acc = b;
      for (int i = 0; i < 3; ++i) {
        const float* p = rows[i] + (ow * S - g.pw) * a.ldi;
        acc += tap(p) * w[i * 3] + tap(p + D * a.ldi) * w[i * 3 + 1] + tap(p + 2 * D * a.ldi) * w[i * 3 + 2];
      }
      Vec<V>::store(orow + ow * a.C, clampv(acc, lo, hi));
    }
  } else {
    for (int64_t ow = first; ow < last; ++ow) edge(ow);
  }
  for (int64_t ow = std::max(first, last); ow < g.wo; ++ow) edge(ow);
}

// One output row, channels [c0, c0 + V), with the kernel that fits the filter.
template <int V, bool kInAct>
void dw_row_block(const DwArgs& a, int64_t n, int64_t oh, int64_t c0) {
  const DwGeom& g = a.g;
  const bool square = g.kh == 3 && g.kw == 3 && g.sh == g.sw && g.dh == g.dw;
  if (square && g.sh == 1 && g.dh == 1)
    dw_row_3x3<V, 1, 1, kInAct>(a, n, oh, c0);
  else if (square && g.sh == 2 && g.dh == 1)
    dw_row_3x3<V, 2, 1, kInAct>(a, n, oh, c0);
  else if (square && g.sh == 1 && g.dh == 2)  // the atrous backbone: rate 2 (OS 16 and 8), 4 (OS 8)
    dw_row_3x3<V, 1, 2, kInAct>(a, n, oh, c0);
  else if (square && g.sh == 1 && g.dh == 4)
    dw_row_3x3<V, 1, 4, kInAct>(a, n, oh, c0);
  else
    dw_row_generic<V, kInAct>(a, n, oh, c0);
}

// Output rows [r0, r1), all channels: 16-wide vectors, then 8 and 4. The last 1-3 channels of a slice of at least 4
// run as one 4-wide vector over the slice's last four channels, recomputing (with the same result) up to three
// channels already written: one more pass over the row instead of up to three single-channel ones.
template <bool kInAct>
void dw_rows(const DwArgs& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / a.g.ho, oh = r % a.g.ho;
    int64_t c = 0;
    for (; c + 16 <= a.C; c += 16) dw_row_block<16, kInAct>(a, n, oh, c);
    for (; c + 8 <= a.C; c += 8) dw_row_block<8, kInAct>(a, n, oh, c);
    for (; c + 4 <= a.C; c += 4) dw_row_block<4, kInAct>(a, n, oh, c);
    if (c < a.C && a.C >= 4)
      dw_row_block<4, kInAct>(a, n, oh, a.C - 4);
    else
      for (; c < a.C; ++c) dw_row_block<1, kInAct>(a, n, oh, c);
  }
}

DwGeom geometry(at::IntArrayRef geom) {
  TORCH_CHECK(geom.size() == 10, "geometry: expected 10 integers (kh kw sh sw ph pw dh dw ho wo)");
  return {geom[0], geom[1], geom[2], geom[3], geom[4], geom[5], geom[6], geom[7], geom[8], geom[9]};
}

void check_float_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, what, ": expected a float32 CPU tensor");
}

// out (N * ho * wo, C) from in2d (N * H * W rows of C channels, row stride free, unit column stride).
at::Tensor depthwise(const at::Tensor& in2d, int64_t N, int64_t H, int64_t W, const at::Tensor* in_bias, double in_lo,
                     double in_hi, const at::Tensor& wt, const at::Tensor& bias, double lo, double hi,
                     const DwGeom& g) {
  const int64_t C = wt.size(1);
  TORCH_CHECK(in2d.dim() == 2 && in2d.size(0) == N * H * W && in2d.size(1) == C && (in2d.stride(1) == 1 || C == 1),
              "depthwise: input must be (N*H*W, C) rows with unit column stride");
  TORCH_CHECK(wt.is_contiguous() && wt.size(0) == g.kh * g.kw && bias.is_contiguous() && bias.numel() == C,
              "depthwise: weight must be (kh*kw, C) and bias (C,), contiguous");
  auto out = at::empty({N * g.ho * g.wo, C}, in2d.options());
  DwArgs a{in2d.data_ptr<float>(), in2d.stride(0), H, W, C,
           in_bias ? in_bias->data_ptr<float>() : nullptr, static_cast<float>(in_lo), static_cast<float>(in_hi),
           wt.data_ptr<float>(), bias.data_ptr<float>(), static_cast<float>(lo), static_cast<float>(hi), g,
           out.data_ptr<float>()};
  // Rows are independent; a task gets at least ~32k multiply-adds so that small maps do not pay for threads.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.wo * C * g.kh * g.kw));
  at::parallel_for(0, N * g.ho, grain, [&](int64_t r0, int64_t r1) {
    if (a.in_bias)
      dw_rows<true>(a, r0, r1);
    else
      dw_rows<false>(a, r0, r1);
  });
  return out;
}

at::Tensor depthwise_nhwc(const at::Tensor& in2d, int64_t N, int64_t H, int64_t W, const at::Tensor& wt,
                          const at::Tensor& bias, double lo, double hi, at::IntArrayRef geom) {
  check_float_cpu(in2d, "depthwise_nhwc");
  return depthwise(in2d, N, H, W, nullptr, 0, 0, wt, bias, lo, hi, geometry(geom));
}

// One bottleneck as the t-way split sum. x: (N, C, H, W) channels_last. Per slice i: expand_w[i] (n_i, C) and
// expand_b[i] (empty lists: no expansion, slice i is input channels of slice i), dw_w[i] (kh*kw, n_i), dw_b[i], and
// proj_w[i] (n_i, C_out). bounds = (expand lo, hi, depthwise lo, hi, output lo, hi); +-inf where there is no clamp.
at::Tensor split_block(const at::Tensor& x, at::TensorList expand_w, at::TensorList expand_b, at::TensorList dw_w,
                       at::TensorList dw_b, at::TensorList proj_w, const at::Tensor& proj_b, at::IntArrayRef geom,
                       at::ArrayRef<double> bounds, bool residual) {
  check_float_cpu(x, "split_block");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "split_block: input must be a 4-d channels_last tensor");
  TORCH_CHECK(bounds.size() == 6, "split_block: expected 6 clamp bounds");
  const bool expand = !expand_w.empty();
  const size_t t = dw_w.size();
  TORCH_CHECK(t > 0 && dw_b.size() == t && proj_w.size() == t &&
                  (!expand || (expand_w.size() == t && expand_b.size() == t)),
              "split_block: every slice needs its weights");
  const DwGeom g = geometry(geom);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const at::Tensor x2d = x.permute({0, 2, 3, 1}).reshape({N * H * W, C});  // a view of channels_last memory
  at::Tensor acc;
  int64_t lo = 0;
  for (size_t i = 0; i < t; ++i) {
    const int64_t n_i = dw_w[i].size(1);
    at::Tensor d;
    if (expand) {
      // The wide slice, written once: its bias and clamp are applied by the depthwise as it reads.
      const at::Tensor e = at::mm(x2d, expand_w[i].t());
      d = depthwise(e, N, H, W, &expand_b[i], bounds[0], bounds[1], dw_w[i], dw_b[i], bounds[2], bounds[3], g);
    } else {
      d = depthwise(x2d.narrow(1, lo, n_i), N, H, W, nullptr, 0, 0, dw_w[i], dw_b[i], bounds[2], bounds[3], g);
    }
    if (i == 0)
      acc = at::addmm(proj_b, d, proj_w[i]);
    else
      acc.addmm_(d, proj_w[i]);
    lo += n_i;
  }
  if (std::isfinite(bounds[4]) || std::isfinite(bounds[5]))
    acc.clamp_(std::isfinite(bounds[4]) ? c10::optional<at::Scalar>(bounds[4]) : c10::nullopt,
               std::isfinite(bounds[5]) ? c10::optional<at::Scalar>(bounds[5]) : c10::nullopt);
  if (residual) acc.add_(x2d);
  return acc.view({N, g.ho, g.wo, acc.size(1)}).permute({0, 3, 1, 2});
}

}  // namespace

TORCH_LIBRARY(mnv2_native, m) {
  m.def("depthwise_nhwc", &depthwise_nhwc);
  m.def("split_block", &split_block);
}
