// Exact k-of-N ensemble search: the hot loop of bldseg/ensemble/search.py.
//
// Input is a *pruned* library (see bldseg/ensemble/prune.py): only the P pixels whose summed
// value can cross a threshold level in [first, last] for some k-model combination are kept,
// grouped by image; every other pixel's contribution is constant and arrives as per-image
// counts (above_tp / above_pp: pixels positive at every level of the window, gt: building
// pixels). For each combination, in lexicographic order from a given start, we
//
//   1. sum the members' uint8 values per kept pixel, reusing the partial sums of the longest
//      unchanged prefix (one state per depth), and at every depth drop the pixels that can no
//      longer cross the window whatever the remaining members (they join the constant counts);
//   2. build one small histogram per image of the final sums clamped to [first - 1, last];
//   3. turn it into true-positive / predicted-positive counts at every level of the window,
//      then the official per-image Dice, then the mean over images with exactly numpy's
//      pairwise summation order, so the score equals bldseg.metrics.scores_from_counts bit
//      for bit;
//   4. keep the best level (first maximum) and push (score, rank) into a top-m heap.
//
// Shapes: vals (N, P) uint8 model-major; truth, vmin, vmax (P,) uint8; img_start (I+1,) int64
// (pixels of image i are [img_start[i], img_start[i+1])); above_tp, above_pp, gt (I,) int64.

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <queue>
#include <tuple>
#include <vector>

namespace {

constexpr double kSmooth = 1e-7;  // bldseg.metrics.SMOOTH
constexpr int64_t kBlock = 128;   // numpy's PW_BLOCKSIZE

struct Library {
  const uint8_t* vals;
  const uint8_t* truth;
  const uint8_t* vmin;
  const uint8_t* vmax;
  const int64_t* img_start;
  const int64_t* above_tp;
  const int64_t* above_pp;
  const int64_t* gt;
  int64_t n_models, n_pixels, n_images;
};

// Pixels still undecided after summing the first d members of the current combination.
struct Depth {
  std::vector<int32_t> idx;       // (P_d,) pixel index into the library
  std::vector<uint16_t> sum;      // (P_d,) partial sum of d members
  std::vector<int64_t> start;     // (I+1,) pixels of image i: [start[i], start[i+1])
  std::vector<int64_t> above_tp;  // (I,) building pixels positive at every window level
  std::vector<int64_t> above_pp;  // (I,) all pixels positive at every window level
};

struct Candidate {
  double score;
  int64_t offset;  // position after the chunk's first combination
  int64_t level;
};

// Heap order: the top of the heap is the *worst* kept candidate (lowest score, then the
// highest offset, as the final order breaks ties by rank).
struct WorseFirst {
  bool operator()(const Candidate& a, const Candidate& b) const {
    if (a.score != b.score) return a.score > b.score;
    return a.offset < b.offset;
  }
};

class Searcher {
 public:
  Searcher(const Library& lib, int64_t k, int64_t first, int64_t last)
      : lib_(lib), k_(k), first_(first), last_(last), nlev_(last - first + 1) {
    depth_.resize(k);
    Depth& d0 = depth_[0];
    d0.idx.resize(lib.n_pixels);
    for (int64_t p = 0; p < lib.n_pixels; ++p) d0.idx[p] = static_cast<int32_t>(p);
    d0.sum.assign(lib.n_pixels, 0);
    d0.start.assign(lib.img_start, lib.img_start + lib.n_images + 1);
    d0.above_tp.assign(lib.above_tp, lib.above_tp + lib.n_images);
    d0.above_pp.assign(lib.above_pp, lib.above_pp + lib.n_images);
    hist_.assign(2 * (nlev_ + 1), 0);
    tpd_.resize(nlev_);
    ppd_.resize(nlev_);
    dice_.resize(nlev_);
    count_.resize(nlev_);
    acc_.assign(8 * nlev_, 0.0);
    // One scratch row per recursion depth of the pairwise sum (log2(I / 128) + 2 suffices).
    int depth = 2;
    for (int64_t n = lib.n_images; n > kBlock; n /= 2) ++depth;
    rows_.assign(depth, std::vector<double>(nlev_, 0.0));
    scores_.resize(nlev_);
  }

