// Per-row greedy non-maximum suppression for SSD post-processing (mnv2/detection/postprocess.py `nms_rows`),
// compiled on first use with the t-split kernels (mnv2/native.py).
//
// Why: per-class NMS of a detector is one small NMS per (image, class) row -- SSDLite on COCO: 80 rows of at most
// 100 candidates. torchvision.ops.nms is one call per row from Python (~60-100 us each with the mask and the
// indexing around it), 5-8 ms per image; the arithmetic is ~0.4 M box pairs. Here every row runs in one call.
// The result is torchvision.ops.nms's: boxes ordered by score (ties: the lower index first, a stable sort), a box kept
// when it scores above the threshold and overlaps no kept higher-scoring box by IoU > iou_threshold, where IoU is
// computed in float32 as torchvision computes it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace {

at::Tensor nms_rows(const at::Tensor& boxes_in, const at::Tensor& scores_in, double iou_threshold,
                    double score_threshold) {
  TORCH_CHECK(boxes_in.dim() == 3 && boxes_in.size(2) == 4, "nms_rows: boxes must be [R, K, 4]");
  TORCH_CHECK(scores_in.dim() == 2 && scores_in.size(0) == boxes_in.size(0) && scores_in.size(1) == boxes_in.size(1),
              "nms_rows: scores must be [R, K] matching boxes");
  const auto boxes = boxes_in.to(at::kFloat).contiguous();
  const auto scores = scores_in.to(at::kFloat).contiguous();
  const int64_t R = scores.size(0), K = scores.size(1);
  auto keep = at::zeros({R, K}, scores.options().dtype(at::kBool));
  const float* b = boxes.data_ptr<float>();
  const float* s = scores.data_ptr<float>();
  bool* out = keep.data_ptr<bool>();
  const float thr = static_cast<float>(iou_threshold), sthr = static_cast<float>(score_threshold);
  at::parallel_for(0, R, 8, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order;
    std::vector<int64_t> kept;
    for (int64_t r = begin; r < end; ++r) {
      const float* rs = s + r * K;
      const float* rb = b + r * K * 4;
      order.clear();
      for (int64_t i = 0; i < K; ++i)
        if (rs[i] > sthr) order.push_back(i);
      std::stable_sort(order.begin(), order.end(), [rs](int64_t x, int64_t y) { return rs[x] > rs[y]; });
      kept.clear();
      for (int64_t i : order) {
        const float* bi = rb + i * 4;
        const float area_i = (bi[2] - bi[0]) * (bi[3] - bi[1]);
        bool suppressed = false;
        for (int64_t j : kept) {
          const float* bj = rb + j * 4;
          const float w = std::max(0.f, std::min(bi[2], bj[2]) - std::max(bi[0], bj[0]));
          const float h = std::max(0.f, std::min(bi[3], bj[3]) - std::max(bi[1], bj[1]));
          const float inter = w * h;
          const float area_j = (bj[2] - bj[0]) * (bj[3] - bj[1]);
          if (inter / (area_i + area_j - inter) > thr) {
            suppressed = true;
            break;
          }
        }
        if (!suppressed) {
          kept.push_back(i);
          out[r * K + i] = true;
        }
      }
    }
  });
  return keep;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mnv2_native, m) {
  m.def("nms_rows", &nms_rows);
}
