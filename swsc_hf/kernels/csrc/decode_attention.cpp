// Attention for decode steps on CPU: a few query rows against a long key/value cache, split over the cache.
//
// A batch-1 decode step of a grouped-query model has one query row per head: after packing (the heads sharing a
// key/value head as rows of one query block) there are kv_heads x rows dot products per key, so the step is bound by
// reading the cache, and a kernel that parallelises over heads only keeps a few threads busy (SmolLM2: 3 heads).
// Here the cache is cut into blocks of keys, each (batch, head, block) computes its softmax statistics (largest
// score, sum of exponentials, weighted values) on its own thread, and one pass merges the blocks, as flash decoding
// does. Keys that the mask hides in every row at either end of the cache (the unfilled tail of a static cache) are
// not read. A query row whose keys are all masked gets zeros, as torch's scaled_dot_product_attention gives on CPU.
//
// Op (namespace swsc_hf_cpu):
//   decode_attention(q[B, H, R, E], k[B, H, L, E], v[B, H, L, Ev], mask?, scale) -> [B, H, R, Ev]  float32
// mask: bool (true = attend) or float32 (added to the scores), broadcastable to [B, H, R, L].

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_isa.h"
#include "float_vec.h"

namespace {

using namespace swsc_hf_isa;

// The constants of the kernel's exp (decode_attention_simd.inc).
constexpr float kExpMax = 88.3762626647949f, kExpMin = -87.3365447504f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

struct Problem {
  const float *q, *k, *v;
  int64_t q_stride[3], k_stride[3], v_stride[3];  // batch, head, row (key); the last dimension is contiguous
  int64_t rows, dim, value_dim;
  float scale;
  const void* mask = nullptr;  // nullptr, bool or float32, strides over [B, H, R, L] (0 where broadcast)
  bool mask_is_bool = false;
  int64_t mask_stride[4] = {0, 0, 0, 0};

  // Whether row g of (b, h) may attend key j.
  bool allows(int64_t b, int64_t h, int64_t g, int64_t j) const {
    if (!mask) return true;
    const int64_t at = b * mask_stride[0] + h * mask_stride[1] + g * mask_stride[2] + j * mask_stride[3];
    return mask_is_bool ? static_cast<const bool*>(mask)[at] : static_cast<const float*>(mask)[at] != -INFINITY;
  }

  // s[0:n] += the mask of row g of (b, h) at keys j0, j0 + 1, ... (-inf where a bool mask says no).
  void add_mask(int64_t b, int64_t h, int64_t g, int64_t j0, int64_t n, float* s) const {
    if (!mask) return;
    const int64_t at = b * mask_stride[0] + h * mask_stride[1] + g * mask_stride[2] + j0 * mask_stride[3];
    const int64_t step = mask_stride[3];
    if (mask_is_bool) {
      const bool* m = static_cast<const bool*>(mask) + at;
      for (int64_t j = 0; j < n; ++j)
        if (!m[j * step]) s[j] = -INFINITY;
    } else {
      const float* m = static_cast<const float*>(mask) + at;
      for (int64_t j = 0; j < n; ++j) s[j] += m[j * step];
    }
  }
};

// One block's softmax statistics per query row (see attend_block).
struct Partial {
  float* top;    // rows
  float* total;  // rows
  float* acc;    // rows x value_dim
};

}  // namespace

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
namespace avx512 {
namespace {
#include "decode_attention_simd.inc"
}  // namespace
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
namespace {
#include "decode_attention_simd.inc"
}  // namespace
}  // namespace avx2
#pragma GCC pop_options

namespace portable {
namespace {
#include "decode_attention_simd.inc"
}  // namespace
}  // namespace portable

namespace {

// Blocks per (batch, head) aim at this many per thread, so that threads finish together although heads are few.
constexpr int64_t kBlocksPerThread = 8;
constexpr int64_t kMinBlock = 32;  // keys: smaller blocks cost more in merging than they gain in balance

void check_operand(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4,
              "swsc_hf_cpu.decode_attention: ", name, " must be a 4-dim float32 CPU tensor, got ", t.scalar_type(),
              " ", t.sizes(), " on ", t.device());
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) == 1, "swsc_hf_cpu.decode_attention: ", name,
              "'s last dimension must be contiguous");
}

