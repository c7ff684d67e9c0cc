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
//      longer cross the window whatever the remaining members, which all come after the
//      current one (suffix bounds: remaining x the min / max over the later models); dropped
//      pixels join the constant counts;
//   2. per image, a histogram of the final sums and a bitmap of its occupied levels. A
//      image's Dice is piecewise constant in the level and only changes just above a sum that
//      occurs in it, so walking the occupied levels gives its Dice on every level range with
//      one division per distinct sum; each change goes into a difference array over levels,
//      in 64-bit fixed point (exact integer adds, so the prefix sums are the fixed-point sums
//      of the rounded per-image Dice). Images without undecided pixels add a constant,
//      computed once per (k-1)-prefix;
//   3. the prefix sums give every level's mean Dice to within a proven bound `tol`; the
//      levels that can still be the best (and only the first of a run of levels where no
//      image changes, as those score identically) are scored exactly: per-image counts,
//      the official Dice and the mean with numpy's pairwise summation order, so the score
//      equals bldseg.metrics.scores_from_counts bit for bit. A combination whose best
//      possible score is below the worst of a full top-m heap is never scored exactly;
//   4. keep the best level (first maximum) and push (score, rank) into a top-m heap.
//
// Shapes: vals, suf_min, suf_max (N, P) uint8 model-major (suf_min[m] = the min over models
// m..N-1, likewise max); truth (P,) uint8; img_start (I+1,) int64 (pixels of image i are
// [img_start[i], img_start[i+1])); above_tp, above_pp, gt (I,) int64.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <queue>
#include <tuple>
#include <vector>

namespace {

constexpr double kSmooth = 1e-7;  // bldseg.metrics.SMOOTH
constexpr int64_t kBlock = 128;   // numpy's PW_BLOCKSIZE
constexpr uint16_t kTruthBit = 0x8000;  // state sums carry the pixel's truth in the top bit
constexpr uint16_t kSumMask = 0x7fff;   // sums are at most 255 k < 2^15

struct Library {
  const uint8_t* vals;
  const uint8_t* suf_min;
  const uint8_t* suf_max;
  const uint8_t* truth;
  const int64_t* img_start;
  const int64_t* above_tp;
  const int64_t* above_pp;
  const int64_t* gt;
  int64_t n_models, n_pixels, n_images;
};

// Pixels still undecided after summing the first d members of the current combination.
struct Depth {
  std::vector<int32_t> idx;       // (P_d,) pixel index into the library
  std::vector<uint16_t> sum;      // (P_d,) partial sum of d members | truth << 15
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

// The official per-image Dice, the same float64 expression as bldseg.metrics._dice; an image
// empty/empty at a level is NaN there, which numpy zeroes before summing (and doesn't count).
inline double dice(int64_t tp, int64_t pp, int64_t g) {
  const double den = static_cast<double>(pp + g);
  return den != 0.0 ? (static_cast<double>(2 * tp) + kSmooth) / (den + kSmooth) : 0.0;
}

// numpy's pairwise_sum of a[0..n) (float64, contiguous): the order np.add.reduce uses.
double pairwise_sum(const double* a, int64_t n) {
  if (n < 8) {
    double res = 0.0;
    for (int64_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= kBlock) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    int64_t i = 8;
    for (; i < n - (n % 8); i += 8) {
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    }
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

class Searcher {
 public:
  Searcher(const Library& lib, int64_t k, int64_t first, int64_t last)
      : lib_(lib), k_(k), first_(first), last_(last), nlev_(last - first + 1) {
    depth_.resize(k);
    Depth& d0 = depth_[0];
    d0.idx.resize(lib.n_pixels);
    d0.sum.resize(lib.n_pixels);
    for (int64_t p = 0; p < lib.n_pixels; ++p) {
      d0.idx[p] = static_cast<int32_t>(p);
      d0.sum[p] = lib.truth[p] ? kTruthBit : 0;
    }
    d0.start.assign(lib.img_start, lib.img_start + lib.n_images + 1);
    d0.above_tp.assign(lib.above_tp, lib.above_tp + lib.n_images);
    d0.above_pp.assign(lib.above_pp, lib.above_pp + lib.n_images);
    // Histogram bins: 0 = below the window, b = sum lo + b, nlev = at or above `last`.
    hist_.assign(2 * (nlev_ + 1), 0);
    words_ = (nlev_ + 1 + 63) / 64;
    bitmap_.assign(words_, 0);
    qdiff_.assign(nlev_, 0);
    cdiff_.assign(nlev_, 0);
    changed_.assign(nlev_, 0);
    dice_.resize(lib.n_images);
    // Fixed point: q = round(Dice * 2^shift_) with I * 2^shift_ < 2^62, so sums never overflow.
    int bits = 0;
    for (int64_t n = lib.n_images; n > 0; n >>= 1) ++bits;
    shift_ = 62 - bits;
    scale_ = std::ldexp(1.0, shift_);
    inv_scale_ = std::ldexp(1.0, -shift_);
    // Bound on |approximate sum - numpy's float sum| over I values in [0, 1]: the fixed-point
    // rounding (I / 2 ulps of 2^-shift), the conversion of the integer sum to double, and the
    // pairwise summation's own error (at most ~(26 + log2(I / 128)) ulps of the sum; 64 +
    // bits is a wide margin). Divided by the image count per level, plus the divisions.
    const double n = static_cast<double>(lib.n_images);
    sum_err_ = 2.0 * n * inv_scale_ + (64.0 + bits) * n * std::ldexp(1.0, -52);
    if (k == 1) finish_last_state();
  }

  // Rebuild depth d (d >= 1) from depth d-1 and member c = combo[d-1].
  void extend(int64_t d, int64_t c) {
    const Depth& src = depth_[d - 1];
    Depth& dst = depth_[d];
    const int64_t remaining = k_ - d;  // members still to add, all from models c+1..N-1
    const uint8_t* v = lib_.vals + c * lib_.n_pixels;
    const uint8_t* rmin = lib_.suf_min + (c + 1) * lib_.n_pixels;
    const uint8_t* rmax = lib_.suf_max + (c + 1) * lib_.n_pixels;
    dst.idx.resize(src.idx.size());
    dst.sum.resize(src.idx.size());
    int32_t* out_idx = dst.idx.data();
    uint16_t* out_sum = dst.sum.data();
    int64_t n_out = 0;
    dst.start.resize(lib_.n_images + 1);
    dst.start[0] = 0;
    dst.above_tp = src.above_tp;
    dst.above_pp = src.above_pp;
    const int32_t* __restrict in_idx = src.idx.data();
    const uint16_t* __restrict in_sum = src.sum.data();
    const int32_t first = static_cast<int32_t>(first_), last = static_cast<int32_t>(last_);
    const int32_t rem = static_cast<int32_t>(remaining);
    for (int64_t i = 0; i < lib_.n_images; ++i) {
      int64_t up_tp = 0, up_pp = 0;
      const int64_t p_end = src.start[i + 1];
      // Branch-free: every pixel is written at n_out, which only advances for kept ones.
      for (int64_t p = src.start[i]; p < p_end; ++p) {
        const int32_t j = in_idx[p];
        const uint16_t w = in_sum[p];
        const int32_t s = static_cast<int32_t>(w & kSumMask) + v[j];
        // Positive at every window level whatever the rest of the ensemble: constant.
        const int32_t up = s + rem * rmin[j] >= last;
        // Negative at every window level (contributes nothing) unless this holds.
        const int32_t keep = (up ^ 1) & (s + rem * rmax[j] >= first);
        out_idx[n_out] = j;
        out_sum[n_out] = static_cast<uint16_t>(s | (w & kTruthBit));
        n_out += keep;
        up_pp += up;
        up_tp += up & (w >> 15);
      }
      dst.above_tp[i] += up_tp;
      dst.above_pp[i] += up_pp;
      dst.start[i + 1] = n_out;
    }
    dst.idx.resize(n_out);
    dst.sum.resize(n_out);
    if (d == k_ - 1) finish_last_state();
  }

  // Scores the combination whose first k-1 members are in the deepest state and whose last
  // member is `last_member`. Returns false (and scores nothing) when no level can score
  // above `floor`; else sets the best level (lowest on ties) and its exact score.
  bool score(int64_t last_member, double floor, int64_t* level, double* best_score) {
    const Depth& st = depth_[k_ - 1];
    const uint8_t* v = lib_.vals + last_member * lib_.n_pixels;
    for (const int64_t i : busy_) image_diff(i, st, v);
    // Prefix sums: every level's approximate mean; one entry per run of equal levels.
    runs_.clear();
    int64_t q = const_q_, cnt = const_cnt_;
    double hi_best = -1.0, lo_best = -1.0;
    for (int64_t l = 0; l < nlev_; ++l) {
      q += qdiff_[l];
      cnt += cdiff_[l];
      qdiff_[l] = 0;
      cdiff_[l] = 0;
      if (l > 0 && !changed_[l]) continue;
      changed_[l] = 0;
      Run r{l, 1.0, 0.0};
      if (cnt > 0) {
        const double c = static_cast<double>(cnt);
        r.approx = static_cast<double>(q) * inv_scale_ / c;
        r.tol = sum_err_ / c + std::ldexp(1.0, -48);
      }
      hi_best = std::max(hi_best, r.approx + r.tol);
      lo_best = std::max(lo_best, r.approx - r.tol);
      runs_.push_back(r);
    }
    if (hi_best < floor) return false;
    // Exact scores of the runs that can hold the maximum, in level order (first max wins).
    *best_score = -1.0;
    for (const Run& r : runs_) {
      if (r.approx + r.tol < lo_best) continue;
      const double s = exact_score(st, v, first_ + r.level);
      if (s > *best_score) {
        *best_score = s;
        *level = first_ + r.level;
      }
    }
    return true;
  }

 private:
  struct Run {
    int64_t level;  // index into the window of the run's first level
    double approx;  // mean Dice from the fixed-point sums
    double tol;     // |approx - exact| <= tol
  };

  // Dice in [0, 1] to fixed point, within one unit of 2^-shift.
  int64_t to_fixed(double x) const { return static_cast<int64_t>(x * scale_ + 0.5); }

  // After the (k-1)-prefix state changes: images without undecided pixels have the same
  // Dice at every level and for every last member; add them up once.
  void finish_last_state() {
    const Depth& st = depth_[k_ - 1];
    busy_.clear();
    const_q_ = 0;
    const_cnt_ = 0;
    for (int64_t i = 0; i < lib_.n_images; ++i) {
      if (st.start[i + 1] > st.start[i]) {
        busy_.push_back(i);
      } else {
        const int64_t pp = st.above_pp[i], g = lib_.gt[i];
        const_q_ += to_fixed(dice(st.above_tp[i], pp, g));
        const_cnt_ += (pp + g) != 0;
      }
    }
  }

  // Adds image i's per-level Dice (fixed point) and valid count to the difference arrays.
  void image_diff(int64_t i, const Depth& st, const uint8_t* v) {
    const int32_t lo = static_cast<int32_t>(first_ - 1), hi = static_cast<int32_t>(last_);
    const int32_t nlev = static_cast<int32_t>(nlev_);
    int32_t* __restrict h = hist_.data();     // (nlev+1, 2) by [bin][truth]
    uint64_t* __restrict bm = bitmap_.data();  // (words,) occupied bins
    const int32_t* __restrict idx = st.idx.data();
    const uint16_t* __restrict sum = st.sum.data();
    const int64_t p_end = st.start[i + 1];
    for (int64_t p = st.start[i]; p < p_end; ++p) {
      const uint16_t w = sum[p];
      int32_t b = static_cast<int32_t>(w & kSumMask) + v[idx[p]];
      b = std::min(std::max(b, lo), hi) - lo;
      h[2 * b + (w >> 15)] += 1;
      bm[b >> 6] |= uint64_t(1) << (b & 63);
    }
    auto take = [h](int64_t slot) {  // reads and clears one (bin, truth) count
      const int64_t n = h[slot];
      h[slot] = 0;
      return n;
    };
    // Counts at the top level: constant pixels plus the sums at or above `last`.
    const int64_t g = lib_.gt[i];
    const int64_t top_tp = take(2 * nlev + 1);
    int64_t tp = st.above_tp[i] + top_tp;
    int64_t pp = st.above_pp[i] + take(2 * nlev) + top_tp;
    take(0);
    take(1);
    int64_t q = to_fixed(dice(tp, pp, g));
    int64_t valid = (pp + g) != 0;
    // Walk the occupied bins b = 1..nlev-1 downwards (sum lo + b: the counts change between
    // level lo + b + 1 and lo + b, i.e. at window index b).
    for (int64_t wi = words_ - 1; wi >= 0; --wi) {
      uint64_t bits = bm[wi];
      bm[wi] = 0;
      if (wi == (nlev >> 6)) bits &= ~(uint64_t(1) << (nlev & 63));
      if (wi == 0) bits &= ~uint64_t(1);
      while (bits) {
        const int top = 63 - __builtin_clzll(bits);
        bits &= ~(uint64_t(1) << top);
        const int64_t b = wi * 64 + top;
        const int64_t t1 = take(2 * b + 1);
        tp += t1;
        pp += take(2 * b) + t1;
        const int64_t q_below = to_fixed(dice(tp, pp, g));
        const int64_t valid_below = (pp + g) != 0;
        qdiff_[b] += q - q_below;
        cdiff_[b] += valid - valid_below;
        changed_[b] = 1;
        q = q_below;
        valid = valid_below;
      }
    }
    qdiff_[0] += q;
    cdiff_[0] += valid;
  }

  // The official score at one level: per-image counts, Dice, numpy's pairwise mean.
  double exact_score(const Depth& st, const uint8_t* v, int64_t level) {
    int64_t cnt = 0;
    const int32_t* __restrict idx = st.idx.data();
    const uint16_t* __restrict sum = st.sum.data();
    for (int64_t i = 0; i < lib_.n_images; ++i) {
      int64_t tp = st.above_tp[i], pp = st.above_pp[i];
      const int64_t p_end = st.start[i + 1];
      for (int64_t p = st.start[i]; p < p_end; ++p) {
        const uint16_t w = sum[p];
        const int64_t pos = static_cast<int64_t>(w & kSumMask) + v[idx[p]] >= level;
        pp += pos;
        tp += pos & (w >> 15);
      }
      const int64_t g = lib_.gt[i];
      dice_[i] = dice(tp, pp, g);
      cnt += (pp + g) != 0;
    }
    if (cnt == 0) return 1.0;  // every image empty/empty: scores_from_counts gives 1.0
    // 0.0 + pairwise(all images): np.add.reduce starts from the identity.
    return (0.0 + pairwise_sum(dice_.data(), lib_.n_images)) / static_cast<double>(cnt);
  }

  const Library& lib_;
  int64_t k_, first_, last_, nlev_, words_;
  int shift_;
  double scale_, inv_scale_, sum_err_;
  std::vector<Depth> depth_;
  std::vector<int32_t> hist_;
  std::vector<int64_t> qdiff_, cdiff_;
  std::vector<uint64_t> bitmap_;
  std::vector<uint8_t> changed_;
  std::vector<double> dice_;
  std::vector<int64_t> busy_;  // images with undecided pixels in the (k-1)-prefix state
  int64_t const_q_ = 0, const_cnt_ = 0;
  std::vector<Run> runs_;
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
    torch::Tensor vals, torch::Tensor suf_min, torch::Tensor suf_max, torch::Tensor truth,
    torch::Tensor img_start, torch::Tensor above_tp, torch::Tensor above_pp, torch::Tensor gt,
    torch::Tensor start, int64_t count, int64_t first, int64_t last, int64_t top_m) {
  check(vals, torch::kUInt8, 2, "vals");
  check(suf_min, torch::kUInt8, 2, "suf_min");
  check(suf_max, torch::kUInt8, 2, "suf_max");
  check(truth, torch::kUInt8, 1, "truth");
  check(img_start, torch::kInt64, 1, "img_start");
  check(above_tp, torch::kInt64, 1, "above_tp");
  check(above_pp, torch::kInt64, 1, "above_pp");
  check(gt, torch::kInt64, 1, "gt");
  check(start, torch::kInt64, 1, "start");
  const int64_t n_models = vals.size(0), n_pixels = vals.size(1), n_images = gt.size(0);
  const int64_t k = start.size(0);
  TORCH_CHECK(n_pixels < (int64_t(1) << 31), "ensemble search: at most 2^31 kept pixels");
  TORCH_CHECK(n_images < (int64_t(1) << 40), "ensemble search: too many images");
  TORCH_CHECK(k >= 1 && k <= n_models && 255 * k <= kSumMask, "ensemble search: bad k ", k);
  TORCH_CHECK(suf_min.sizes() == vals.sizes() && suf_max.sizes() == vals.sizes(),
              "ensemble search: suf_min and suf_max must have the shape of vals");
  TORCH_CHECK(truth.size(0) == n_pixels, "ensemble search: truth must have ", n_pixels,
              " entries");
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
  const Library lib{vals.data_ptr<uint8_t>(),      suf_min.data_ptr<uint8_t>(),
                    suf_max.data_ptr<uint8_t>(),   truth.data_ptr<uint8_t>(),
                    img_start.data_ptr<int64_t>(), above_tp.data_ptr<int64_t>(),
                    above_pp.data_ptr<int64_t>(),  gt.data_ptr<int64_t>(),
                    n_models,                      n_pixels,
                    n_images};
  std::priority_queue<Candidate, std::vector<Candidate>, WorseFirst> heap;
  {
    pybind11::gil_scoped_release no_gil;
    Searcher searcher(lib, k, first, last);
    for (int64_t d = 1; d < k; ++d) searcher.extend(d, c[d - 1]);
    for (int64_t off = 0; off < count; ++off) {
      // A candidate enters a full heap only with a strictly higher score than its worst (a
      // tie loses to the lower rank already in it).
      const bool full = static_cast<int64_t>(heap.size()) >= top_m;
      const double floor = full ? heap.top().score : -std::numeric_limits<double>::infinity();
      int64_t level = 0;
      double score = 0.0;
      if (searcher.score(c[k - 1], floor, &level, &score)) {
        const Candidate cand{score, off, level};
        if (!full) {
          heap.push(cand);
        } else if (WorseFirst()(cand, heap.top())) {
          heap.pop();
          heap.push(cand);
        }
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
