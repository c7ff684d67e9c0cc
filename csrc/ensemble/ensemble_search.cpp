// Exact k-of-N ensemble search: the hot loop of bldseg/ensemble/search.py.
//
// Input is a *pruned* library (see bldseg/ensemble/prune.py): only the P pixels whose summed
// value can cross a threshold level in [first, last] for some k-model combination are kept,
// grouped by image; every other pixel's contribution is constant and arrives as per-image
// counts (above_tp / above_pp: pixels positive at every level of the window, gt: building
// pixels). Levels are indexed inside the window: l = level - first, l in [0, nlev). For each
// combination, in lexicographic order from a given start, we
//
//   1. sum the members' uint8 values per kept pixel, reusing the partial sums of the longest
//      unchanged prefix (one state per depth), and at every depth drop the pixels that can no
//      longer cross the window whatever the remaining members, which all come after the
//      current one (suffix bounds: remaining x the min / max over the later models); dropped
//      pixels join the constant counts;
//   2. one pass over the pixels: per image, a histogram of (final sum, truth) at full
//      resolution (AVX2 where the CPU has it for the compaction of step 1 and the reads
//      here). The window is cut into blocks of B levels; reading the histogram back from the
//      top gives every image's exact counts at each block's lowest level, hence
//        - the mean Dice at every block's lowest level (a lower bound on the best score), and
//        - per block an upper bound on the mean Dice of any level inside it: per image, the
//          largest tp and the smallest pp of the block (Dice is monotone in both), over the
//          smallest count of scored images in the block.
//      The level bins of some blocks are kept (those the previous combination wanted and
//      their neighbours; neighbouring combinations want nearly the same levels). Per-image
//      Dice values are summed in 64-bit fixed point (exact integer adds, so the sum does not
//      depend on the order), which approximates the official float mean within a proven
//      bound `tol`. A combination whose every block bound is below `floor` (the worst score
//      of a full top-m heap, or a floor given by the caller) ends here, as most do;
//   3. the wanted blocks, whose bound reaches max(floor, lower bound), are walked level by
//      level from their kept bins (a wanted block whose bins were not kept costs one more
//      pass). An image's Dice only changes just below a level where one of its pixels stops
//      being positive, so walking the occupied levels down from the block's top (whose
//      exact counts step 2 found) gives its Dice at every level of the block with one
//      division per distinct sum; each change goes into a difference array over levels.
//      Its prefix sums give every level's mean within `tol`;
//   4. the levels that can still be the best (and only the first of a run of levels where no
//      image changes, as those score identically) are scored exactly from the kept bins:
//      per-image counts, the official Dice and the mean with numpy's pairwise summation
//      order, so the score equals bldseg.metrics.scores_from_counts bit for bit; keep the
//      best level (first maximum) and push (score, rank) into a top-m heap.
//
// Pixel values are stored doubled with the truth in bit 0, w = 2 sum + truth (uint16, so
// 255 k <= 32767): a level test `sum >= L` is `w >= 2 L`, and w + 2 v indexes the histogram.
//
// Shapes: vals, suf_min, suf_max (N, P) uint8 model-major (suf_min[m] = the min over models
// m..N-1, likewise max); truth (P,) uint8; img_start (I+1,) int64 (pixels of image i are
// [img_start[i], img_start[i+1])); above_tp, above_pp, gt (I,) int64.

#include <torch/extension.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BLDSEG_X86_DISPATCH 1
#include <immintrin.h>
#else
#define BLDSEG_X86_DISPATCH 0
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cctype>
#include <cstdlib>
#include <limits>
#include <queue>
#include <string>
#include <tuple>
#include <vector>

namespace {

constexpr double kSmooth = 1e-7;  // bldseg.metrics.SMOOTH
constexpr int64_t kBlock = 128;   // numpy's PW_BLOCKSIZE

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
  std::vector<int32_t> idx;       // (>= P_d,) pixel index into the library, ascending
  std::vector<uint16_t> w;        // (>= P_d,) 2 x partial sum of d members + truth
  std::vector<int64_t> start;     // (I+1,) pixels of image i: [start[i], start[i+1])
  std::vector<int64_t> above_tp;  // (I,) building pixels positive at every window level
  std::vector<int64_t> above_pp;  // (I,) all pixels positive at every window level
  int64_t size() const { return start.back(); }  // P_d
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

// The largest Dice an image can have at a level whose counts satisfy tp <= tp_hi and
// pp_lo <= pp <= pp_hi (always tp <= pp). Dice grows with tp and, for tp fixed, falls with pp;
// with tp <= pp the maximum sits at pp = max(pp_lo, tp_hi). An image without buildings
// scores 1e-7 / (pp + 1e-7) whenever pp > 0, at most with pp = max(pp_lo, 1).
inline double dice_upper(int64_t tp_hi, int64_t pp_lo, int64_t pp_hi, int64_t g) {
  if (g == 0) return pp_hi > 0 ? dice(0, std::max<int64_t>(pp_lo, 1), 0) : 0.0;
  return dice(tp_hi, std::max(pp_lo, tp_hi), g);
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

// Whether $BLDSEG_CPU_NO_AVX2 asks for the scalar paths: set to anything but "", 0, false, no
// or off (any case), the DCNv3 op's rule for its switches.
bool no_avx2_requested() {
  const char* value = std::getenv("BLDSEG_CPU_NO_AVX2");
  if (value == nullptr) return false;
  std::string v(value);
  for (char& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return !(v.empty() || v == "0" || v == "false" || v == "no" || v == "off");
}

// AVX2 paths where the CPU has them, unless $BLDSEG_CPU_NO_AVX2 is on (read once; the same
// switch as the DCNv3 op's, which the tests use to cover the scalar paths on AVX2 machines).
bool cpu_has_avx2() {
#if BLDSEG_X86_DISPATCH
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt") &&
                          !no_avx2_requested();
  return has;
#else
  return false;
#endif
}

// Step 1 for n pixels: adds member v, keeps the pixels still undecided. Every pixel is
// written at n_out, which only advances for kept ones (branch-free), so `out_*` need room for
// n (+ 8 for the vector path). Returns the kept count; adds the pixels now positive at every
// window level to *up_pp / *up_tp. `in_idx` is ascending and `np` the plane length: the
// vector path reads 4 bytes per gathered byte, so it stops 3 pixels short of a plane's end.
struct ExtendArgs {
  const uint8_t* v;     // (P,) the new member's values
  const uint8_t* rmin;  // (P,) min over the members that may still follow
  const uint8_t* rmax;  // (P,) max over them
  int32_t two_first, two_last, two_rem;
  int64_t np;
};

int64_t extend_scalar(const int32_t* __restrict in_idx, const uint16_t* __restrict in_w,
                      int64_t p, int64_t n, const ExtendArgs& a, int32_t* __restrict out_idx,
                      uint16_t* __restrict out_w, int64_t n_out, int64_t* up_pp,
                      int64_t* up_tp) {
  const uint8_t* __restrict v = a.v;
  const uint8_t* __restrict rmin = a.rmin;
  const uint8_t* __restrict rmax = a.rmax;
  int64_t pp = 0, tp = 0;
  for (; p < n; ++p) {
    const int32_t j = in_idx[p];
    const int32_t w = static_cast<int32_t>(in_w[p]) + 2 * static_cast<int32_t>(v[j]);
    // Positive at every window level whatever the rest of the ensemble: constant.
    const int32_t up = w + a.two_rem * static_cast<int32_t>(rmin[j]) >= a.two_last;
    // Negative at every window level (contributes nothing) unless this holds.
    const int32_t keep =
        (up ^ 1) & (w + a.two_rem * static_cast<int32_t>(rmax[j]) >= a.two_first);
    out_idx[n_out] = j;
    out_w[n_out] = static_cast<uint16_t>(w);
    n_out += keep;
    pp += up;
    tp += up & w;
  }
  *up_pp += pp;
  *up_tp += tp;
  return n_out;
}

#if BLDSEG_X86_DISPATCH
#define BLDSEG_AVX2 __attribute__((target("avx2,popcnt")))
// Inlines every call into the AVX2 entry points, so the generic helpers they use are
// compiled for AVX2 too (a call from generic code into AVX2 code cannot be inlined).
#define BLDSEG_FLATTEN __attribute__((flatten))

// Lane order that packs the lanes of an 8-bit mask to the front (AVX2 stream compaction).
struct CompactTable {
  alignas(16) uint8_t lanes[256][8];
  CompactTable() {
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      for (int b = 0; b < 8; ++b) {
        if (m >> b & 1) lanes[m][n++] = static_cast<uint8_t>(b);
      }
      for (; n < 8; ++n) lanes[m][n] = 0;
    }
  }
};
const CompactTable kCompact;

BLDSEG_AVX2 int64_t extend_avx2(const int32_t* __restrict in_idx,
                                const uint16_t* __restrict in_w, int64_t n, const ExtendArgs& a,
                                int32_t* __restrict out_idx, uint16_t* __restrict out_w,
                                int64_t* up_pp, int64_t* up_tp) {
  const __m256i low_byte = _mm256_set1_epi32(0xff), one = _mm256_set1_epi32(1);
  const __m256i first_m1 = _mm256_set1_epi32(a.two_first - 1);
  const __m256i last_m1 = _mm256_set1_epi32(a.two_last - 1);
  const __m256i rem = _mm256_set1_epi32(a.two_rem);
  const int64_t safe_end = a.np - 3;  // a 4-byte gather at j < np - 3 stays inside the array
  int64_t n_out = 0, pp = 0, tp = 0, p = 0;
  for (; p + 8 <= n && in_idx[p + 7] < safe_end; p += 8) {
    const __m256i j = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in_idx + p));
    const __m256i w0 =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in_w + p)));
    const __m256i v =
        _mm256_and_si256(_mm256_i32gather_epi32(reinterpret_cast<const int*>(a.v), j, 1),
                         low_byte);
    const __m256i mn =
        _mm256_and_si256(_mm256_i32gather_epi32(reinterpret_cast<const int*>(a.rmin), j, 1),
                         low_byte);
    const __m256i mx =
        _mm256_and_si256(_mm256_i32gather_epi32(reinterpret_cast<const int*>(a.rmax), j, 1),
                         low_byte);
    const __m256i w = _mm256_add_epi32(w0, _mm256_add_epi32(v, v));  // (8,) int32
    const __m256i up =
        _mm256_cmpgt_epi32(_mm256_add_epi32(w, _mm256_mullo_epi32(rem, mn)), last_m1);
    const __m256i may =
        _mm256_cmpgt_epi32(_mm256_add_epi32(w, _mm256_mullo_epi32(rem, mx)), first_m1);
    const __m256i truth = _mm256_cmpeq_epi32(_mm256_and_si256(w, one), one);
    const unsigned up_m = _mm256_movemask_ps(_mm256_castsi256_ps(up));
    const unsigned keep_m =
        _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(up, may)));
    const unsigned truth_m = _mm256_movemask_ps(_mm256_castsi256_ps(truth));
    const __m256i order = _mm256_cvtepu8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kCompact.lanes[keep_m])));
    const __m256i kept_j = _mm256_permutevar8x32_epi32(j, order);
    const __m256i kept_w = _mm256_permutevar8x32_epi32(w, order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_idx + n_out), kept_j);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out_w + n_out),
                     _mm_packus_epi32(_mm256_castsi256_si128(kept_w),
                                      _mm256_extracti128_si256(kept_w, 1)));
    n_out += _mm_popcnt_u32(keep_m);
    pp += _mm_popcnt_u32(up_m);
    tp += _mm_popcnt_u32(up_m & truth_m);
  }
  *up_pp += pp;
  *up_tp += tp;
  return extend_scalar(in_idx, in_w, p, n, a, out_idx, out_w, n_out, up_pp, up_tp);
}

#endif  // BLDSEG_X86_DISPATCH

int64_t extend_pixels(bool avx2, const int32_t* in_idx, const uint16_t* in_w, int64_t n,
                      const ExtendArgs& a, int32_t* out_idx, uint16_t* out_w, int64_t* up_pp,
                      int64_t* up_tp) {
#if BLDSEG_X86_DISPATCH
  if (avx2) return extend_avx2(in_idx, in_w, n, a, out_idx, out_w, up_pp, up_tp);
#endif
  return extend_scalar(in_idx, in_w, 0, n, a, out_idx, out_w, 0, up_pp, up_tp);
}

// h[w + 2 v] += 1 for n pixels: the histogram of x = 2 sum + truth at full resolution. A
// direct index (no lookup table, no clamping) is the shortest dependency chain per pixel
// (measured: clamping to the window costs more than it saves in reading the bins back).
void histogram(const int32_t* __restrict idx, const uint16_t* __restrict w, int64_t n,
               const uint8_t* __restrict v, int32_t* __restrict h) {
  for (int64_t p = 0; p < n; ++p) ++h[w[p] + 2 * v[idx[p]]];
}

// Sums h[x0..x1) (x0 and x1 even) into all / odd (truth) counts and zeroes it.
void take_bins_scalar(int32_t* __restrict h, int64_t x0, int64_t x1, int64_t* all,
                      int64_t* odd) {
  int64_t e = 0, o = 0;
  for (int64_t x = x0; x < x1; x += 2) {
    e += h[x];
    o += h[x + 1];
    h[x] = 0;
    h[x + 1] = 0;
  }
  *all += e + o;
  *odd += o;
}