// The first and one past the last key some query row may attend: keys outside are never read.
std::pair<int64_t, int64_t> attended_span(const Problem& p, int64_t B, int64_t H, int64_t L) {
  if (!p.mask) return {0, L};
  int64_t first = L, last = 0;
  // only distinct mask rows: a broadcast dimension (stride 0) is visited once
  const int64_t nb = p.mask_stride[0] ? B : 1, nh = p.mask_stride[1] ? H : 1, ng = p.mask_stride[2] ? p.rows : 1;
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t h = 0; h < nh; ++h)
      for (int64_t g = 0; g < ng; ++g) {
        int64_t j = 0;
        while (j < first && !p.allows(b, h, g, j)) ++j;
        first = std::min(first, j);
        j = L;
        while (j > last && !p.allows(b, h, g, j - 1)) --j;
        last = std::max(last, j);
      }
  return {first, std::max(first, last)};
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, double scale) {
  check_operand(q, "q");
  check_operand(k, "k");
  check_operand(v, "v");
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), E = q.size(3), L = k.size(2), Ev = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(1) == H && v.size(1) == H && k.size(3) == E &&
                  v.size(2) == L,
              "swsc_hf_cpu.decode_attention: shapes q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(),
              " do not match (q [B, H, R, E], k [B, H, L, E], v [B, H, L, Ev])");
  Problem p{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
            {q.stride(0), q.stride(1), q.stride(2)}, {k.stride(0), k.stride(1), k.stride(2)},
            {v.stride(0), v.stride(1), v.stride(2)}, R, E, Ev, float(scale)};
  at::Tensor m;
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool || mask->scalar_type() == at::kFloat,
                "swsc_hf_cpu.decode_attention: mask must be bool or float32, got ", mask->scalar_type());
    TORCH_CHECK(mask->dim() >= 1 && mask->dim() <= 4, "swsc_hf_cpu.decode_attention: mask must have 1 to 4 dims, got ",
                mask->sizes());
    m = mask->stride(-1) == 1 || mask->stride(-1) == 0 ? *mask : mask->contiguous();
    m = m.expand({B, H, R, L});
    p.mask = m.data_ptr();
    p.mask_is_bool = m.scalar_type() == at::kBool;
    for (int i = 0; i < 4; ++i) p.mask_stride[i] = m.stride(i);
  }
  at::Tensor out = at::zeros({B, H, R, Ev}, q.options());
  const auto [first, last] = attended_span(p, B, H, L);
  if (first >= last || R == 0) return out;

  const int64_t heads = B * H, span = last - first;
  const int64_t per_head = std::max<int64_t>(1, (kBlocksPerThread * at::get_num_threads() + heads - 1) / heads);
  int64_t block = std::max(kMinBlock, (span + per_head - 1) / per_head);
  block = (block + 15) / 16 * 16;
  const int64_t blocks = (span + block - 1) / block, items = heads * blocks;
  std::vector<float> tops(items * R), totals(items * R), accs(items * R * Ev);
  const int64_t isa = active_isa();
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(R * block);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bh = i / blocks, j0 = first + (i % blocks) * block, j1 = std::min(j0 + block, last);
      const Partial part{&tops[i * R], &totals[i * R], &accs[i * R * Ev]};
      if (isa == kAvx512) avx512::attend_block(p, bh / H, bh % H, j0, j1, scores.data(), part);
      else if (isa == kAvx2) avx2::attend_block(p, bh / H, bh % H, j0, j1, scores.data(), part);
      else portable::attend_block(p, bh / H, bh % H, j0, j1, scores.data(), part);
    }
  });

  // merge the blocks: out = sum_c exp(top_c - top) acc_c / sum_c exp(top_c - top) total_c
  float* o = out.data_ptr<float>();
  for (int64_t bh = 0; bh < heads; ++bh)
    for (int64_t g = 0; g < R; ++g) {
      float top = -INFINITY;
      for (int64_t c = 0; c < blocks; ++c) top = std::max(top, tops[(bh * blocks + c) * R + g]);
      if (top == -INFINITY) continue;  // every key masked: zeros
      float* row = o + (bh * R + g) * Ev;
      float total = 0.0f;
      for (int64_t c = 0; c < blocks; ++c) {
        const int64_t at = (bh * blocks + c) * R + g;
        if (tops[at] == -INFINITY) continue;
        const float w = std::exp(tops[at] - top);
        total += w * totals[at];
        const float* acc = &accs[at * Ev];
        for (int64_t d = 0; d < Ev; ++d) row[d] += w * acc[d];
      }
      for (int64_t d = 0; d < Ev; ++d) row[d] /= total;
    }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(swsc_hf_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(swsc_hf_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }
