// One pass over many CPU tensors: how many elements of values * mask are nonzero, and how
// many elements of values are not finite (NaN or +-Inf).
//
// For IEEE floats |x| > t  <=>  bits(x) & ~sign > bits(t) when t >= 0, NaN included (its
// magnitude bits exceed infinity's), and -0.0 has no magnitude bits; x is not finite
// <=> bits(x) & ~sign >= bits(inf). So both counts are integer compares per element on the
// raw words, in the same pass: memory-bound, auto-vectorised, no temporaries. Runs on
// ATen's thread pool (torch.set_num_threads applies) when built with -fopenmp, as
// kernels.py does: without it at::parallel_for runs everything on the calling thread.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kChunk = int64_t{1} << 16;

using Counts = std::pair<int64_t, int64_t>;  // (nonzero, not finite)

template <typename Word>
Counts count_range(const Word* values, const Word* mask, int64_t n, Word magnitude,
                   Word tolerance, Word infinity) {
  // n <= kChunk: 32-bit counts cannot overflow, and vectorise wider.
  uint32_t count = 0, bad = 0;
  if (mask == nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const Word m = values[i] & magnitude;
      count += m > tolerance;
      bad += m >= infinity;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const Word m = values[i] & magnitude;
      count += (m > tolerance) & ((mask[i] & magnitude) != 0);
      bad += m >= infinity;  // a NaN under a zero mask still poisons values * mask
    }
  }
  return {count, bad};
}

template <typename Word>
Counts count_chunk(const torch::Tensor& values, const torch::Tensor& mask, int64_t start,
                   int64_t stop, Word magnitude, int64_t tolerance, int64_t infinity) {
  const Word* v = static_cast<const Word*>(values.data_ptr()) + start;
  const Word* m = mask.numel() ? static_cast<const Word*>(mask.data_ptr()) + start : nullptr;
  return count_range<Word>(v, m, stop - start, magnitude, static_cast<Word>(tolerance),
                           static_cast<Word>(infinity));
}

Counts count_span(const torch::Tensor& values, const torch::Tensor& mask, int64_t start,
                  int64_t stop, int64_t tolerance, int64_t infinity) {
  switch (values.element_size()) {
    case 2:
      return count_chunk<uint16_t>(values, mask, start, stop, 0x7fffu, tolerance, infinity);
    case 4:
      return count_chunk<uint32_t>(values, mask, start, stop, 0x7fffffffu, tolerance, infinity);
    case 8:
      return count_chunk<uint64_t>(values, mask, start, stop, 0x7fffffffffffffffull, tolerance,
                                   infinity);
    default:
      TORCH_CHECK(false, "count_nonzero_many: unsupported element size ", values.element_size());
  }
}

}  // namespace

// values[i]: contiguous CPU tensors of 2, 4 or 8-byte floats; masks[i]: the same size and
// element width, or empty; tolerance_bits[i] / infinity_bits[i]: bits of the tolerance and
// of +inf in values[i]'s type. Returns int64 [2, n]: nonzeros, then non-finite elements.
//
// The threads split the concatenation of all tensors by elements, not by tensor or chunk
// count: a model's few large matrices and many small tensors would otherwise leave one
// thread with most of the bytes.
torch::Tensor count_nonzero_many(const std::vector<torch::Tensor>& values,
                                 const std::vector<torch::Tensor>& masks,
                                 const std::vector<int64_t>& tolerance_bits,
                                 const std::vector<int64_t>& infinity_bits) {
  const int64_t n = static_cast<int64_t>(values.size());
  TORCH_CHECK(masks.size() == values.size() && tolerance_bits.size() == values.size() &&
                  infinity_bits.size() == values.size(),
              "count_nonzero_many: values, masks and bit patterns differ in length");
  std::vector<int64_t> starts(n + 1, 0);  // where each tensor begins in the concatenation
  for (int64_t t = 0; t < n; ++t) starts[t + 1] = starts[t] + values[t].numel();
  torch::Tensor out = torch::zeros({2, n}, torch::kInt64);
  int64_t* result = out.data_ptr<int64_t>();
  std::mutex merge;
  at::parallel_for(0, starts[n], kChunk, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<int64_t, Counts>> found;  // (tensor, counts) for this range
    int64_t t = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (int64_t pos = begin; pos < end; ++t) {
      while (starts[t + 1] <= pos) ++t;  // skip empty tensors
      const int64_t stop = std::min(end, starts[t + 1]);
      Counts counts{0, 0};
      for (int64_t s = pos; s < stop; s += kChunk) {
        const int64_t a = s - starts[t], b = std::min(stop, s + kChunk) - starts[t];
        const Counts part =
            count_span(values[t], masks[t], a, b, tolerance_bits[t], infinity_bits[t]);
        counts.first += part.first;
        counts.second += part.second;
      }
      found.emplace_back(t, counts);
      pos = stop;
    }
    std::lock_guard<std::mutex> lock(merge);
    for (const auto& [tensor, counts] : found) {
      result[tensor] += counts.first;
      result[n + tensor] += counts.second;
    }
  });
  return out;
}

// How many threads at::parallel_for really runs a range of n units on in this build: 1 when
// the extension was compiled without OpenMP, whatever torch.get_num_threads() says.
int64_t threads_used(int64_t n) {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    seen.fetch_or(uint64_t{1} << std::min(at::get_thread_num(), 63));
  });
  return __builtin_popcountll(seen.load());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("count_nonzero_many", &count_nonzero_many, "nonzeros of values * mask and non-finite values, per tensor");
  m.def("threads_used", &threads_used, "threads at::parallel_for uses for n units (a build check)");
}
