// One pass over many CPU tensors: how many elements of values * mask are nonzero, how many
// elements of values are not finite (NaN or +-Inf) and, when asked, how many dim-0 rows
// (neurons, filters) and ConvNd (out, in) kernels of values * mask are entirely zero.
//
// For IEEE floats |x| > t  <=>  bits(x) & ~sign > bits(t) when t >= 0, NaN included (its
// magnitude bits exceed infinity's), and -0.0 has no magnitude bits; x is not finite
// <=> bits(x) & ~sign >= bits(inf). So both counts are integer compares on the raw words
// (the second only where a range holds a non-finite value: see count_range): memory-bound,
// auto-vectorised (SSE2, AVX2 and AVX-512, see tally_tensor), no temporaries. Runs on
// ATen's thread pool (torch.set_num_threads applies) when built with -fopenmp, as
// kernels.py does: without it at::parallel_for runs everything on the calling thread.
// abs_sum_many (below) sums |values * mask| per tensor for the L1 value, in one read;
// abs_sum_gradient writes that sum's gradient, in one pass.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kChunk = int64_t{1} << 16;

using Counts = std::pair<int64_t, int64_t>;  // (nonzero, not finite)

template <typename Word>
Counts count_range(const Word* values, const Word* mask, int64_t n, Word magnitude,
                   Word tolerance, Word infinity) {
  // n <= kChunk: 32-bit counts cannot overflow, and vectorise wider. Magnitudes (sign bit
  // clear) compare as signed integers, one instruction on x86 vector units (an unsigned
  // compare takes two without AVX-512). Non-finite values are rare: the loop keeps only
  // the largest magnitude, and the range is counted again for them when that reaches
  // infinity's. Measured on a 2-core AMD EPYC (AVX2), 50 M fp32 weights: 15% less time
  // than counting both per element; with masks, 4 M elements, 12-33% less for fp16, bf16
  // and fp64, 6-7% for fp32. (The AVX2 loop without a mask: 4 vector instructions per 8
  // words, 7 before.)
  using Signed = std::make_signed_t<Word>;
  const Signed t = static_cast<Signed>(tolerance);
  uint32_t count = 0;
  Signed peak = 0;
  if (mask == nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const Signed m = static_cast<Signed>(values[i] & magnitude);
      count += m > t;
      peak = m > peak ? m : peak;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const Signed m = static_cast<Signed>(values[i] & magnitude);
      count += (m > t) & ((mask[i] & magnitude) != 0);
      peak = m > peak ? m : peak;  // a NaN under a zero mask still poisons values * mask
    }
  }
  uint32_t bad = 0;
  if (peak >= static_cast<Signed>(infinity)) {
    for (int64_t i = 0; i < n; ++i) bad += (values[i] & magnitude) >= infinity;
  }
  return {count, bad};
}

template <typename Word>
Counts count_words(const Word* values, const Word* mask, int64_t n, Word magnitude,
                   Word tolerance, Word infinity) {
  Counts total{0, 0};
  for (int64_t s = 0; s < n; s += kChunk) {
    const Counts part = count_range<Word>(values + s, mask == nullptr ? nullptr : mask + s,
                                          std::min(kChunk, n - s), magnitude, tolerance,
                                          infinity);
    total.first += part.first;
    total.second += part.second;
  }
  return total;
}

// What one thread found in one tensor.
struct Tally {
  int64_t nonzero = 0, nonfinite = 0, zero_rows = 0, zero_kernels = 0;
};

// One tensor's part of a thread's range. Without rows (row == 0) the thread counts the
// elements [begin, end). With rows of `row` elements it counts the whole rows that START in
// [begin, end), reading past `end` to finish the last one: a row is never split between
// threads, so whether it is all zero is known here. `kernel` > 0 splits each row into
// kernels of that many elements (ConvNd: the (out, in) slices), counted the same way.
template <typename Word>
void tally_span(const torch::Tensor& values, const torch::Tensor& mask, int64_t begin,
                int64_t end, int64_t row, int64_t kernel, Word magnitude, int64_t tolerance,
                int64_t infinity, Tally& tally) {
  const Word* v = static_cast<const Word*>(values.data_ptr());
  const Word* m = mask.defined() ? static_cast<const Word*>(mask.data_ptr()) : nullptr;
  const Word t = static_cast<Word>(tolerance), inf = static_cast<Word>(infinity);
  auto count = [&](int64_t at, int64_t n) {
    return count_words<Word>(v + at, m == nullptr ? nullptr : m + at, n, magnitude, t, inf);
  };
  if (row == 0) {
    const Counts c = count(begin, end - begin);
    tally.nonzero += c.first;
    tally.nonfinite += c.second;
    return;
  }
  const int64_t first = (begin + row - 1) / row, last = (end + row - 1) / row;
  for (int64_t r = first; r < last; ++r) {
    int64_t alive = 0;
    const int64_t step = kernel > 0 ? kernel : row;
    for (int64_t at = r * row; at < (r + 1) * row; at += step) {
      const Counts c = count(at, step);
      alive += c.first;
      tally.nonfinite += c.second;
      tally.zero_kernels += kernel > 0 && c.first == 0;
    }
    tally.nonzero += alive;
    tally.zero_rows += alive == 0;
  }
}