  // Rebuild depth d (d >= 1) from depth d-1 and member c = combo[d-1].
  void extend(int64_t d, int64_t c) {
    const Depth& src = depth_[d - 1];
    Depth& dst = depth_[d];
    const int64_t remaining = k_ - d;  // members still to add after this one
    const uint8_t* v = lib_.vals + c * lib_.n_pixels;
    dst.idx.clear();
    dst.sum.clear();
    dst.start.assign(lib_.n_images + 1, 0);
    dst.above_tp = src.above_tp;
    dst.above_pp = src.above_pp;
    for (int64_t i = 0; i < lib_.n_images; ++i) {
      int64_t up_tp = 0, up_pp = 0;
      for (int64_t p = src.start[i]; p < src.start[i + 1]; ++p) {
        const int32_t j = src.idx[p];
        const int64_t s = static_cast<int64_t>(src.sum[p]) + v[j];
        if (s + remaining * lib_.vmin[j] >= last_) {
          up_pp += 1;  // positive at every window level whatever the rest of the ensemble
          up_tp += lib_.truth[j];
        } else if (s + remaining * lib_.vmax[j] >= first_) {
          dst.idx.push_back(j);
          dst.sum.push_back(static_cast<uint16_t>(s));
        }  // else: negative at every window level, contributes nothing
      }
      dst.above_tp[i] += up_tp;
      dst.above_pp[i] += up_pp;
      dst.start[i + 1] = static_cast<int64_t>(dst.idx.size());
    }
  }

  // Per-image Dice at every window level of the combination (prefix state, last member c).
  void image_dice(int64_t i, const Depth& st, const uint8_t* v) {
    const int64_t lo = first_ - 1;
    int64_t* h = hist_.data();  // (nlev+1, 2): bin 0 = below the window, bin b = level lo + b
    for (int64_t p = st.start[i]; p < st.start[i + 1]; ++p) {
      const int32_t j = st.idx[p];
      int64_t s = static_cast<int64_t>(st.sum[p]) + v[j];
      s = std::min(std::max(s, lo), last_);  // a sum >= last is positive at every level
      h[2 * (s - lo) + lib_.truth[j]] += 1;
    }
    // Reverse cumulative counts: pixels with sum >= level; clears the histogram as it goes.
    int64_t tp = st.above_tp[i], pp = st.above_pp[i];
    const int64_t g = lib_.gt[i];
    for (int64_t b = nlev_; b >= 1; --b) {
      tp += h[2 * b + 1];
      pp += h[2 * b] + h[2 * b + 1];
      h[2 * b] = 0;
      h[2 * b + 1] = 0;
      tpd_[b - 1] = static_cast<double>(2 * tp);
      ppd_[b - 1] = static_cast<double>(pp + g);
    }
    h[0] = 0;
    h[1] = 0;
    // The official Dice, the same float64 expression as bldseg.metrics._dice; images that
    // are empty/empty at a level add 0.0 (numpy zeroes NaNs before summing) and are not
    // counted.
    double* d = dice_.data();
    int64_t* cnt = count_.data();
    for (int64_t l = 0; l < nlev_; ++l) {
      const double den = ppd_[l];
      const bool valid = den != 0.0;
      d[l] = valid ? (tpd_[l] + kSmooth) / (den + kSmooth) : 0.0;
      cnt[l] += valid;
    }
  }

  // numpy's pairwise sum over images [i0, i0 + n) of the per-image Dice rows, into out.
  void pairwise(int64_t i0, int64_t n, int level, double* out, const Depth& st,
                const uint8_t* v) {
    if (n < 8) {
      std::fill(out, out + nlev_, 0.0);
      for (int64_t i = i0; i < i0 + n; ++i) {
        image_dice(i, st, v);
        for (int64_t l = 0; l < nlev_; ++l) out[l] += dice_[l];
      }
    } else if (n <= kBlock) {
      double* r = acc_.data();  // (8, nlev) accumulators r[0..7]
      for (int64_t j = 0; j < 8; ++j) {
        image_dice(i0 + j, st, v);
        std::copy(dice_.begin(), dice_.end(), r + j * nlev_);
      }
      int64_t i = 8;
      for (; i < n - (n % 8); ++i) {
        image_dice(i0 + i, st, v);
        double* rj = r + (i % 8) * nlev_;
        for (int64_t l = 0; l < nlev_; ++l) rj[l] += dice_[l];
      }
      for (int64_t l = 0; l < nlev_; ++l) {
        const double* q = r + l;
        const int64_t s = nlev_;
        out[l] = ((q[0] + q[s]) + (q[2 * s] + q[3 * s])) +
                 ((q[4 * s] + q[5 * s]) + (q[6 * s] + q[7 * s]));
      }
      for (; i < n; ++i) {
        image_dice(i0 + i, st, v);
        for (int64_t l = 0; l < nlev_; ++l) out[l] += dice_[l];
      }
    } else {
      int64_t n2 = n / 2;
      n2 -= n2 % 8;
      pairwise(i0, n2, level + 1, out, st, v);
      double* right = rows_[level].data();
      pairwise(i0 + n2, n - n2, level + 1, right, st, v);
      for (int64_t l = 0; l < nlev_; ++l) out[l] += right[l];
    }
  }

  // Score of the combination whose first k-1 members are in the deepest state: best level.
  std::pair<int64_t, double> score(int64_t last_member) {
    const Depth& st = depth_[k_ - 1];
    const uint8_t* v = lib_.vals + last_member * lib_.n_pixels;
    std::fill(count_.begin(), count_.end(), 0);
    // 0.0 + pairwise(all images): np.add.reduce starts from the identity.
    pairwise(0, lib_.n_images, 0, scores_.data(), st, v);
    int64_t best = 0;
    double best_score = -1.0;
    for (int64_t l = 0; l < nlev_; ++l) {
      const double s = count_[l] > 0 ? (0.0 + scores_[l]) / static_cast<double>(count_[l]) : 1.0;
      if (s > best_score) {  // strict: ties go to the lowest level
        best_score = s;
        best = l;
      }
    }
    return {first_ + best, best_score};
  }

  Depth& depth(int64_t d) { return depth_[d]; }

 private:
  const Library& lib_;
  int64_t k_, first_, last_, nlev_;
  std::vector<Depth> depth_;
  std::vector<int64_t> hist_;
  std::vector<double> tpd_, ppd_, dice_, acc_, scores_;
  std::vector<int64_t> count_;
  std::vector<std::vector<double>> rows_;
};

void check(const torch::Tensor& t, torch::ScalarType dtype, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "ensemble search: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "ensemble search: ", name, " has dtype ",
              t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.dim() == dim, "ensemble search: ", name, " must have ", dim, " dimensions");
  TORCH_CHECK(t.is_contiguous(), "ensemble search: ", name, " must be contiguous");
}

// Searches `count` combinations in lexicographic order from `start` (k sorted member
// indices); returns the best `top_m` as (offsets from start, levels, scores), best first.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> search_chunk(
    torch::Tensor vals, torch::Tensor truth, torch::Tensor vmin, torch::Tensor vmax,
    torch::Tensor img_start, torch::Tensor above_tp, torch::Tensor above_pp, torch::Tensor gt,
    torch::Tensor start, int64_t count, int64_t first, int64_t last, int64_t top_m) {
  check(vals, torch::kUInt8, 2, "vals");
  check(truth, torch::kUInt8, 1, "truth");
  check(vmin, torch::kUInt8, 1, "vmin");
  check(vmax, torch::kUInt8, 1, "vmax");
  check(img_start, torch::kInt64, 1, "img_start");
  check(above_tp, torch::kInt64, 1, "above_tp");
  check(above_pp, torch::kInt64, 1, "above_pp");
  check(gt, torch::kInt64, 1, "gt");
  check(start, torch::kInt64, 1, "start");
  const int64_t n_models = vals.size(0), n_pixels = vals.size(1), n_images = gt.size(0);
  const int64_t k = start.size(0);
  TORCH_CHECK(n_pixels < (int64_t(1) << 31), "ensemble search: at most 2^31 kept pixels");
  TORCH_CHECK(k >= 1 && k <= n_models && 255 * k < 65536, "ensemble search: bad k ", k);
  TORCH_CHECK(truth.size(0) == n_pixels && vmin.size(0) == n_pixels &&
                  vmax.size(0) == n_pixels,
              "ensemble search: per-pixel arrays must have ", n_pixels, " entries");
  TORCH_CHECK(img_start.size(0) == n_images + 1 && above_tp.size(0) == n_images &&
                  above_pp.size(0) == n_images && n_images > 0,
              "ensemble search: per-image arrays disagree");
  TORCH_CHECK(0 <= first && first <= last && last <= 255 * k,
              "ensemble search: bad level window [", first, ", ", last, "]");
  TORCH_CHECK(count >= 0 && top_m >= 1, "ensemble search: bad count or top_m");
  std::vector<int64_t> c(start.data_ptr<int64_t>(), start.data_ptr<int64_t>() + k);
  for (int64_t j = 0; j < k; ++j) {
    TORCH_CHECK(c[j] >= 0 && c[j] < n_models && (j == 0 || c[j] > c[j - 1]),
                "ensemble search: start must be k increasing member indices");
  }
  const Library lib{vals.data_ptr<uint8_t>(),   truth.data_ptr<uint8_t>(),
                    vmin.data_ptr<uint8_t>(),   vmax.data_ptr<uint8_t>(),
                    img_start.data_ptr<int64_t>(), above_tp.data_ptr<int64_t>(),
                    above_pp.data_ptr<int64_t>(),  gt.data_ptr<int64_t>(),
                    n_models, n_pixels, n_images};
  std::priority_queue<Candidate, std::vector<Candidate>, WorseFirst> heap;
  {
    pybind11::gil_scoped_release no_gil;
    Searcher searcher(lib, k, first, last);
    for (int64_t d = 1; d < k; ++d) searcher.extend(d, c[d - 1]);
    for (int64_t off = 0; off < count; ++off) {
      const auto [level, score] = searcher.score(c[k - 1]);
      const Candidate cand{score, off, level};
      if (static_cast<int64_t>(heap.size()) < top_m) {
        heap.push(cand);
      } else if (WorseFirst()(cand, heap.top())) {
        heap.pop();
        heap.push(cand);
      }
      if (off + 1 == count) break;
      // Next combination in lexicographic order; rebuild the states after the changed slot.
      int64_t i = k - 1;
      while (i >= 0 && c[i] == n_models - k + i) --i;
      TORCH_CHECK(i >= 0, "ensemble search: ran past the last combination");
      ++c[i];
      for (int64_t j = i + 1; j < k; ++j) c[j] = c[j - 1] + 1;
      for (int64_t d = i + 1; d < k; ++d) searcher.extend(d, c[d - 1]);
    }
  }
  const int64_t m = static_cast<int64_t>(heap.size());
  auto offsets = torch::empty({m}, torch::kInt64);
  auto levels = torch::empty({m}, torch::kInt64);
  auto scores = torch::empty({m}, torch::kFloat64);
  for (int64_t r = m - 1; r >= 0; --r) {  // the heap pops worst first
    offsets[r] = heap.top().offset;
    levels[r] = heap.top().level;
    scores[r] = heap.top().score;
    heap.pop();
  }
  return {offsets, levels, scores};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bldseg exact k-of-N ensemble search (hot loop)";
  m.def("search_chunk", &search_chunk, "Best top_m of `count` combinations from `start`.");
}
