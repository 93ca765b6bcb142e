// The dense GEMV of decode steps on CPU: y = x W^T + b for a few tokens, the weight read once.
//
// A compressed model keeps some linears dense, its output head by default: SmolLM2's tied 49152 x 576 head is 113 MB
// of float32 read in full for every generated token. torch runs such calls as a BLAS sgemv, which read 11 GB/s on a
// 2-core Zen 4 EPYC at any thread count (MKL), where the same machine sums a large tensor at 27-33 GB/s. Here the rows
// are split over torch's threads and each thread streams four of them at a time, so the call runs at memory speed.
//
// Op (namespace swsc_hf_cpu):
//   dense_gemv(x[..., n], weight[out, n], bias[out]?) -> [..., out]
// x, weight and bias of one dtype (float32 or bfloat16), the weight contiguous; sums in float32, rounded once to that
// dtype as torch's linear rounds them. (torch's float16 GEMV read SmolLM2's head faster than this kernel, 33 against
// 25 GB/s, so float16 is left to it.)

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_isa.h"
#include "float_vec.h"

namespace {

struct DenseGemv {
  const float* x;            // float32
  const void* weight;        // the weight's dtype
  const float* bias;         // float32; nullptr without one
  float* y;
  int64_t tokens, in, out;
};

}  // namespace

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
namespace avx512 {
namespace {
#include "dense_gemv_simd.inc"
}  // namespace
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
namespace {
#include "dense_gemv_simd.inc"
}  // namespace
}  // namespace avx2
#pragma GCC pop_options

namespace portable {
namespace {
#include "dense_gemv_simd.inc"
}  // namespace
}  // namespace portable

namespace {

using namespace swsc_hf_isa;

// Rows [r0, r1) with the weight's element type T, on the kernels of instruction set `isa`.
template <typename T>
void rows_on(int64_t isa, const DenseGemv& g, int64_t r0, int64_t r1) {
  if (isa == kAvx512) avx512::dense_rows<T>(g, r0, r1);
  else if (isa == kAvx2) avx2::dense_rows<T>(g, r0, r1);
  else portable::dense_rows<T>(g, r0, r1);
}

// Weight bytes a thread's share of rows spans at least, so that splitting a small matrix costs less than it gains.
constexpr int64_t kMinBytesPerTask = 64 * 1024;

at::Tensor dense_gemv(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(weight.device().is_cpu() && (dtype == at::kFloat || dtype == at::kBFloat16) && weight.dim() == 2 &&
                  weight.is_contiguous(),
              "swsc_hf_cpu.dense_gemv: weight must be a contiguous 2-dim float32 or bfloat16 CPU tensor, got ", dtype,
              " ", weight.sizes(), " on ", weight.device());
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == dtype && x.dim() >= 1 && x.size(-1) == in,
              "swsc_hf_cpu.dense_gemv: x must be a ", dtype, " CPU tensor (the weight's dtype) of ", in,
              " features in its last dimension, got ", x.scalar_type(), " ", x.sizes(), " on ", x.device());
  if (bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == dtype && bias->dim() == 1 && bias->size(0) == out,
                "swsc_hf_cpu.dense_gemv: bias must be a ", dtype, " CPU tensor (the weight's dtype) of ", out,
                " values, got ", bias->scalar_type(), " ", bias->sizes(), " on ", bias->device());
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor bf = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  if (in == 0) return bias ? bias->expand(shape).clone() : at::zeros(shape, x.options());
  at::Tensor y = at::empty(shape, xf.options());
  const DenseGemv g{xf.data_ptr<float>(), weight.data_ptr(), bias ? bf.data_ptr<float>() : nullptr,
                    y.data_ptr<float>(), x.numel() / in, in, out};
  if (g.tokens == 0 || out == 0) return y.to(dtype);
  const int64_t grain = std::max<int64_t>(
      4, (kMinBytesPerTask / std::max<int64_t>(1, in * weight.element_size()) + 3) / 4 * 4);
  const int64_t isa = active_isa();
  at::parallel_for(0, out, grain, [&](int64_t r0, int64_t r1) {
    if (dtype == at::kFloat) rows_on<float>(isa, g, r0, r1);
    else rows_on<c10::BFloat16>(isa, g, r0, r1);
  });
  return dtype == at::kFloat ? y : y.to(dtype);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(swsc_hf_cpu, m) {
  m.def("dense_gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(swsc_hf_cpu, CPU, m) { m.impl("dense_gemv", &dense_gemv); }