// Built for the x86-64 baseline (SSE2), for AVX2 and, with GCC 11 or later, for AVX-512
// (x86-64-v4: F, BW, CD, DQ, VL), one chosen when the library loads (GCC/Clang function
// multiversioning; `flatten` inlines the counting loops into each version). -march=native
// would do the same for one CPU, but a build cached in a shared TORCH_EXTENSIONS_DIR can be
// loaded on another node. Measured, 200 M fp32 weights against a plain read (torch's own
// sum, which runs AVX-512 code where the CPU has it): on a 2-core AMD EPYC (Zen 1) without
// AVX-512, 1.29x with SSE2 only and 1.09x with AVX2 (1.22x before count_range kept only the
// largest magnitude, in the same run); earlier, before that change, on a 2-core Intel Xeon
// with it, 1.24x with AVX2 and 1.05x with AVX-512. The choice is made by an ifunc
// resolver, which glibc has and musl and macOS lack: elsewhere only the baseline is built.
// Clang gets no v4 clone (its target_clones takes fewer arch= names across versions).
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones) && __has_attribute(flatten)
#if !defined(__clang__) && __GNUC__ >= 11
#define MULTIVERSIONED __attribute__((flatten, target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define MULTIVERSIONED __attribute__((flatten, target_clones("avx2", "default")))
#endif
#endif
#endif
#ifndef MULTIVERSIONED
#define MULTIVERSIONED
#endif
MULTIVERSIONED
void tally_tensor(const torch::Tensor& values, const torch::Tensor& mask, int64_t begin,
                  int64_t end, int64_t row, int64_t kernel, int64_t tolerance, int64_t infinity,
                  Tally& tally) {
  switch (values.element_size()) {
    case 2:
      return tally_span<uint16_t>(values, mask, begin, end, row, kernel, 0x7fffu, tolerance,
                                  infinity, tally);
    case 4:
      return tally_span<uint32_t>(values, mask, begin, end, row, kernel, 0x7fffffffu,
                                  tolerance, infinity, tally);
    case 8:
      return tally_span<uint64_t>(values, mask, begin, end, row, kernel,
                                  0x7fffffffffffffffull, tolerance, infinity, tally);
    default:
      TORCH_CHECK(false, "count_nonzero_many: unsupported element size ", values.element_size());
  }
}

// Index of a floating dtype the kernel reads as raw words (float16, bfloat16, float32,
// float64), or -1.
int float_index(at::ScalarType type) {
  switch (type) {
    case at::kHalf:
      return 0;
    case at::kBFloat16:
      return 1;
    case at::kFloat:
      return 2;
    case at::kDouble:
      return 3;
    default:
      return -1;
  }
}

constexpr int64_t kInfinityBits[4] = {0x7C00, 0x7F80, 0x7F800000, 0x7FF0000000000000};

// Whether the memory a contiguous tensor claims is there to read: a storage with data, as
// long as its elements. A DTensor (a wrapper without data: null) or a view into storage
// that was freed (resized to 0, as FSDP1 frees the parameters it flattened) passes the
// other checks and was read all the same: a segfault. Left to the caller's torch ops,
// which raise.
bool readable(const torch::Tensor& v) {
  if (v.numel() == 0) return true;
  if (!v.has_storage()) return false;
  const c10::Storage& storage = v.storage();
  const auto needed = static_cast<size_t>(v.storage_offset() + v.numel()) * v.element_size();
  return storage.data() != nullptr && storage.nbytes() >= needed;
}

