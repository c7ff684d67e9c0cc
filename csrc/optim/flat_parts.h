// All the elements of a list of dense tensors as one flat index space, so that a parallel loop
// gives small tensors one task together and splits large ones (the optimizer ops of this
// folder walk the CPU demo's 168 parameter tensors this way).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace bldseg {
namespace optim {

// start[i] is the flat index of tensor i's first element; start.back() the total count.
inline std::vector<int64_t> flat_starts(at::TensorList tensors) {
  std::vector<int64_t> start(tensors.size() + 1, 0);
  for (const auto i : c10::irange(tensors.size())) start[i + 1] = start[i] + tensors[i].numel();
  return start;
}

// Calls fn(tensor index, first element, end element) for the parts of tensors that lie in
// the flat range [begin, end), in order; element indices are within the tensor.
template <typename Fn>
void for_each_part(const std::vector<int64_t>& start, int64_t begin, int64_t end, Fn fn) {
  auto i = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
  for (; begin < end; ++i) {
    const int64_t stop = std::min(end, start[i + 1]);
    if (stop > begin) fn(i, begin - start[i], stop - start[i]);
    begin = stop;
  }
}

}  // namespace optim
}  // namespace bldseg
