// A segmentation model's last step in one pass: logits at the output stride [N, C, h, w] -> the class map
// [N, H, W] (uint8) of their bilinear upsampling to H x W (F.interpolate, align_corners=False), argmax over C
// (mnv2/deploy/segment.py `class_map`).
//
// Why: done as two steps, the upsampled logits are materialised first -- 21 x 512 x 512 floats, 22 MB written and
// read again for the argmax, 3.8-5.6 ms of the bench's int8 end to end here (and 174 MB for a 1920 x 1080 photo);
// here each output row is computed and reduced in cache: the horizontal interpolation of every source row once per
// image (C x h x W floats), then per output row its vertical interpolation and the running argmax, vectorised along
// the row.
//
// The arithmetic is torch's CPU upsample_bilinear2d (UpSampleKernel.cpp, NCHW float): source coordinate
// max(scale * (dst + 0.5) - 0.5, 0) with scale = in / out, index floor, neighbour +1 unless at the edge, weights
// l1 = clamp(src - index, 0, 1) and l0 = 1 - l1; horizontal first, t = v0 * l0 + v1 * l1, then
// out = t0 * l0' + t1 * l1' -- with the fused multiply-adds torch's kernel is compiled to, so that the class map equals
// torch's interpolate + argmax (ties: the first class), which mnv2's tests check.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

struct Taps {
  std::vector<int64_t> i0, i1;
  std::vector<float> l0, l1;
};

Taps taps(int64_t in, int64_t out) {
  Taps t;
  t.i0.resize(out), t.i1.resize(out), t.l0.resize(out), t.l1.resize(out);
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  for (int64_t d = 0; d < out; ++d) {
    float src = std::fma(scale, static_cast<float>(d) + 0.5f, -0.5f);
    src = src < 0.f ? 0.f : src;
    const int64_t i = static_cast<int64_t>(src);
    const float l1 = std::min(std::max(src - static_cast<float>(i), 0.f), 1.f);
    t.i0[d] = i;
    t.i1[d] = i + (i < in - 1 ? 1 : 0);
    t.l1[d] = l1;
    t.l0[d] = 1.f - l1;
  }
  return t;
}

at::Tensor upsample_argmax(const at::Tensor& logits_in, int64_t H, int64_t W) {
  TORCH_CHECK(logits_in.dim() == 4, "upsample_argmax: logits must be [N, C, h, w]");
  TORCH_CHECK(H > 0 && W > 0, "upsample_argmax: output size must be positive");
  const auto logits = logits_in.to(at::kFloat).contiguous();
  const int64_t N = logits.size(0), C = logits.size(1), h = logits.size(2), w = logits.size(3);
  TORCH_CHECK(C >= 1 && C <= 256, "upsample_argmax: 1 to 256 classes (a uint8 class map)");
  auto out = at::empty({N, H, W}, logits.options().dtype(at::kByte));
  const Taps ty = taps(h, H), tx = taps(w, W);
  std::vector<float> rows(static_cast<size_t>(C * h * W));  // horizontal interpolation of every source row
  for (int64_t n = 0; n < N; ++n) {
    const float* src = logits.data_ptr<float>() + n * C * h * w;
    at::parallel_for(0, C * h, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* s = src + r * w;
        float* d = rows.data() + r * W;
        for (int64_t x = 0; x < W; ++x) d[x] = std::fma(s[tx.i1[x]], tx.l1[x], s[tx.i0[x]] * tx.l0[x]);
      }
    });
    uint8_t* dst = out.data_ptr<uint8_t>() + n * H * W;
    at::parallel_for(0, H, 8, [&](int64_t begin, int64_t end) {
      std::vector<float> best(static_cast<size_t>(W));
      std::vector<int32_t> index(static_cast<size_t>(W));  // 32-bit, as the floats: one vector lane each
      for (int64_t y = begin; y < end; ++y) {
        const float l0 = ty.l0[y], l1 = ty.l1[y];
        for (int64_t c = 0; c < C; ++c) {
          const float* a = rows.data() + (c * h + ty.i0[y]) * W;
          const float* b = rows.data() + (c * h + ty.i1[y]) * W;
          const int32_t label = static_cast<int32_t>(c);
          if (c == 0) {
            for (int64_t x = 0; x < W; ++x) {
              best[x] = std::fma(b[x], l1, a[x] * l0);
              index[x] = 0;
            }
          } else {
            for (int64_t x = 0; x < W; ++x) {
              const float v = std::fma(b[x], l1, a[x] * l0);
              const bool larger = v > best[x];  // strictly: ties keep the first class, as argmax
              best[x] = larger ? v : best[x];
              index[x] = larger ? label : index[x];
            }
          }
        }
        for (int64_t x = 0; x < W; ++x) dst[y * W + x] = static_cast<uint8_t>(index[x]);
      }
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mnv2_native, m) {
  m.def("upsample_argmax", &upsample_argmax);
}