// Whether the kernel counts this tensor: on the CPU, contiguous, of a float type with exact
// tolerance bits (tolerance_bits[type] >= 0), its mask absent or a contiguous CPU float
// tensor of the same element width and size; with structure, not empty. The caller counts
// the rest with torch ops (accelerator tensors, views, float8, ...).
bool countable(const std::optional<torch::Tensor>& values,
               const std::optional<torch::Tensor>& mask,
               const std::vector<int64_t>& tolerance_bits, bool structure) {
  if (!values.has_value()) return false;
  const torch::Tensor& v = *values;
  const int type = float_index(v.scalar_type());
  if (type < 0 || tolerance_bits[type] < 0 || !v.device().is_cpu() || !v.is_contiguous() ||
      !readable(v)) {
    return false;
  }
  if (structure && v.numel() == 0) return false;
  if (!mask.has_value()) return true;
  const torch::Tensor& m = *mask;
  return m.device().is_cpu() && m.is_contiguous() && float_index(m.scalar_type()) >= 0 &&
         m.element_size() == v.element_size() && m.numel() == v.numel() && readable(m);
}

}  // namespace

// values[i]: any tensor, or None (nothing to count here); masks[i]: its prune mask, or None.
// tolerance_bits: for float16, bfloat16, float32 and float64, the bits of the tolerance in
// that type (-1: no exact bits, such tensors are left to the caller). With structure, all-zero
// dim-0 rows (tensors with ndim >= 2) and (out, in) kernels (ndim >= 3) are counted too.
// Returns int64 [5, n]: nonzeros, non-finite elements, all-zero rows, all-zero kernels, and
// 1 where the tensor was counted (see countable; 0 and zero counts where not).
//
// The threads split the concatenation of the counted tensors by elements, not by tensor or
// chunk count: a model's few large matrices and many small tensors would otherwise leave one
// thread with most of the bytes. A row belongs to the thread whose range holds its start.
torch::Tensor count_nonzero_many(const std::vector<std::optional<torch::Tensor>>& values,
                                 const std::vector<std::optional<torch::Tensor>>& masks,
                                 const std::vector<int64_t>& tolerance_bits, bool structure) {
  const int64_t n = static_cast<int64_t>(values.size());
  TORCH_CHECK(masks.size() == values.size(), "count_nonzero_many: ", n, " values but ",
              masks.size(), " masks");
  TORCH_CHECK(tolerance_bits.size() == 4,
              "count_nonzero_many: tolerance_bits needs one entry per float type (4)");
  torch::Tensor out = torch::zeros({5, n}, torch::kInt64);
  int64_t* result = out.data_ptr<int64_t>();
  // The counted tensors, with the elements of one row and of one kernel (0: none) and where
  // each begins in their concatenation.
  std::vector<int64_t> index, rows, kernels, tolerance, infinity, starts{0};
  for (int64_t t = 0; t < n; ++t) {
    if (!countable(values[t], masks[t], tolerance_bits, structure)) continue;
    const torch::Tensor& v = *values[t];
    const int64_t numel = v.numel(), dims = v.dim();
    const int type = float_index(v.scalar_type());
    result[4 * n + t] = 1;
    index.push_back(t);
    rows.push_back(structure && dims >= 2 ? numel / v.size(0) : 0);
    kernels.push_back(structure && dims >= 3 ? numel / (v.size(0) * v.size(1)) : 0);
    tolerance.push_back(tolerance_bits[type]);
    infinity.push_back(kInfinityBits[type]);
    starts.push_back(starts.back() + numel);
  }
  const torch::Tensor none;
  std::mutex merge;
  at::parallel_for(0, starts.back(), kChunk, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<int64_t, Tally>> found;  // (counted tensor, tally) for this range
    size_t k = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (int64_t pos = begin; pos < end; ++k) {
      while (starts[k + 1] <= pos) ++k;  // skip empty tensors
      const int64_t stop = std::min(end, starts[k + 1]);
      const int64_t t = index[k];
      Tally tally;
      tally_tensor(*values[t], masks[t].has_value() ? *masks[t] : none, pos - starts[k],
                   stop - starts[k], rows[k], kernels[k], tolerance[k], infinity[k], tally);
      found.emplace_back(t, tally);
      pos = stop;
    }
    std::lock_guard<std::mutex> lock(merge);
    for (const auto& [tensor, tally] : found) {
      result[tensor] += tally.nonzero;
      result[n + tensor] += tally.nonfinite;
      result[2 * n + tensor] += tally.zero_rows;
      result[3 * n + tensor] += tally.zero_kernels;
    }
  });
  return out;
}