// The image's counts at every block's lowest level from its histogram, top down: tps / pps
// [nb] = the constant pixels plus those above the window, [j] = [j + 1] plus the pixels
// whose highest positive level lies in block j. A final sum s sits in bins 2 s (truth 0) and
// 2 s + 1, so window level t's pixels are bins 2 (first + t) and + 1, and sums above `last`
// start at 2 (first + nlev). The bins of kept blocks are copied to `kept + slot[j]` first;
// every bin read is zeroed (those below the window are left for the caller).
struct Blocks {
  int64_t first, nlev, block, n_blocks, n_x;  // n_x: histogram bins, 2 (255 k + 1)
  const int64_t* slot;  // (n_blocks,) first slot of a kept block in `kept`, or -1
};

template <class Take>
inline void digest(int32_t* __restrict h, const Blocks& b, int64_t tp, int64_t pp,
                   int64_t* __restrict tps, int64_t* __restrict pps, int32_t* __restrict kept,
                   Take take) {
  take(h, 2 * (b.first + b.nlev), b.n_x, &pp, &tp);
  tps[b.n_blocks] = tp;
  pps[b.n_blocks] = pp;
  for (int64_t j = b.n_blocks - 1; j >= 0; --j) {
    const int64_t x0 = 2 * (b.first + j * b.block);
    const int64_t x1 = 2 * (b.first + std::min((j + 1) * b.block, b.nlev));
    if (b.slot[j] >= 0) std::copy(h + x0, h + x1, kept + b.slot[j]);
    take(h, x0, x1, &pp, &tp);
    tps[j] = tp;
    pps[j] = pp;
  }
}

#if BLDSEG_X86_DISPATCH
BLDSEG_AVX2 inline int64_t hsum_avx2(__m256i x) {
  const __m128i a = _mm_add_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
  const __m128i b = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(b, _mm_shuffle_epi32(b, 0xb1)));
}

BLDSEG_AVX2 inline void take_bins_avx2(int32_t* __restrict h, int64_t x0, int64_t x1,
                                       int64_t* all, int64_t* odd) {
  // Lanes 1, 3, 5, 7 hold odd bins (x0 is even). Per-lane int32 sums cannot overflow: the
  // bins of one image hold at most its pixel count.
  const __m256i odd_lanes = _mm256_setr_epi32(0, -1, 0, -1, 0, -1, 0, -1);
  const __m256i zero = _mm256_setzero_si256();
  __m256i acc_all = zero, acc_odd = zero;
  int64_t x = x0;
  for (; x + 8 <= x1; x += 8) {
    __m256i* at = reinterpret_cast<__m256i*>(h + x);
    const __m256i b = _mm256_loadu_si256(at);
    acc_all = _mm256_add_epi32(acc_all, b);
    acc_odd = _mm256_add_epi32(acc_odd, _mm256_and_si256(b, odd_lanes));
    _mm256_storeu_si256(at, zero);
  }
  *all += hsum_avx2(acc_all);
  *odd += hsum_avx2(acc_odd);
  take_bins_scalar(h, x, x1, all, odd);
}

BLDSEG_AVX2 BLDSEG_FLATTEN void digest_avx2(int32_t* h, const Blocks& b, int64_t tp, int64_t pp,
                                           int64_t* tps, int64_t* pps, int32_t* kept) {
  digest(h, b, tp, pp, tps, pps, kept,
         [](int32_t* hh, int64_t x0, int64_t x1, int64_t* all, int64_t* odd)
             BLDSEG_AVX2 { take_bins_avx2(hh, x0, x1, all, odd); });
}
#endif  // BLDSEG_X86_DISPATCH

