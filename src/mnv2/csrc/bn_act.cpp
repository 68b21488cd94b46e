// Training-mode BatchNorm fused with its clamp activation (ReLU6, or none), forward and backward, over channels_last
// activations seen as (rows = N*H*W, C) matrices. Called by mnv2/engine/fused.py through torch.ops.mnv2_native.
//
// Why: PyTorch runs BN, then ReLU6 (whose in-place form copies its input under autograd), then in backward the ReLU6
// mask and BN's two passes -- about eight passes over each activation per step, and BN + ReLU6 were ~40% of a
// MobileNetV2 training step on this CPU. Here the forward is one reading pass for the statistics and one pass that
// writes the output and a one-byte mask of where the clamp let the gradient through; the backward is one reading pass
// for the two per-channel sums and one pass that writes the input gradient.
//
// Layout: the (rows, C) matrix is walked in runs of k rows = W = k * C contiguous floats, W the least multiple of both
// C and 64 (k = 1 for C = 64, 192, 576, ...; 8 for C = 24), with every per-channel constant tiled to W values: the
// inner loops then run over whole 64-float multiples, where a 16- or 24-channel row is too short for the vectoriser
// (measured: 3-5x slower).
// Statistics: per-thread partial sums over blocks of runs in float, shifted by the first row (against cancellation in
// E[x^2] - E[x]^2), accumulated in double; the variance is the biased one BN normalises with.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kLanes = 64;     // runs are multiples of this many floats where that keeps them short
constexpr int64_t kBlockFloats = 1 << 14;  // floats summed in float before going into the double accumulators
constexpr int64_t kGrainFloats = 1 << 16;  // floats per parallel task at least

void check_rows(const at::Tensor& t, int64_t C, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 && t.is_contiguous() &&
                  t.size(1) == C,
              what, ": expected a contiguous float32 CPU matrix of ", C, " columns");
}

// Runs of k rows: run u covers floats [u * W, u * W + length(u)); the last run may hold fewer rows.
struct Runs {
  int64_t C, W, count, total;
  Runs(int64_t M, int64_t C) : C(C), total(M * C) {
    int64_t k = kLanes / std::gcd(C, kLanes);
    if (k * C > 4096) k = std::max<int64_t>(1, kLanes / C);  // an odd channel count: keep the tiles small
    W = k * C;
    count = (total + W - 1) / W;
  }
  int64_t length(int64_t u) const { return std::min(W, total - u * W); }
  std::vector<float> tile(const std::vector<float>& per_channel) const {
    std::vector<float> out(W);
    for (int64_t j = 0; j < W; ++j) out[j] = per_channel[j % C];
    return out;
  }
  std::vector<float> tile(const float* per_channel) const {
    return tile(std::vector<float>(per_channel, per_channel + C));
  }
};

// Per-channel totals (in double) of two quantities, where `accumulate(offset, n, a1, a2)` adds the terms of the n
// floats from `offset` into the float accumulators a1[0..n), a2[0..n) (position j is channel j % C).
template <typename F>
std::pair<std::vector<double>, std::vector<double>> column_sums(const Runs& runs, F accumulate) {
  const int64_t W = runs.W, C = runs.C;
  const int threads = at::get_num_threads();
  std::vector<double> s1(threads * W, 0.0), s2(threads * W, 0.0);
  const int64_t block = std::max<int64_t>(1, kBlockFloats / W), grain = std::max<int64_t>(1, kGrainFloats / W);
  at::parallel_for(0, runs.count, grain, [&](int64_t u0, int64_t u1) {
    double* t1 = s1.data() + at::get_thread_num() * W;
    double* t2 = s2.data() + at::get_thread_num() * W;
    std::vector<float> a1(W), a2(W);
    for (int64_t u = u0; u < u1; u += block) {
      std::fill(a1.begin(), a1.end(), 0.f);
      std::fill(a2.begin(), a2.end(), 0.f);
      for (int64_t v = u, end = std::min(u1, u + block); v < end; ++v)
        accumulate(v * W, runs.length(v), a1.data(), a2.data());
      for (int64_t j = 0; j < W; ++j) {
        t1[j] += a1[j];
        t2[j] += a2[j];
      }
    }
  });
  std::vector<double> tot1(C, 0.0), tot2(C, 0.0);
  for (int t = 0; t < threads; ++t)
    for (int64_t j = 0; j < W; ++j) {
      tot1[j % C] += s1[t * W + j];
      tot2[j % C] += s2[t * W + j];
    }
  return {std::move(tot1), std::move(tot2)};
}

// `body(offset, n)` for every run, in parallel.
template <typename F>
void for_each_run(const Runs& runs, F body) {
  at::parallel_for(0, runs.count, std::max<int64_t>(1, kGrainFloats / runs.W), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) body(u * runs.W, runs.length(u));
  });
}