namespace {

// sum |values * mask| of one range, in double: 16 independent lanes so the compiler can
// vectorise the loop (one running sum is a chain of dependent adds, and it may not reorder
// floating-point sums by itself), then the lanes and the tail in a fixed order.
template <typename T>
double abs_sum_range(const T* values, const T* mask, int64_t n) {
  constexpr int64_t kLanes = 16;
  double lane[kLanes] = {};
  int64_t i = 0;
  if (mask == nullptr) {
    for (; i + kLanes <= n; i += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) lane[j] += std::abs(static_cast<double>(values[i + j]));
    }
  } else {
    for (; i + kLanes <= n; i += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) {
        lane[j] += std::abs(static_cast<double>(values[i + j] * mask[i + j]));
      }
    }
  }
  double total = 0.0;
  for (int64_t j = 0; j < kLanes; ++j) total += lane[j];
  for (; i < n; ++i) {
    total += std::abs(static_cast<double>(mask == nullptr ? values[i] : values[i] * mask[i]));
  }
  return total;
}

MULTIVERSIONED
double abs_sum_chunk(const torch::Tensor& values, const torch::Tensor& mask, int64_t begin,
                     int64_t n) {
  if (values.scalar_type() == at::kFloat) {
    const float* v = values.data_ptr<float>() + begin;
    return abs_sum_range<float>(v, mask.defined() ? mask.data_ptr<float>() + begin : nullptr, n);
  }
  const double* v = values.data_ptr<double>() + begin;
  return abs_sum_range<double>(v, mask.defined() ? mask.data_ptr<double>() + begin : nullptr, n);
}

struct Chunk {
  int64_t tensor, begin, size;
};

using Tensors = std::vector<std::optional<torch::Tensor>>;

// The chunks of kChunk elements of the tensors picked (in order), grouped into work units
// of about kChunk elements each (consecutive chunks of small tensors share one): unit u is
// chunks[units[u]] to chunks[units[u + 1]]. The threads split units, so they get the same
// number of elements: split by chunk count, one thread took a 50 M model's large tensors
// and the other its 570 small ones.
struct Work {
  std::vector<Chunk> chunks;
  std::vector<int64_t> units{0};

  Work(const Tensors& values, const std::vector<bool>& picked) {
    for (size_t t = 0; t < values.size(); ++t) {
      if (!picked[t]) continue;
      const int64_t numel = values[t]->numel();
      for (int64_t s = 0; s < numel; s += kChunk) {
        chunks.push_back({static_cast<int64_t>(t), s, std::min(kChunk, numel - s)});
      }
    }
    int64_t filled = 0;
    for (size_t c = 0; c < chunks.size(); ++c) {
      filled += chunks[c].size;
      if (filled >= kChunk) {
        units.push_back(static_cast<int64_t>(c) + 1);
        filled = 0;
      }
    }
    if (units.back() != static_cast<int64_t>(chunks.size())) {
      units.push_back(static_cast<int64_t>(chunks.size()));
    }
  }

  // visit(c, chunk, values, mask) for every chunk c, on ATen's thread pool (mask undefined
  // where there is none).
  template <typename Visit>
  void run(const Tensors& values, const Tensors& masks, Visit visit) const {
    const torch::Tensor none;
    const int64_t unit_count = static_cast<int64_t>(units.size()) - 1;
    at::parallel_for(0, unit_count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = units[begin]; c < units[end]; ++c) {
        const Chunk& chunk = chunks[c];
        const auto& mask = masks[chunk.tensor];
        visit(c, chunk, *values[chunk.tensor], mask.has_value() ? *mask : none);
      }
    });
  }
};

// Whether the L1 kernels read values[t] (with masks[t]): a contiguous CPU float32 or
// float64 tensor, its mask None or a contiguous CPU tensor of the same dtype and size.
bool summable(const std::optional<torch::Tensor>& values,
              const std::optional<torch::Tensor>& mask) {
  if (!values.has_value()) return false;
  const torch::Tensor& v = *values;
  const auto type = v.scalar_type();
  if ((type != at::kFloat && type != at::kDouble) || !v.device().is_cpu() ||
      !v.is_contiguous() || !readable(v)) {
    return false;
  }
  if (!mask.has_value()) return true;
  const torch::Tensor& m = *mask;
  return m.scalar_type() == type && m.device().is_cpu() && m.is_contiguous() &&
         m.numel() == v.numel() && readable(m);
}

// gradient = (sign(values * mask) * mask) * step over one range, as torch.sign(values *
// mask).mul_(mask).mul_(step) rounds it (sign 0 at 0 and at NaN), in one pass.
template <typename T>
void abs_gradient_range(const T* values, const T* mask, T step, T* gradient, int64_t n) {
  if (mask == nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const T v = values[i];
      gradient[i] = static_cast<T>((T(0) < v) - (v < T(0))) * step;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const T v = values[i] * mask[i];
      gradient[i] = (static_cast<T>((T(0) < v) - (v < T(0))) * mask[i]) * step;
    }
  }
}