void digest_image(bool avx2, int32_t* h, const Blocks& b, int64_t tp, int64_t pp, int64_t* tps,
                  int64_t* pps, int32_t* kept) {
#if BLDSEG_X86_DISPATCH
  if (avx2) return digest_avx2(h, b, tp, pp, tps, pps, kept);
#endif
  digest(h, b, tp, pp, tps, pps, kept, take_bins_scalar);
}

class Searcher {
 public:
  Searcher(const Library& lib, int64_t k, int64_t first, int64_t last, int64_t block)
      : lib_(lib),
        k_(k),
        first_(first),
        last_(last),
        nlev_(last - first + 1),
        block_(block),
        n_blocks_((nlev_ + block - 1) / block),
        avx2_(cpu_has_avx2()) {
    depth_.resize(k);
    Depth& d0 = depth_[0];
    d0.idx.resize(lib.n_pixels);
    d0.w.resize(lib.n_pixels);
    for (int64_t p = 0; p < lib.n_pixels; ++p) {
      d0.idx[p] = static_cast<int32_t>(p);
      d0.w[p] = lib.truth[p] ? 1 : 0;
    }
    d0.start.assign(lib.img_start, lib.img_start + lib.n_images + 1);
    d0.above_tp.assign(lib.above_tp, lib.above_tp + lib.n_images);
    d0.above_pp.assign(lib.above_pp, lib.above_pp + lib.n_images);
    hist_.assign(2 * (255 * k + 1), 0);
    img_tp_.resize(lib.n_images * (n_blocks_ + 1));
    img_pp_.resize(lib.n_images * (n_blocks_ + 1));
    bound_q_.assign(n_blocks_ + 1, 0);
    bound_cnt_.assign(n_blocks_ + 1, 0);
    upper_q_.assign(n_blocks_, 0);
    wanted_.assign(n_blocks_, 0);
    kept_.assign(n_blocks_, 1);  // the first combination keeps every block's bins
    slot_.assign(n_blocks_, -1);
    qdiff_.assign(nlev_, 0);
    cdiff_.assign(nlev_, 0);
    changed_.assign(nlev_ + 1, 0);
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
    // The upper bounds add a few ulps per image more: the float Dice at the bounding counts
    // is above the float Dice at any level of the block up to rounding.
    upper_err_ = sum_err_ + 4.0 * n * inv_scale_;
    if (k == 1) finish_last_state();
  }

  // Rebuild depth d (d >= 1) from depth d-1 and member c = combo[d-1].
  void extend(int64_t d, int64_t c) {
    const Depth& src = depth_[d - 1];
    Depth& dst = depth_[d];
    const int64_t np = lib_.n_pixels;
    // Members still to add: k - d, all from models c+1..N-1.
    const ExtendArgs args{lib_.vals + c * np,
                          lib_.suf_min + (c + 1) * np,
                          lib_.suf_max + (c + 1) * np,
                          static_cast<int32_t>(2 * first_),
                          static_cast<int32_t>(2 * last_),
                          static_cast<int32_t>(2 * (k_ - d)),
                          np};
    // Buffers only grow (no zero-fill per rebuild); the vector path writes 8 lanes at a time.
    const size_t room = static_cast<size_t>(src.size()) + 8;
    if (dst.idx.size() < room) {
      dst.idx.resize(room);
      dst.w.resize(room);
    }
    dst.start.resize(lib_.n_images + 1);
    dst.above_tp = src.above_tp;
    dst.above_pp = src.above_pp;
    int64_t n_out = 0;
    dst.start[0] = 0;
    for (int64_t i = 0; i < lib_.n_images; ++i) {
      const int64_t a = src.start[i], n = src.start[i + 1] - a;
      const int32_t* in_idx = src.idx.data() + a;
      const uint16_t* in_w = src.w.data() + a;
      int32_t* out_idx = dst.idx.data() + n_out;
      uint16_t* out_w = dst.w.data() + n_out;
      n_out += extend_pixels(avx2_, in_idx, in_w, n, args, out_idx, out_w, &dst.above_pp[i],
                             &dst.above_tp[i]);
      dst.start[i + 1] = n_out;
    }
    if (d == k_ - 1) finish_last_state();
  }