// Returns (y, mask, mean, invstd, var): y = clamp((x - mean) * invstd * weight + bias, lo, hi), mask = 1 where
// lo < y < hi (where the gradient passes), var the biased batch variance.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_forward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps, double lo, double hi) {
  const int64_t M = x.size(0), C = x.size(1);
  check_rows(x, C, "bn_act_forward");
  TORCH_CHECK(M > 0 && weight.numel() == C && bias.numel() == C && weight.is_contiguous() && bias.is_contiguous(),
              "bn_act_forward: weight and bias must have one value per channel");
  const Runs runs(M, C);
  const float* xp = x.data_ptr<float>();
  const std::vector<float> shift_tiled = runs.tile(xp);  // the first row
  const float* __restrict__ shift = shift_tiled.data();
  auto [sum, sumsq] = column_sums(runs, [&](int64_t off, int64_t n, float* __restrict__ a1, float* __restrict__ a2) {
    const float* __restrict__ v = xp + off;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float d = v[j] - shift[j];
      a1[j] += d;
      a2[j] += d * d;
    }
  });
  auto mean = at::empty({C}, x.options()), invstd = at::empty({C}, x.options()), var = at::empty({C}, x.options());
  std::vector<float> scale(C), offset(C);
  const float* w = weight.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    const double m = sum[c] / M, v = std::max(sumsq[c] / M - m * m, 0.0), is = 1.0 / std::sqrt(v + eps);
    mean.data_ptr<float>()[c] = static_cast<float>(shift[c] + m);
    var.data_ptr<float>()[c] = static_cast<float>(v);
    invstd.data_ptr<float>()[c] = static_cast<float>(is);
    scale[c] = static_cast<float>(w[c] * is);
    offset[c] = static_cast<float>(b[c] - (shift[c] + m) * w[c] * is);
  }
  auto y = at::empty_like(x);
  auto mask = at::empty({M, C}, x.options().dtype(at::kByte));
  float* yp = y.data_ptr<float>();
  uint8_t* mp = mask.data_ptr<uint8_t>();
  const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  const std::vector<float> scale_tiled = runs.tile(scale), offset_tiled = runs.tile(offset);
  const float* __restrict__ sc = scale_tiled.data();
  const float* __restrict__ of = offset_tiled.data();
  for_each_run(runs, [&](int64_t off, int64_t n) {
    const float* __restrict__ v = xp + off;
    float* __restrict__ out = yp + off;
    uint8_t* __restrict__ mk = mp + off;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = std::min(std::max(v[j] * sc[j] + of[j], flo), fhi);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) mk[j] = static_cast<uint8_t>(out[j] > flo) & static_cast<uint8_t>(out[j] < fhi);
  });
  return {y, mask, mean, invstd, var};
}

// Returns (dx, dweight, dbias) for upstream gradient dy, given the forward's input x, mask, mean and invstd.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward(const at::Tensor& dy, const at::Tensor& x,
                                                               const at::Tensor& mask, const at::Tensor& mean,
                                                               const at::Tensor& invstd, const at::Tensor& weight) {
  const int64_t M = x.size(0), C = x.size(1);
  check_rows(x, C, "bn_act_backward");
  check_rows(dy, C, "bn_act_backward (gradient)");
  TORCH_CHECK(dy.size(0) == M && mask.is_contiguous() && mask.numel() == M * C && mask.scalar_type() == at::kByte,
              "bn_act_backward: gradient, input and mask must match");
  const Runs runs(M, C);
  const float* dyp = dy.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  const std::vector<float> mean_tiled = runs.tile(mean.data_ptr<float>());
  const float* __restrict__ mu = mean_tiled.data();
  // g = dy where the clamp passed; sums of g and of g * (x - mean)
  auto [sum_g, sum_gx] = column_sums(runs, [&](int64_t off, int64_t n, float* __restrict__ a1, float* __restrict__ a2) {
    const float* __restrict__ g = dyp + off;
    const float* __restrict__ v = xp + off;
    const uint8_t* __restrict__ mk = mp + off;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float gg = mk[j] ? g[j] : 0.f;
      a1[j] += gg;
      a2[j] += gg * (v[j] - mu[j]);
    }
  });
  auto dweight = at::empty({C}, x.options()), dbias = at::empty({C}, x.options());
  // dx = weight * invstd * (g - mean(g) - xhat * mean(g * xhat)), xhat = (x - mean) * invstd
  std::vector<float> k1(C), k2(C), k3(C);
  const float* w = weight.data_ptr<float>();
  const float* is = invstd.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    dbias.data_ptr<float>()[c] = static_cast<float>(sum_g[c]);
    dweight.data_ptr<float>()[c] = static_cast<float>(sum_gx[c] * is[c]);
    const double a = static_cast<double>(w[c]) * is[c];
    k1[c] = static_cast<float>(a);
    k2[c] = static_cast<float>(a * sum_g[c] / M);
    k3[c] = static_cast<float>(a * is[c] * is[c] * sum_gx[c] / M);
  }
  auto dx = at::empty_like(x);
  float* dxp = dx.data_ptr<float>();
  const std::vector<float> k1_tiled = runs.tile(k1), k2_tiled = runs.tile(k2), k3_tiled = runs.tile(k3);
  const float* __restrict__ c1 = k1_tiled.data();
  const float* __restrict__ c2 = k2_tiled.data();
  const float* __restrict__ c3 = k3_tiled.data();
  for_each_run(runs, [&](int64_t off, int64_t n) {
    const float* __restrict__ g = dyp + off;
    const float* __restrict__ v = xp + off;
    const uint8_t* __restrict__ mk = mp + off;
    float* __restrict__ o = dxp + off;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) o[j] = c1[j] * (mk[j] ? g[j] : 0.f) - c2[j] - (v[j] - mu[j]) * c3[j];
  });
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mnv2_native, m) {
  m.def("bn_act_forward", &bn_act_forward);
  m.def("bn_act_backward", &bn_act_backward);
}