MULTIVERSIONED
void abs_gradient_chunk(const torch::Tensor& values, const torch::Tensor& mask, float step,
                        torch::Tensor& gradient, int64_t begin, int64_t n) {
  if (values.scalar_type() == at::kFloat) {
    const float* m = mask.defined() ? mask.data_ptr<float>() + begin : nullptr;
    return abs_gradient_range<float>(values.data_ptr<float>() + begin, m, step,
                                     gradient.data_ptr<float>() + begin, n);
  }
  const double* m = mask.defined() ? mask.data_ptr<double>() + begin : nullptr;
  abs_gradient_range<double>(values.data_ptr<double>() + begin, m, step,
                             gradient.data_ptr<double>() + begin, n);
}

}  // namespace

// Per tensor, sum |values * mask| (the L1 norm of the effective weight) in float64: one pass,
// no temporaries (x.abs().sum() writes and reads a full-size temporary). values[i]: any
// tensor, or None; masks[i]: its prune mask, or None. Only contiguous CPU float32 and float64
// tensors are summed, with a mask of the same dtype and size; returns float64 [2, n]: the sums
// and 1 where the tensor was summed (0 and 0 where not: the caller sums those). Each tensor
// is summed in fixed chunks and the chunks are added in order, so the result does not
// depend on the thread count.
torch::Tensor abs_sum_many(const Tensors& values, const Tensors& masks) {
  const int64_t n = static_cast<int64_t>(values.size());
  TORCH_CHECK(masks.size() == values.size(), "abs_sum_many: ", n, " values but ",
              masks.size(), " masks");
  torch::Tensor out = torch::zeros({2, n}, torch::kFloat64);
  double* result = out.data_ptr<double>();
  std::vector<bool> picked(n);
  for (int64_t t = 0; t < n; ++t) {
    picked[t] = summable(values[t], masks[t]);
    result[n + t] = picked[t] ? 1.0 : 0.0;
  }
  const Work work(values, picked);
  std::vector<double> partial(work.chunks.size());
  work.run(values, masks, [&](int64_t c, const Chunk& chunk, const torch::Tensor& v,
                              const torch::Tensor& mask) {
    partial[c] = abs_sum_chunk(v, mask, chunk.begin, chunk.size);
  });
  for (size_t c = 0; c < work.chunks.size(); ++c) {
    result[work.chunks[c].tensor] += partial[c];
  }
  return out;
}

// The gradient of grad * sum_i weights[i] * sum |values[i] * masks[i]| in each values[i]:
// (sign(values * mask) * mask) * step with step = float32(grad * weights[i]), each element
// written once, bit for bit what torch.sign(values * mask).mul_(mask).mul_(step) gives
// (that writes sign, then scales it: two to four passes). Every tensor must be one
// abs_sum_many sums.
std::vector<torch::Tensor> abs_sum_gradient(const Tensors& values, const Tensors& masks,
                                            const std::vector<double>& weights, double grad) {
  const size_t n = values.size();
  TORCH_CHECK(masks.size() == n && weights.size() == n, "abs_sum_gradient: ", n,
              " values, ", masks.size(), " masks, ", weights.size(), " weights");
  std::vector<bool> picked(n, true);
  std::vector<torch::Tensor> gradients(n);
  std::vector<float> steps(n);
  for (size_t t = 0; t < n; ++t) {
    TORCH_CHECK(summable(values[t], masks[t]), "abs_sum_gradient: tensor ", t,
                " is not one abs_sum_many sums");
    gradients[t] = torch::empty_like(*values[t]);
    // grad is a float32 number: the product rounds as a float32 tensor times a Python float.
    steps[t] = static_cast<float>(grad) * static_cast<float>(weights[t]);
  }
  const Work work(values, picked);
  work.run(values, masks, [&](int64_t, const Chunk& chunk, const torch::Tensor& v,
                              const torch::Tensor& mask) {
    abs_gradient_chunk(v, mask, steps[chunk.tensor], gradients[chunk.tensor], chunk.begin,
                       chunk.size);
  });
  return gradients;
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
  m.def("count_nonzero_many", &count_nonzero_many, "nonzeros of values * mask, non-finite values, zero rows and kernels, per tensor");
  m.def("abs_sum_many", &abs_sum_many, "sum |values * mask| per tensor, in float64");
  m.def("abs_sum_gradient", &abs_sum_gradient, "gradient of a weighted abs_sum_many");
  m.def("threads_used", &threads_used, "threads at::parallel_for uses for n units (a build check)");
}