  // Scores the combination whose first k-1 members are in the deepest state and whose last
  // member is `last_member`. Returns false (and scores nothing) when no level can score
  // `floor` or more; else sets the best level (lowest on ties) and its exact score.
  bool score(int64_t last_member, double floor, int64_t* level, double* best_score) {
    const Depth& st = depth_[k_ - 1];
    const uint8_t* v = lib_.vals + last_member * lib_.n_pixels;
    const int64_t nb = n_blocks_;
    pixel_pass(st, v);
    // Step 2: which blocks can hold a level scoring max(floor, a level's score) or more.
    if (!find_wanted(floor)) return false;
    bool missed = false;
    for (int64_t j = 0; j < nb; ++j) missed |= wanted_[j] && !kept_[j];
    if (missed) {
      // The bins of a wanted block were not kept: keep them too and pass again (about 3% of
      // the combinations of the 2,000-tile benchmark, as neighbouring combinations want
      // nearly the same blocks). The bounds come out the same.
      for (int64_t j = 0; j < nb; ++j) kept_[j] |= wanted_[j];
      pixel_pass(st, v);
    }
    // Keep, for the next combination, the wanted blocks and their neighbours.
    for (int64_t j = 0; j < nb; ++j) {
      kept_[j] = wanted_[j] || (j > 0 && wanted_[j - 1]) || (j + 1 < nb && wanted_[j + 1]);
    }
    walk_wanted();
    // Step 3: every wanted level's approximate mean, from the block's top down.
    runs_.clear();
    double hi_best = -1.0, lo_best = -1.0;
    for (int64_t j = 0; j < nb; ++j) {
      if (!wanted_[j]) continue;
      const int64_t a = j * block_, b = std::min(a + block_, nlev_);
      int64_t q = bound_q_[j + 1], cnt = bound_cnt_[j + 1];
      const size_t first_run = runs_.size();
      for (int64_t l = b - 1; l >= a; --l) {
        q += qdiff_[l];
        cnt += cdiff_[l];
        qdiff_[l] = 0;
        cdiff_[l] = 0;
        const double approx = mean(q, cnt), t = tol(cnt);
        hi_best = std::max(hi_best, approx + t);
        lo_best = std::max(lo_best, approx - t);
        // A run of equal levels starts where a pixel stops being positive just below; the
        // block's lowest level counts as a start (the level below may not have been walked).
        if (l == a || changed_[l]) runs_.push_back(Run{l, approx, t});
        changed_[l] = 0;
      }
      changed_[b] = 0;
      std::reverse(runs_.begin() + static_cast<std::ptrdiff_t>(first_run), runs_.end());
    }
    if (hi_best < floor) return false;
    // Step 4: exact scores of the runs that can hold the maximum, in level order.
    *best_score = -1.0;
    for (const Run& r : runs_) {
      if (r.approx + r.tol < lo_best) continue;
      const double s = exact_score(st, r.level);
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

  // The mean from a fixed-point sum over `cnt` scored images (no image scored: 1.0, as
  // scores_from_counts), and the bound on its distance to the official float mean.
  double mean(int64_t q, int64_t cnt) const {
    return cnt > 0 ? static_cast<double>(q) * inv_scale_ / static_cast<double>(cnt) : 1.0;
  }
  double tol(int64_t cnt) const {
    return cnt > 0 ? sum_err_ / static_cast<double>(cnt) + std::ldexp(1.0, -48) : 0.0;
  }

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

  // Steps 2-3 for every busy image: one histogram of the final sums, from which the counts at
  // each block's lowest level (bound_q_ / bound_cnt_, and the block upper bounds upper_q_)
  // and, for the blocks in kept_, the bins of every level (for the walk and exact scores).
  void pixel_pass(const Depth& st, const uint8_t* v) {
    const int64_t nb = n_blocks_;
    int64_t n_slots = 0;
    for (int64_t j = 0; j < nb; ++j) {
      slot_[j] = kept_[j] ? n_slots : -1;
      if (kept_[j]) n_slots += 2 * (std::min((j + 1) * block_, nlev_) - j * block_);
    }
    n_slots_ = n_slots;
    if (static_cast<int64_t>(bins_.size()) < lib_.n_images * n_slots) {
      bins_.resize(lib_.n_images * n_slots);
    }
    for (int64_t j = 0; j <= nb; ++j) {
      bound_q_[j] = const_q_;
      bound_cnt_[j] = const_cnt_;
    }
    for (int64_t j = 0; j < nb; ++j) upper_q_[j] = const_q_;
    int32_t* h = hist_.data();
    const int64_t x_first = 2 * first_;  // bins of sums below the window end here
    // Bins below the window (never positive) are never read: clear them once per pass
    // rather than per image (their counts only need to stay far from overflowing).
    std::fill(h, h + x_first, 0);
    const Blocks blocks{first_, nlev_, block_, nb, static_cast<int64_t>(hist_.size()),
                        slot_.data()};
    for (const int64_t i : busy_) {
      const int64_t a = st.start[i];
      histogram(st.idx.data() + a, st.w.data() + a, st.start[i + 1] - a, v, h);
      int64_t* tps = img_tp_.data() + i * (nb + 1);
      int64_t* pps = img_pp_.data() + i * (nb + 1);
      int32_t* kept = bins_.data() + i * n_slots;
      digest_image(avx2_, h, blocks, st.above_tp[i], st.above_pp[i], tps, pps, kept);
      const int64_t g = lib_.gt[i];
      for (int64_t j = 0; j <= nb; ++j) {
        bound_q_[j] += to_fixed(dice(tps[j], pps[j], g));
        bound_cnt_[j] += (pps[j] + g) != 0;
      }
      for (int64_t j = 0; j < nb; ++j) {
        upper_q_[j] += to_fixed(dice_upper(tps[j], pps[j + 1], pps[j], g));
      }
    }
  }

  // Sets wanted_: the blocks whose upper bound reaches max(floor, the best lower bound).
  // Returns false when none does (no level can score `floor` or more).
  bool find_wanted(double floor) {
    const int64_t nb = n_blocks_;
    double lower = -1.0;  // some level (a block's lowest) scores at least this
    for (int64_t j = 0; j < nb; ++j) {
      lower = std::max(lower, mean(bound_q_[j], bound_cnt_[j]) - tol(bound_cnt_[j]));
    }
    const double need = std::max(lower, floor);
    bool any = false;
    for (int64_t j = 0; j < nb; ++j) {
      // Every level of block j scores at least the images scored at the next block's lowest.
      const int64_t cnt = bound_cnt_[j + 1];
      const double upper =
          cnt > 0 ? static_cast<double>(upper_q_[j]) * inv_scale_ / static_cast<double>(cnt) +
                        upper_err_ / static_cast<double>(cnt) + std::ldexp(1.0, -48)
                  : std::numeric_limits<double>::infinity();  // all empty/empty scores 1
      wanted_[j] = upper >= need;
      any |= wanted_[j] != 0;
    }
    return any;
  }

  // Step 3 for every busy image: the kept bins of each wanted block walked down from the
  // block's top (whose counts the pass found) into the difference arrays.
  void walk_wanted() {
    const int64_t nb = n_blocks_;
    for (const int64_t i : busy_) {
      const int64_t g = lib_.gt[i];
      const int64_t* tps = img_tp_.data() + i * (nb + 1);
      const int64_t* pps = img_pp_.data() + i * (nb + 1);
      const int32_t* kept = bins_.data() + i * n_slots_;
      for (int64_t j = 0; j < nb; ++j) {
        if (!wanted_[j]) continue;
        const int64_t lo = j * block_, hi = std::min(lo + block_, nlev_);
        const int32_t* c = kept + slot_[j] - 2 * lo;  // c[2 t], c[2 t + 1]: level t's bins
        // Counts at level hi (the next block's lowest); the pixels of level t are positive
        // at t and below.
        int64_t tp = tps[j + 1], pp = pps[j + 1];
        int64_t q = to_fixed(dice(tp, pp, g));
        int64_t valid = (pp + g) != 0;
        for (int64_t t = hi - 1; t >= lo; --t) {
          const int32_t n0 = c[2 * t], n1 = c[2 * t + 1];
          if ((n0 | n1) == 0) continue;
          tp += n1;
          pp += n0 + n1;
          const int64_t q_t = to_fixed(dice(tp, pp, g));
          const int64_t valid_t = (pp + g) != 0;
          qdiff_[t] += q_t - q;
          cdiff_[t] += valid_t - valid;
          changed_[t + 1] = 1;  // level t + 1 differs from level t
          q = q_t;
          valid = valid_t;
        }
      }
    }
  }

  // The official score at window level t of a wanted block: per-image counts from the kept
  // bins, Dice, numpy's pairwise mean.
  double exact_score(const Depth& st, int64_t t) {
    const int64_t nb = n_blocks_, j = t / block_;
    const int64_t lo = j * block_, hi = std::min(lo + block_, nlev_);
    int64_t cnt = 0;
    size_t b = 0;  // position in busy_ (ascending image order)
    for (int64_t i = 0; i < lib_.n_images; ++i) {
      int64_t tp = st.above_tp[i], pp = st.above_pp[i];
      if (b < busy_.size() && busy_[b] == i) {
        ++b;
        tp = img_tp_[i * (nb + 1) + j + 1];
        pp = img_pp_[i * (nb + 1) + j + 1];
        const int32_t* c = bins_.data() + i * n_slots_ + slot_[j] - 2 * lo;
        for (int64_t u = t; u < hi; ++u) {
          tp += c[2 * u + 1];
          pp += c[2 * u] + c[2 * u + 1];
        }
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
  int64_t k_, first_, last_, nlev_, block_, n_blocks_;
  bool avx2_;
  int shift_;
  double scale_, inv_scale_, sum_err_, upper_err_;
  std::vector<Depth> depth_;
  std::vector<int32_t> hist_;                  // (2 (255 k + 1),) by x = 2 sum + truth
  std::vector<int64_t> img_tp_, img_pp_;       // (I, n_blocks + 1) counts at block bottoms
  std::vector<int32_t> bins_;                  // (I, n_slots_) kept blocks' level bins
  std::vector<int64_t> slot_;                  // (n_blocks,) block's first slot, or -1
  int64_t n_slots_ = 0;
  std::vector<int64_t> bound_q_, bound_cnt_;   // (n_blocks + 1,)
  std::vector<int64_t> upper_q_;               // (n_blocks,)
  std::vector<uint8_t> wanted_, kept_;         // (n_blocks,)
  std::vector<int64_t> qdiff_, cdiff_;         // (nlev,) level t minus level t + 1
  std::vector<uint8_t> changed_;               // (nlev + 1,)
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
// indices); returns the best `top_m` of those scoring at least `floor` as (offsets from
// start, levels, scores), best first. `block`: threshold levels per block of the bounds.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> search_chunk(
    torch::Tensor vals, torch::Tensor suf_min, torch::Tensor suf_max, torch::Tensor truth,
    torch::Tensor img_start, torch::Tensor above_tp, torch::Tensor above_pp, torch::Tensor gt,
    torch::Tensor start, int64_t count, int64_t first, int64_t last, int64_t top_m,
    double floor, int64_t block) {
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
  TORCH_CHECK(k >= 1 && k <= n_models && 2 * 255 * k + 1 <= 0xffff,
              "ensemble search: bad k ", k);
  TORCH_CHECK(suf_min.sizes() == vals.sizes() && suf_max.sizes() == vals.sizes(),
              "ensemble search: suf_min and suf_max must have the shape of vals");
  TORCH_CHECK(truth.size(0) == n_pixels, "ensemble search: truth must have ", n_pixels,
              " entries");
  TORCH_CHECK(img_start.size(0) == n_images + 1 && above_tp.size(0) == n_images &&
                  above_pp.size(0) == n_images && n_images > 0,
              "ensemble search: per-image arrays disagree");
  TORCH_CHECK(0 <= first && first <= last && last <= 255 * k,
              "ensemble search: bad level window [", first, ", ", last, "]");
  TORCH_CHECK(count >= 0 && top_m >= 1 && block >= 1,
              "ensemble search: bad count, top_m or block");
  TORCH_CHECK(!std::isnan(floor), "ensemble search: floor is NaN");
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
    Searcher searcher(lib, k, first, last, block);
    for (int64_t d = 1; d < k; ++d) searcher.extend(d, c[d - 1]);
    for (int64_t off = 0; off < count; ++off) {
      // A candidate enters a full heap only with a strictly higher score than its worst (a
      // tie loses to the lower rank already in it), and never below the caller's floor.
      const bool full = static_cast<int64_t>(heap.size()) >= top_m;
      const double need = full ? std::max(floor, heap.top().score) : floor;
      int64_t level = 0;
      double score = 0.0;
      if (searcher.score(c[k - 1], need, &level, &score) && score >= floor) {
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
  m.def("search_chunk", &search_chunk,
        "Best top_m of `count` combinations from `start` scoring at least `floor`.");
}
