// One pass over many CPU tensors: how many elements of values * mask are nonzero.
//
// For IEEE floats |x| > t  <=>  bits(x) & ~sign > bits(t) when t >= 0, NaN included (its
// magnitude bits exceed infinity's), and -0.0 has no magnitude bits. So counting is one
// integer compare per element on the raw words: memory-bound, auto-vectorised, no
// temporaries. Runs on ATen's thread pool (torch.set_num_threads applies).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kChunk = int64_t{1} << 16;

template <typename Word>
int64_t count_range(const Word* values, const Word* mask, int64_t n, Word magnitude, Word tolerance) {
  uint32_t count = 0;  // n <= kChunk: a 32-bit count cannot overflow, and vectorises wider
  if (mask == nullptr) {
    for (int64_t i = 0; i < n; ++i) count += (values[i] & magnitude) > tolerance;
  } else {
    for (int64_t i = 0; i < n; ++i)
      count += ((values[i] & magnitude) > tolerance) & ((mask[i] & magnitude) != 0);
  }
  return count;
}

template <typename Word>
int64_t count_chunk(const torch::Tensor& values, const torch::Tensor& mask, int64_t start,
                    int64_t stop, Word magnitude, Word tolerance) {
  const Word* v = static_cast<const Word*>(values.data_ptr()) + start;
  const Word* m = mask.numel() ? static_cast<const Word*>(mask.data_ptr()) + start : nullptr;
  return count_range<Word>(v, m, stop - start, magnitude, tolerance);
}

int64_t count_span(const torch::Tensor& values, const torch::Tensor& mask, int64_t start,
                   int64_t stop, int64_t tolerance) {
  switch (values.element_size()) {
    case 2:
      return count_chunk<uint16_t>(values, mask, start, stop, 0x7fffu, static_cast<uint16_t>(tolerance));
    case 4:
      return count_chunk<uint32_t>(values, mask, start, stop, 0x7fffffffu, static_cast<uint32_t>(tolerance));
    case 8:
      return count_chunk<uint64_t>(values, mask, start, stop, 0x7fffffffffffffffull,
                                   static_cast<uint64_t>(tolerance));
    default:
      TORCH_CHECK(false, "count_nonzero_many: unsupported element size ", values.element_size());
  }
}

}  // namespace

// values[i]: contiguous CPU tensors of 2, 4 or 8-byte floats; masks[i]: the same size and
// element width, or empty; tolerance_bits[i]: bits of the tolerance in values[i]'s type.
//
// The threads split the concatenation of all tensors by elements, not by tensor or chunk
// count: a model's few large matrices and many small tensors would otherwise leave one
// thread with most of the bytes.
torch::Tensor count_nonzero_many(const std::vector<torch::Tensor>& values,
                                 const std::vector<torch::Tensor>& masks,
                                 const std::vector<int64_t>& tolerance_bits) {
  const int64_t n = static_cast<int64_t>(values.size());
  TORCH_CHECK(masks.size() == values.size() && tolerance_bits.size() == values.size(),
              "count_nonzero_many: values, masks and tolerances differ in length");
  std::vector<int64_t> starts(n + 1, 0);  // where each tensor begins in the concatenation
  for (int64_t t = 0; t < n; ++t) starts[t + 1] = starts[t] + values[t].numel();
  torch::Tensor out = torch::zeros({n}, torch::kInt64);
  int64_t* result = out.data_ptr<int64_t>();
  std::mutex merge;
  at::parallel_for(0, starts[n], kChunk, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<int64_t, int64_t>> found;  // (tensor, count) for this range
    int64_t t = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (int64_t pos = begin; pos < end; ++t) {
      while (starts[t + 1] <= pos) ++t;  // skip empty tensors
      const int64_t stop = std::min(end, starts[t + 1]);
      int64_t count = 0;
      for (int64_t s = pos; s < stop; s += kChunk) {
        const int64_t a = s - starts[t], b = std::min(stop, s + kChunk) - starts[t];
        count += count_span(values[t], masks[t], a, b, tolerance_bits[t]);
      }
      found.emplace_back(t, count);
      pos = stop;
    }
    std::lock_guard<std::mutex> lock(merge);
    for (const auto& [tensor, count] : found) result[tensor] += count;
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("count_nonzero_many", &count_nonzero_many, "nonzeros of values * mask, per tensor");
}
