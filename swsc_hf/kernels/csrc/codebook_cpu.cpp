// CPU kernels for codebook-compressed linear layers: y = x W'^T with W' = scales * codebook[codes].
//
// The weights are never materialised for few-token inputs: each 16 (AVX-512) or 8 (AVX2) consecutive values of a
// channel are decoded in registers straight from the bit-packed code stream (a byte shuffle, per-lane shifts, a
// mask), looked up in the codebook (a register permute for tables of <= 16/32 floats; whole codeword loads for 4-
// and 8-dim vectors; when the values are float16 exactly, on AVX-512 VBMI for one token byte planes looked up by byte
// permutes for scalars of 6-8-bit codes and pairs of 5-8-bit codes, else whole float16 pairs read by scalar loads for
// pairs of over 64 codewords, on AVX-512 16-bit register permutes for smaller pairs, on AVX2 byte planes looked up
// by byte shuffles and scalar loads for pairs of 32-64; a gather from an L1-resident float table otherwise) and
// multiplied into the activations.
// Scales are applied once per group. Many tokens take dequant (float32 tiles) and a BLAS GEMM instead.
//
// Layout (see swsc_hf.core.spec.LayerSpec): the channel matrix M (channels x length) is W for cluster_dim="output"
// and W^T for "input". Channel c, column p holds codebook[c / rows_per_book][code(c, p / seg)][p % seg] times
// scales[c][p / group]. Code n = c * (length / seg) + s occupies bits [n * bits, (n + 1) * bits) of the stream,
// least significant bit first.
//
// Ops (namespace swsc_hf_cpu):
//   gemv(x[B, length], ...)     -> [B, channels]   y[b, c] = sum_p M[c, p] x[b, p]
//   gemv_t(u[B, channels], ...) -> [B, length]     z[b, p] = sum_c M[c, p] u[b, c]
//   dequant(..., start, stop)   -> [stop - start, length] float32 rows of M
//   gemv_kernel(...)            -> the name of the kernel gemv runs these operands on here
//   (decode_attention.cpp adds decode_attention, the attention of decode steps)
// All take the layout as [channels, length, n_clusters, segment_length, code_bits, scale_group, rows_per_book].
// Instruction sets are chosen at run time (AVX-512F+BW, AVX2+FMA+F16C, portable C++); set_max_isa caps the choice.
// gemv runs integer dot products for 8-bit codes of 4-dim vectors (AVX-512 VBMI + VNNI) and for 4-bit scalar tables
// (AVX2 kernels; integer_dot_available says whether this CPU has either) where every codebook already lies on its
// 8-bit grid (int8_codebooks at compression), which they then read exactly; set_integer_dot(true) opts every
// codebook in, rounded to 8 bits away from the float path.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "cpu_isa.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <numeric>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// Every helper the kernels call per value is forced inline: a call inside a loop of AVX-512 code would make the
// compiler spill the live vector registers around it (and insert vzeroupper), which costs more than the work.
#define ALWAYS_INLINE inline __attribute__((always_inline))

namespace swsc_hf_isa {
namespace {

int64_t detect_isa() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("f16c")) return kPortable;  // every instruction set below converts float16 by F16C
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kPortable;
}

std::atomic<int64_t> max_isa{kAvx512};

}  // namespace

int64_t active_isa() {
  static const int64_t detected = detect_isa();
  return std::min(detected, max_isa.load());
}

int64_t set_max_isa(int64_t level) {
  TORCH_CHECK(level >= kPortable && level <= kAvx512, "swsc_hf_cpu: isa level must be 0, 1 or 2");
  return max_isa.exchange(level);
}

}  // namespace swsc_hf_isa

namespace {

using namespace swsc_hf_isa;

struct Layout {
  int64_t channels, length, n_clusters, seg, bits, group, rows_per_book;
  int64_t segs;         // codes per channel
  int64_t book_stride;  // floats per padded codebook in the float table
};

Layout parse_layout(at::IntArrayRef v) {
  TORCH_CHECK(v.size() == 7, "swsc_hf_cpu: layout needs 7 ints, got ", v.size());
  Layout l{v[0], v[1], v[2], v[3], v[4], v[5], v[6], 0, 0};
  TORCH_CHECK(l.channels > 0 && l.length > 0, "swsc_hf_cpu: empty layout");
  TORCH_CHECK(l.seg == 1 || l.seg == 2 || l.seg == 4 || l.seg == 8, "swsc_hf_cpu: segment_length must be 1, 2, 4 or 8");
  TORCH_CHECK(l.length % l.seg == 0, "swsc_hf_cpu: segment_length must divide the channel length");
  TORCH_CHECK(l.bits >= 1 && l.bits <= 8, "swsc_hf_cpu: code bits must be in [1, 8]");
  TORCH_CHECK(l.n_clusters >= 1 && l.n_clusters <= (int64_t(1) << l.bits), "swsc_hf_cpu: n_clusters out of range");
  TORCH_CHECK(l.group == 0 || (l.group % 16 == 0 && l.length % l.group == 0),
              "swsc_hf_cpu: scale groups must be a multiple of 16 dividing the channel length");
  TORCH_CHECK(l.rows_per_book >= 1, "swsc_hf_cpu: rows_per_book must be >= 1");
  l.segs = l.length / l.seg;
  // Room for every representable code (a corrupt code reads a zero, never past the table) and at least 32 floats,
  // so register permutes can load whole vectors.
  l.book_stride = std::max<int64_t>((int64_t(1) << l.bits) * l.seg, 32);
  return l;
}

// IEEE half and bfloat16 to float with integer and float arithmetic only (the FP16 library's method), so the
// conversion inlines into the SIMD kernels (c10::Half's does not, and a call there spills the vector registers).
ALWAYS_INLINE float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

ALWAYS_INLINE uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}

ALWAYS_INLINE float half_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  return bits_to_float(sign | float_to_bits(two_w < (1u << 27) ? denormalized : normalized));
}

// Codebooks and scales are read in their stored dtype (float32, float16 or bfloat16).
struct FloatView {
  const void* data = nullptr;
  at::ScalarType type = at::kFloat;

  ALWAYS_INLINE float operator[](int64_t i) const {
    switch (type) {
      case at::kHalf: return half_to_float(static_cast<const uint16_t*>(data)[i]);
      case at::kBFloat16: return bits_to_float(uint32_t(static_cast<const uint16_t*>(data)[i]) << 16);
      default: return static_cast<const float*>(data)[i];
    }
  }
};

FloatView float_view(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              "swsc_hf_cpu: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "swsc_hf_cpu: ", name, " must be a contiguous CPU tensor");
  return FloatView{t.data_ptr(), t.scalar_type()};
}

// n float16 values to float32 by F16C: the same values as half_to_float, one instruction per 8 (a 256 x 4 codebook
// is converted in every call).
__attribute__((target("avx,f16c"))) void halves_to_floats(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

// `value` as float16 bits in `bits`; false when it is not a float16 exactly (or is NaN): the float16 copies of the
// tables hold only values they keep exactly, so the kernels reading them give the float32 tables' numbers.
inline bool exact_half(float value, uint16_t& bits) {
  const at::Half h(value);
  bits = h.x;
  return static_cast<float>(h) == value;
}

// 4-bit codes of scalar tables in channels and scale groups of whole blocks of `block` values (0: none), whose code
// bytes hold a block's even values in their low nibbles and its odd ones in their high nibbles.
inline bool whole_nibble_blocks(const Layout& l, int64_t block) {
  return block && l.seg == 1 && l.bits == 4 && l.length % block == 0 && l.group % block == 0;
}

constexpr int64_t kSplitBook = 128;  // float16 values per codebook in Operands::half_split

struct Operands {
  Layout l;
  const uint8_t* codes;
  int64_t code_bytes;
  std::vector<float> tables;  // the codebooks as float32, each padded to book_stride floats
  // The same as float16 bits (same padding) for pairs when every value is a float16 exactly (the default
  // table_dtype), so a pair is one 32-bit element: gathered whole and widened in registers.
  std::vector<uint16_t> half_tables;
  // Pairs of <= 64 codewords whose values are float16 exactly (the default table_dtype), in scale groups of a
  // multiple of 32 values (or without groups, channels of a multiple of 32), split by element: per
  // codebook kSplitBook float16 values, the codewords' first elements (64, zero-padded) then their second elements,
  // so a pair is two 16-bit register permutes (AVX-512 BW) instead of a gather. Empty otherwise.
  std::vector<uint16_t> half_split;
  const uint16_t* half_books = nullptr;  // the codebooks' float16 bits when they are stored as float16
  at::Tensor scales_held;     // the scales, contiguous (a copy only when they were not)
  FloatView scales;           // (channels, n_groups) in their stored dtype, or data == nullptr without groups
  int64_t n_groups;

  ALWAYS_INLINE const float* table(int64_t c) const { return tables.data() + (c / l.rows_per_book) * l.book_stride; }
  ALWAYS_INLINE const uint16_t* half_table(int64_t c) const {  // nullptr without a float16 copy
    if (!half_split.empty()) return half_split.data() + (c / l.rows_per_book) * kSplitBook;
    return half_tables.empty() ? nullptr : half_tables.data() + (c / l.rows_per_book) * l.book_stride;
  }
  // Value i of codebook b as float16 bits; false when it is not a float16 exactly (the float32 path keeps the
  // numbers). Tables stored as float16 (the default table_dtype) are read as stored, without a check.
  ALWAYS_INLINE bool half_value(int64_t b, int64_t i, uint16_t& bits) const {
    if (half_books) {
      bits = half_books[b * l.n_clusters * l.seg + i];
      return true;
    }
    return exact_half(tables[b * l.book_stride + i], bits);
  }
  ALWAYS_INLINE float group_scale(int64_t c, int64_t g) const {
    return scales.data ? scales[c * n_groups + g] : 1.0f;
  }
  ALWAYS_INLINE float scale(int64_t c, int64_t p) const {
    return scales.data ? scales[c * n_groups + p / l.group] : 1.0f;
  }
};

Operands make_operands(const at::Tensor& codes, const at::Tensor& codebook, const c10::optional<at::Tensor>& scales,
                       at::IntArrayRef layout) {
  Operands o{parse_layout(layout), nullptr, 0, {}, {}, {}, nullptr, {}, {}, 0};
  const Layout& l = o.l;
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 1 && codes.is_contiguous(),
              "swsc_hf_cpu: codes must be a contiguous 1-D uint8 tensor");
  TORCH_CHECK(codes.numel() * 8 >= l.channels * l.segs * l.bits, "swsc_hf_cpu: code stream too short");
  o.codes = codes.data_ptr<uint8_t>();
  o.code_bytes = codes.numel();
  const int64_t n_books = (l.channels + l.rows_per_book - 1) / l.rows_per_book;
  TORCH_CHECK(codebook.dim() == 3 && codebook.size(0) == n_books && codebook.size(1) == l.n_clusters &&
                  codebook.size(2) == l.seg,
              "swsc_hf_cpu: codebook shape ", codebook.sizes(), " does not match the layout");
  const FloatView books = float_view(codebook, "codebook");
  o.tables.assign(n_books * l.book_stride, 0.0f);
  const int64_t book_size = l.n_clusters * l.seg;
  if (books.type == at::kHalf) o.half_books = static_cast<const uint16_t*>(books.data);
  for (int64_t b = 0; b < n_books; ++b) {
    if (books.type == at::kHalf && active_isa() != kPortable) {
      halves_to_floats(static_cast<const uint16_t*>(books.data) + b * book_size, o.tables.data() + b * l.book_stride,
                       book_size);
      continue;
    }
    for (int64_t i = 0; i < book_size; ++i) o.tables[b * l.book_stride + i] = books[b * book_size + i];
  }
  if (l.seg == 2 && (int64_t(1) << l.bits) * l.seg > 32) {
    const bool split = l.bits <= 6 && (l.group ? l.group : l.length) % 32 == 0;  // kind 6 decodes 32 values
    std::vector<uint16_t>& half = split ? o.half_split : o.half_tables;
    half.assign(split ? n_books * kSplitBook : o.tables.size(), 0);
    for (int64_t b = 0; b < n_books; ++b)
      for (int64_t i = 0; i < l.n_clusters * 2; ++i) {
        uint16_t h;
        if (!o.half_value(b, i, h)) {  // the float32 path keeps the numbers
          half.clear();
          b = n_books;
          break;
        }
        half[split ? b * kSplitBook + (i & 1) * 64 + i / 2 : b * l.book_stride + i] = h;
      }
  }
  if (l.group) {
    TORCH_CHECK(scales.has_value() && scales->dim() == 2 && scales->size(0) == l.channels &&
                    scales->size(1) == l.length / l.group,
                "swsc_hf_cpu: scales must be (channels, length / group)");
    TORCH_CHECK(scales->device().is_cpu(), "swsc_hf_cpu: scales must be on the CPU");
    // read in place in their stored dtype (converted per group as the kernels reach it): no copy per call
    o.scales_held = scales->contiguous();
    o.scales = float_view(o.scales_held, "scales");
    o.n_groups = l.length / l.group;
  } else {
    TORCH_CHECK(!scales.has_value() || !scales->defined(), "swsc_hf_cpu: scales given for a layout without groups");
  }
  return o;
}

// 64 bits of the stream from byte `byte` on (zeros past its end).
inline uint64_t load_word(const Operands& o, int64_t byte) {
  uint64_t w = 0;
  if (byte + 8 <= o.code_bytes) {
    std::memcpy(&w, o.codes + byte, 8);
  } else if (byte < o.code_bytes) {
    std::memcpy(&w, o.codes + byte, o.code_bytes - byte);
  }
  return w;
}

// The `count` (<= 8) codes starting at code index n, as one word: code i is (word >> (i * bits)) & mask.
// 8 codes of <= 7 bits plus a shift of <= 7 fit in 64 bits; 8-bit codes always start on a byte.
inline uint64_t code_word(const Operands& o, int64_t n) {
  const int64_t bit = n * o.l.bits;
  return load_word(o, bit >> 3) >> (bit & 7);
}

// ---------------------------------------------------------------------------------------------------------------
// Every kernel works on a range of rows (gemv, dequant: channels; gemv_t: blocks of kColumnBlock columns) so that
// at::parallel_for (torch's thread pool and thread count) splits the work; the SIMD bodies carry target attributes
// and are called, never inlined, from the portable dispatcher.
constexpr int64_t kBatchBlock = 4;     // activation rows sharing one decoded weight vector
constexpr int64_t kColumnBlock = 256;  // gemv_t: columns one thread accumulates
// Weights one thread decodes at least: a smaller matrix runs on one thread (a fork/join costs more than it saves).
constexpr int64_t kMinWeightsPerThread = int64_t(1) << 17;

inline int64_t row_grain(int64_t row_length) { return std::max<int64_t>(1, kMinWeightsPerThread / row_length); }

// The GEMVs request the code bytes of the channels they will reach kPrefetchPasses passes later (a pass: the 1-4
// channels decoded together). A channel's codes are a few hundred bytes, too short a stream for the hardware
// prefetcher to ramp up on before the kernel moves to the next channels. Measured on SmolLM2's shapes with codes in
// L3 (docs/design.md): 4-bit GEMVs 1.3-1.55x faster on one and two threads, integer dot products 1.1-1.7x.
constexpr int64_t kPrefetchPasses = 2;

// Requests into the cache the code bytes of channels c .. c + n - 1 that lie before channel `stop`. Always inlined:
// GCC emitted no prefetch at all for a plain inline helper called from the kernels' target-specific code.
ALWAYS_INLINE void prefetch_channels(const Operands& o, int64_t c, int64_t n, int64_t stop) {
  const int64_t last = std::min(c + n, stop), bits_per_channel = o.l.segs * o.l.bits;
  if (c >= last) return;
  const uint8_t* end = o.codes + std::min(o.code_bytes, (last * bits_per_channel + 7) >> 3);
  for (const uint8_t* p = o.codes + ((c * bits_per_channel) >> 3); p < end; p += 64) __builtin_prefetch(p, 0, 3);
}

// Portable implementation (also the fallback on CPUs without AVX2).
inline float element(const Operands& o, int64_t c, int64_t p) {
  const Layout& l = o.l;
  const uint64_t code = code_word(o, c * l.segs + p / l.seg) & ((uint64_t(1) << l.bits) - 1);
  return o.table(c)[code * l.seg + p % l.seg] * o.scale(c, p);
}

void gemv_portable(const Operands& o, const float* x, int64_t B, float* y, int64_t c0, int64_t c1) {
  const Layout& l = o.l;
  std::vector<float> row(l.length);
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t p = 0; p < l.length; ++p) row[p] = element(o, c, p);
    for (int64_t b = 0; b < B; ++b) {
      float acc = 0.0f;
      const float* xb = x + b * l.length;
      for (int64_t p = 0; p < l.length; ++p) acc += row[p] * xb[p];
      y[b * l.channels + c] = acc;
    }
  }
}

void gemv_t_portable(const Operands& o, const float* u, int64_t B, float* z, int64_t k0, int64_t k1) {
  const Layout& l = o.l;
  const int64_t p0 = k0 * kColumnBlock, p1 = std::min(k1 * kColumnBlock, l.length);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = p0; p < p1; ++p) z[b * l.length + p] = 0.0f;
  for (int64_t c = 0; c < l.channels; ++c)
    for (int64_t p = p0; p < p1; ++p) {
      const float w = element(o, c, p);
      for (int64_t b = 0; b < B; ++b) z[b * l.length + p] += w * u[b * l.channels + c];
    }
}

void dequant_portable(const Operands& o, int64_t start, float* out, int64_t c0, int64_t c1) {
  const Layout& l = o.l;
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t p = 0; p < l.length; ++p) out[(c - start) * l.length + p] = element(o, c, p);
}

// The codes of a chunk from its first stream byte and bit offset, each extracted independently (no serial shift
// chain). BITS is the code width when known at compile time (shifts by constants: twice the speed for byte codes),
// else 0 and `bits` is used.
template <int BITS>
struct CodeReader {
  uint64_t word;
  int64_t bits;
  ALWAYS_INLINE CodeReader(const uint8_t* src, int s0, int64_t runtime_bits) : bits(BITS ? BITS : runtime_bits) {
    std::memcpy(&word, src, 8);
    word >>= s0;
  }
  ALWAYS_INLINE uint64_t operator()(int i) const { return (word >> (i * bits)) & ((uint64_t(1) << bits) - 1); }
};

// ---------------------------------------------------------------------------------------------------------------
// SIMD kernels: codebook_simd.inc is compiled once per instruction set, each time inside a namespace whose `Simd`
// says how that set loads, multiplies and decodes. A vector of W lanes holds values p .. p + W - 1 of one channel;
// lane i needs code j = i / seg, which starts at bit s0 + j * bits of the 16 bytes loaded from the chunk's first
// code byte (s0 < 8 is that code's bit offset in its byte). A byte shuffle copies the two bytes holding each lane's
// code into the lane (shift + bits <= 15), a per-lane shift and a mask extract it, and the look-up is a register
// permute (tables of <= 16 or 32 floats) or a gather from the L1-resident float table.

// Per-lane byte indices (for a 128-bit byte shuffle, the chunk's 16 bytes broadcast to every 128-bit lane) and
// shifts for each s0, for lanes of `lane_bytes` bytes (4: 32-bit lanes; 2: 16-bit lanes, shifts as int16).
struct LanePatterns {
  alignas(64) int8_t bytes[8][64];
  alignas(64) uint8_t shifts[8][64];
  alignas(64) int32_t elem[16];

  LanePatterns(int lanes, int64_t bits, int64_t seg, int lane_bytes = 4) {
    std::memset(bytes, -128, sizeof(bytes));
    std::memset(shifts, 0, sizeof(shifts));
    for (int s0 = 0; s0 < 8; ++s0)
      for (int i = 0; i < lanes; ++i) {
        const int64_t bit = s0 + (i / seg) * bits;
        const int first = int(bit >> 3);
        bytes[s0][i * lane_bytes] = int8_t(first);
        if (first + 1 <= 15) bytes[s0][i * lane_bytes + 1] = int8_t(first + 1);
        shifts[s0][i * lane_bytes] = uint8_t(bit & 7);  // little-endian: the lane's low byte
      }
    for (int i = 0; i < 16; ++i) elem[i] = int32_t(i % seg);
  }
};

// The 16 stream bytes from byte `byte` on; near the end of the stream a zero-padded copy in `spill`.
ALWAYS_INLINE const uint8_t* stream_bytes(const Operands& o, int64_t byte, uint8_t* spill) {
  if (byte + 16 <= o.code_bytes) return o.codes + byte;
  std::memset(spill, 0, 16);
  if (byte < o.code_bytes) std::memcpy(spill, o.codes + byte, o.code_bytes - byte);
  return spill;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,f16c")
namespace avx512 {

struct Simd {
  using V = __m512;
  static constexpr int W = 16;
  ALWAYS_INLINE static V zero() { return _mm512_setzero_ps(); }
  ALWAYS_INLINE static V set1(float v) { return _mm512_set1_ps(v); }
  ALWAYS_INLINE static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  ALWAYS_INLINE static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  ALWAYS_INLINE static __mmask16 mask(int64_t remaining) {
    return remaining >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << remaining) - 1);
  }
  ALWAYS_INLINE static V load(const float* p, int64_t remaining) { return _mm512_maskz_loadu_ps(mask(remaining), p); }
  ALWAYS_INLINE static V load_full(const float* p) { return _mm512_loadu_ps(p); }
  ALWAYS_INLINE static void store(float* p, V v, int64_t remaining) { _mm512_mask_storeu_ps(p, mask(remaining), v); }
  ALWAYS_INLINE static void store_full(float* p, V v) { _mm512_storeu_ps(p, v); }
  ALWAYS_INLINE static float sum(V v) { return _mm512_reduce_add_ps(v); }

  // Code extraction and table look-up (used by codebook_simd.inc: Decoder and the hoisted fast paths).
  using I = __m512i;
  ALWAYS_INLINE static I load_i(const void* p) { return _mm512_load_si512(p); }
  ALWAYS_INLINE static I set1_i(int32_t v) { return _mm512_set1_epi32(v); }
  ALWAYS_INLINE static I set1_w(int16_t v) { return _mm512_set1_epi16(v); }
  ALWAYS_INLINE static I widen_bytes(const uint8_t* p) {  // W bytes, zero-extended to 32-bit lanes
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  ALWAYS_INLINE static I high_nibbles(I v) { return _mm512_srli_epi32(v, 4); }
  ALWAYS_INLINE static I codes(const uint8_t* src, I bytes, I shifts, I mask) {
    const I raw = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    return _mm512_and_si512(_mm512_srlv_epi32(_mm512_shuffle_epi8(raw, bytes), shifts), mask);
  }
  ALWAYS_INLINE static I element_index(I codes, I seg_shift, I elem) {
    return _mm512_add_epi32(_mm512_sllv_epi32(codes, seg_shift), elem);
  }
  // Look-up kinds: 0 = table in one register, 1 = in two, 2 = gather, 3 = whole codewords loaded one by one (AVX2
  // only, see kernel_isa), 4 = a 64-float table as two two-register permutes merged by index bit 5 (half the time
  // of a gather here; for 128 floats four permutes cost what the gather does), 5 = float16 pairs gathered whole
  // (half_pairs; plan_gemv gives pairs in whole 16 values to avx2::gemv_half_pairs' scalar loads instead), 6 =
  // float16 pairs of <= 64 codewords permuted in registers (half_split).
  template <int KIND>
  ALWAYS_INLINE static V lookup(I idx, V lo, V hi, const float* table) {
    if constexpr (KIND == 0) return _mm512_permutexvar_ps(idx, lo);
    else if constexpr (KIND == 1) return _mm512_permutex2var_ps(lo, idx, hi);
    else if constexpr (KIND == 4)
      return _mm512_mask_blend_ps(
          _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32)), _mm512_permutex2var_ps(lo, idx, hi),
          _mm512_permutex2var_ps(_mm512_loadu_ps(table + 32), idx, _mm512_loadu_ps(table + 48)));
    else return _mm512_i32gather_ps(idx, table, 4);
  }
  static constexpr bool kHalfPairs = true, kHalfSplit = true, kCodewords = false;
  // Kind 5 (float16 pairs): a pair is one 32-bit element of the float16 table, so the chunk's 8 pairs are one 8-lane
  // gather (codes extracted in lanes by `bytes` and `shifts`, segment length 1 patterns), widened to 16 floats.
  ALWAYS_INLINE static V half_pairs(const uint8_t* src, I bytes, I shifts, I mask, const uint16_t* table) {
    const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    const __m256i codes = _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_shuffle_epi8(raw, _mm512_castsi512_si256(bytes)), _mm512_castsi512_si256(shifts)),
        _mm512_castsi512_si256(mask));
    return _mm512_cvtph_ps(_mm256_i32gather_epi32(reinterpret_cast<const int*>(table), codes, 4));
  }
  // Kind 6 (float16 pairs of <= 64 codewords, split by element, Operands::half_split): 32 values (two chunks) at
  // once. Each 16-bit lane gets its pair's code (16-bit lane patterns); one permute over the 64 first elements and
  // one over the 64 second elements, even lanes from the first and odd from the second, widened to 2 x 16 floats.
  ALWAYS_INLINE static void half_split(const uint8_t* src, I bytes, I shifts, I mask, const uint16_t* table, V* out) {
    const I raw = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    const I idx = _mm512_and_si512(_mm512_srlv_epi16(_mm512_shuffle_epi8(raw, bytes), shifts), mask);
    const I first = _mm512_permutex2var_epi16(_mm512_loadu_si512(table), idx, _mm512_loadu_si512(table + 32));
    const I second = _mm512_permutex2var_epi16(_mm512_loadu_si512(table + 64), idx, _mm512_loadu_si512(table + 96));
    const I pairs = _mm512_mask_blend_epi16(0xAAAAAAAA, first, second);
    out[0] = _mm512_cvtph_ps(_mm512_castsi512_si256(pairs));
    out[1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(pairs, 1));
  }
  ALWAYS_INLINE static int lookup_kind(int64_t table_floats, int64_t seg) {
    if (table_floats <= 32) return table_floats <= 16 ? 0 : 1;
    if (seg > 2) return 2;  // not reached: kernel_isa gives these layouts to the AVX2 kernels (kind 3)
    return table_floats <= 64 ? 4 : 2;
  }
};

#include "codebook_simd.inc"

}  // namespace avx512
#pragma GCC pop_options

// The codebooks as float16 byte planes of plane_bytes (>= 2^bits) each: per book and element of a codeword, the
// low bytes of its values, then the high bytes; entry k holds code k & (2^bits - 1), so a look-up that reads more
// index bits than the code has finds the same value (entries past n_clusters zero). Empty when a value is not a
// float16 exactly.
std::vector<uint8_t> byte_planes(const Operands& o, int64_t plane_bytes) {
  const Layout& l = o.l;
  const int64_t entries = int64_t(1) << l.bits, book_bytes = 2 * l.seg * plane_bytes;
  const int64_t n_books = (l.channels + l.rows_per_book - 1) / l.rows_per_book;
  std::vector<uint8_t> planes(n_books * book_bytes, 0);
  for (int64_t b = 0; b < n_books; ++b)
    for (int64_t i = 0; i < l.n_clusters * l.seg; ++i) {
      uint16_t h;
      if (!o.half_value(b, i, h)) return {};
      uint8_t* low = planes.data() + b * book_bytes + (i % l.seg) * 2 * plane_bytes;
      for (int64_t k = i / l.seg; k < plane_bytes; k += entries) {
        low[k] = uint8_t(h & 0xFF);
        low[plane_bytes + k] = uint8_t(h >> 8);
      }
    }
  return planes;
}

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

struct Simd {
  using V = __m256;
  static constexpr int W = 8;
  ALWAYS_INLINE static V zero() { return _mm256_setzero_ps(); }
  ALWAYS_INLINE static V set1(float v) { return _mm256_set1_ps(v); }
  ALWAYS_INLINE static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  ALWAYS_INLINE static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  ALWAYS_INLINE static __m256i mask(int64_t remaining) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(std::min<int64_t>(remaining, 8))),
                              _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0));
  }
  ALWAYS_INLINE static V load(const float* p, int64_t remaining) {
    return remaining >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask(remaining));
  }
  ALWAYS_INLINE static V load_full(const float* p) { return _mm256_loadu_ps(p); }
  ALWAYS_INLINE static void store(float* p, V v, int64_t remaining) {
    if (remaining >= 8) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, mask(remaining), v);
  }
  ALWAYS_INLINE static void store_full(float* p, V v) { _mm256_storeu_ps(p, v); }
  ALWAYS_INLINE static float sum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  using I = __m256i;
  ALWAYS_INLINE static I load_i(const void* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }
  ALWAYS_INLINE static I set1_i(int32_t v) { return _mm256_set1_epi32(v); }
  ALWAYS_INLINE static I set1_w(int16_t v) { return _mm256_set1_epi16(v); }
  ALWAYS_INLINE static I widen_bytes(const uint8_t* p) {  // W bytes, zero-extended to 32-bit lanes
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  ALWAYS_INLINE static I high_nibbles(I v) { return _mm256_srli_epi32(v, 4); }
  ALWAYS_INLINE static I codes(const uint8_t* src, I bytes, I shifts, I mask) {
    const I raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(raw, bytes), shifts), mask);
  }
  ALWAYS_INLINE static I element_index(I codes, I seg_shift, I elem) {
    return _mm256_add_epi32(_mm256_sllv_epi32(codes, seg_shift), elem);
  }
  // Kinds as on AVX-512, with 8-float registers: 0 = one register, 1 = two merged by index bit 3, 4 = a 32-float
  // table (5-bit scalars, 16 pairs) in four, merged by bits 3 and 4: on a Zen 3 EPYC 1.55x the 8-lane gather (about
  // ten cycles there; one thread, 5-bit codes of 1536 x 576, a standalone copy), 2 = gather otherwise.
  template <int KIND>
  ALWAYS_INLINE static V lookup(I idx, V lo, V hi, const float* table) {
    if constexpr (KIND == 0) return _mm256_permutevar8x32_ps(lo, idx);
    else if constexpr (KIND == 1)
      return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                              _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    else if constexpr (KIND == 4) {
      const V bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
      const V low = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), bit3);
      const V high = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(table + 16), idx),
                                      _mm256_permutevar8x32_ps(_mm256_loadu_ps(table + 24), idx), bit3);
      return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 27)));
    } else return _mm256_i32gather_ps(table, idx, 4);
  }
  ALWAYS_INLINE static int lookup_kind(int64_t table_floats, int64_t seg) {
    return table_floats <= 8 ? 0 : table_floats <= 16 ? 1 : seg > 2 ? 3 : table_floats <= 32 ? 4 : 2;
  }
  // a 4-lane gather costs more than kind 2 here; 16-bit permutes over two registers need AVX-512
  static constexpr bool kHalfPairs = false, kHalfSplit = false, kCodewords = true;
  template <int BITS>
  ALWAYS_INLINE static V codewords(const uint8_t* src, int s0, const float* table, int64_t bits, int64_t seg) {
    const CodeReader<BITS> code(src, s0, bits);
    if (seg == 8) return _mm256_loadu_ps(table + code(0) * 8);
    const float *a = table + code(0) * 4, *b = table + code(1) * 4;  // seg == 4
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(a)), _mm_loadu_ps(b), 1);
  }
};

#include "codebook_simd.inc"

// 4-bit scalar codes whose table values are float16 exactly (the default table_dtype) in blocks of 32 values: the
// 16-entry table as two byte planes, the low and the high bytes of its float16 values, one 128-bit register each.
// A block's 16 code bytes give 16 low-nibble and 16 high-nibble indexes; a byte shuffle of each plane looks up
// 16 values' bytes, interleaving the two planes' bytes gives 16 float16 values and F16C widens them. gemv_nibbles'
// look-up takes two 8-float permutes and a blend per 8 values: on a Zen 3 EPYC (AVX2, no AVX-512) the planes ran
// 1.6x faster (one thread, 1536 x 576). Activations in nibble_order of 16 lanes: per block the even values, then the
// odd ones.
constexpr int64_t kPlaneBlock = 32;  // values per block
constexpr int64_t kPlaneBytes = 32;  // per codebook: 16 low bytes, then 16 high bytes

// byte_planes of 4-bit scalar tables in blocks of whole kPlaneBlock values (kPlaneBytes per book), or empty.
std::vector<uint8_t> half_planes(const Operands& o) {
  return whole_nibble_blocks(o.l, kPlaneBlock) ? byte_planes(o, 16) : std::vector<uint8_t>();
}

// y[b, c] for R channels from c and NB activation rows from b0 (x in nibble_order of 16 lanes).
template <int NB, int R>
void gemv_plane_rows(const Operands& o, const uint8_t* planes, const float* x, float* y, int64_t b0, int64_t c) {
  const Layout& l = o.l;
  const int64_t group = l.group ? l.group : l.length;
  const __m128i low_nibble = _mm_set1_epi8(0x0F);
  const uint8_t* src[R];
  __m128i low[R], high[R];
  V total[R][NB];
  for (int r = 0; r < R; ++r) {
    src[r] = o.codes + (c + r) * l.length / 2;
    const uint8_t* book = planes + ((c + r) / l.rows_per_book) * kPlaneBytes;
    low[r] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(book));
    high[r] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(book + 16));
    for (int b = 0; b < NB; ++b) total[r][b] = Simd::zero();
  }
  for (int64_t g0 = 0, gi = 0; g0 < l.length; g0 += group, ++gi) {
    V acc[R][NB];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < NB; ++b) acc[r][b] = Simd::zero();
    for (int64_t p = g0; p < g0 + group; p += kPlaneBlock) {
      V xv[NB][4];
      for (int b = 0; b < NB; ++b)
        for (int k = 0; k < 4; ++k) xv[b][k] = Simd::load_full(x + (b0 + b) * l.length + p + k * W);
      for (int r = 0; r < R; ++r) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src[r]));
        src[r] += kPlaneBlock / 2;
        const __m128i even = _mm_and_si128(bytes, low_nibble);
        const __m128i odd = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_nibble);
        const __m128i even_lo = _mm_shuffle_epi8(low[r], even), even_hi = _mm_shuffle_epi8(high[r], even);
        const __m128i odd_lo = _mm_shuffle_epi8(low[r], odd), odd_hi = _mm_shuffle_epi8(high[r], odd);
        const V w[4] = {_mm256_cvtph_ps(_mm_unpacklo_epi8(even_lo, even_hi)),
                        _mm256_cvtph_ps(_mm_unpackhi_epi8(even_lo, even_hi)),
                        _mm256_cvtph_ps(_mm_unpacklo_epi8(odd_lo, odd_hi)),
                        _mm256_cvtph_ps(_mm_unpackhi_epi8(odd_lo, odd_hi))};
        for (int b = 0; b < NB; ++b)
          for (int k = 0; k < 4; ++k) acc[r][b] = Simd::fmadd(w[k], xv[b][k], acc[r][b]);
      }
    }
    add_scaled_group<NB, R>(o, c, gi, acc, total);
  }
  store_sums<NB, R>(total, l.channels, y, b0, c);
}

// gemv for layouts with half_planes, x in nibble_order of 16 lanes.
void gemv_planes(const Operands& o, const uint8_t* planes, const float* x, int64_t B, float* y, int64_t c0,
                 int64_t c1) {
  for_channel_passes(o, B, c0, c1, [&](int64_t b0, int64_t c, auto nb, auto r) {
    gemv_plane_rows<decltype(nb)::value, decltype(r)::value>(o, planes, x, y, b0, c);
  });
}


// 6-bit codes (64-entry tables) of pairs (swsc-3bit) or scalars (the `bits=` ladder's 33-64-value tables) whose
// values are float16 exactly, in scale groups (or channels) of whole 16 codes: byte planes per codebook (each
// element's low and high bytes), each of 64 entries in four 16-byte registers. A byte shuffle looks up 16 codes'
// bytes in each register and two byte blends on the index's bits 4 and 5 pick the register; interleaving low and
// high bytes gives float16 values that F16C widens. Steps of 32 codes use 256-bit shuffles (both lanes hold the
// same register), a group's last 16 codes, where fewer than 32 remain, 128-bit ones. The float kernel gathers a
// float per value from the table: on a Zen 3 EPYC the pair planes ran 2.5x faster (one thread, 1536 x 576, groups
// of 192) and 1.9x with 128-bit steps only. Activations in six_bit_order.
template <int SEG>
constexpr int64_t kSixBitBookBytes = SEG * 2 * 64;  // per codebook: [element][low, high byte][64 codes]

// byte_planes of 6-bit pairs or scalars in scale groups (or channels) of whole 16 codes, or empty.
std::vector<uint8_t> six_bit_planes(const Operands& o) {
  const Layout& l = o.l;
  const int64_t group = l.group ? l.group : l.length, step = 16 * l.seg;
  if ((l.seg != 1 && l.seg != 2) || l.bits != 6 || l.length % step || group % step) return {};
  return byte_planes(o, 64);
}

// Steps of a scale group of `size` values from its start: 32 codes while at least 32 remain, then 16.
template <int SEG, class Body>
ALWAYS_INLINE void for_six_bit_steps(int64_t start, int64_t size, Body body) {
  int64_t p = start;
  for (; p + 32 * SEG <= start + size; p += 32 * SEG) body(p, std::integral_constant<int, 32>{});
  if (p < start + size) body(p, std::integral_constant<int, 16>{});
}

// The n values of x (rows of `length`) in the order the 6-bit plane kernel multiplies them: per 32-code step,
// element 0 of codes 0-7, 16-23, 8-15, 24-31, then element 1 of the same (pairs); per 16-code step, element 0 of
// codes 0-15, then element 1.
std::vector<float> six_bit_order(const float* x, int64_t n, int64_t length, int64_t group, int64_t seg) {
  static constexpr int kBlockOfVector[4] = {0, 2, 1, 3};
  std::vector<float> out(n);
  auto reorder = [&](auto seg_constant) {
    constexpr int S = decltype(seg_constant)::value;
    for (int64_t row = 0; row < n; row += length)
      for (int64_t g0 = 0; g0 < length; g0 += group)
        for_six_bit_steps<S>(row + g0, group, [&](int64_t p, auto codes) {
          constexpr int kCodes = decltype(codes)::value;
          for (int e = 0; e < S; ++e)
            for (int i = 0; i < kCodes; ++i) {
              const int code = kCodes == 32 ? kBlockOfVector[i / 8] * 8 + i % 8 : i;
              out[p + e * kCodes + i] = x[p + S * code + e];
            }
        });
  };
  if (seg == 1) reorder(std::integral_constant<int, 1>{});
  else reorder(std::integral_constant<int, 2>{});
  return out;
}

// 16 6-bit codes from 12 stream bytes (16 readable) as bytes: a 32-bit lane per 3 bytes, each code moved to its byte.
ALWAYS_INLINE __m128i pair_codes(__m128i raw) {
  const __m128i v = _mm_shuffle_epi8(raw, _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1));
  const __m128i c0 = _mm_and_si128(v, _mm_set1_epi32(0x3F));
  const __m128i c1 = _mm_and_si128(_mm_slli_epi32(v, 2), _mm_set1_epi32(0x3F00));
  const __m128i c2 = _mm_and_si128(_mm_slli_epi32(v, 4), _mm_set1_epi32(0x3F0000));
  const __m128i c3 = _mm_and_si128(_mm_slli_epi32(v, 6), _mm_set1_epi32(0x3F000000));
  return _mm_or_si128(_mm_or_si128(c0, c1), _mm_or_si128(c2, c3));
}

ALWAYS_INLINE __m256i pair_codes(__m256i raw) {
  const __m256i v = _mm256_shuffle_epi8(raw, _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
                                                              0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1));
  const __m256i c0 = _mm256_and_si256(v, _mm256_set1_epi32(0x3F));
  const __m256i c1 = _mm256_and_si256(_mm256_slli_epi32(v, 2), _mm256_set1_epi32(0x3F00));
  const __m256i c2 = _mm256_and_si256(_mm256_slli_epi32(v, 4), _mm256_set1_epi32(0x3F0000));
  const __m256i c3 = _mm256_and_si256(_mm256_slli_epi32(v, 6), _mm256_set1_epi32(0x3F000000));
  return _mm256_or_si256(_mm256_or_si256(c0, c1), _mm256_or_si256(c2, c3));
}

// One byte plane's 64 entries at 16 or 32 byte indexes; bit4 / bit5: the indexes shifted so that bit 4 / 5 is each
// byte's top bit (what a byte blend reads).
ALWAYS_INLINE __m128i plane_lookup(const uint8_t* plane, __m128i idx, __m128i bit4, __m128i bit5) {
  const __m128i* t = reinterpret_cast<const __m128i*>(plane);
  const __m128i a = _mm_blendv_epi8(_mm_shuffle_epi8(_mm_loadu_si128(t), idx),
                                    _mm_shuffle_epi8(_mm_loadu_si128(t + 1), idx), bit4);
  const __m128i b = _mm_blendv_epi8(_mm_shuffle_epi8(_mm_loadu_si128(t + 2), idx),
                                    _mm_shuffle_epi8(_mm_loadu_si128(t + 3), idx), bit4);
  return _mm_blendv_epi8(a, b, bit5);
}

ALWAYS_INLINE __m256i plane_lookup(const uint8_t* plane, __m256i idx, __m256i bit4, __m256i bit5) {
  const __m128i* t = reinterpret_cast<const __m128i*>(plane);
  const __m256i a = _mm256_blendv_epi8(_mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(t)), idx),
                                       _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(t + 1)), idx),
                                       bit4);
  const __m256i b = _mm256_blendv_epi8(_mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(t + 2)), idx),
                                       _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(t + 3)), idx),
                                       bit4);
  return _mm256_blendv_epi8(a, b, bit5);
}

// The weights of one step (CODES = 32 or 16) of a channel whose codes start at src, in six_bit_order, as float
// vectors.
template <int SEG, int CODES>
ALWAYS_INLINE void six_bit_weights(const uint8_t* src, const uint8_t* book, V* w) {
  if constexpr (CODES == 32) {
    const __m256i raw = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(src + 12),
                                            reinterpret_cast<const __m128i*>(src));
    const __m256i idx = pair_codes(raw), bit4 = _mm256_slli_epi16(idx, 3), bit5 = _mm256_slli_epi16(idx, 2);
    for (int e = 0; e < SEG; ++e) {
      const __m256i low = plane_lookup(book + e * 128, idx, bit4, bit5);
      const __m256i high = plane_lookup(book + e * 128 + 64, idx, bit4, bit5);
      const __m256i a = _mm256_unpacklo_epi8(low, high), b = _mm256_unpackhi_epi8(low, high);
      w[e * 4 + 0] = _mm256_cvtph_ps(_mm256_castsi256_si128(a));
      w[e * 4 + 1] = _mm256_cvtph_ps(_mm256_extracti128_si256(a, 1));
      w[e * 4 + 2] = _mm256_cvtph_ps(_mm256_castsi256_si128(b));
      w[e * 4 + 3] = _mm256_cvtph_ps(_mm256_extracti128_si256(b, 1));
    }
  } else {
    const __m128i idx = pair_codes(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    const __m128i bit4 = _mm_slli_epi16(idx, 3), bit5 = _mm_slli_epi16(idx, 2);
    for (int e = 0; e < SEG; ++e) {
      const __m128i low = plane_lookup(book + e * 128, idx, bit4, bit5);
      const __m128i high = plane_lookup(book + e * 128 + 64, idx, bit4, bit5);
      w[e * 2 + 0] = _mm256_cvtph_ps(_mm_unpacklo_epi8(low, high));
      w[e * 2 + 1] = _mm256_cvtph_ps(_mm_unpackhi_epi8(low, high));
    }
  }
}

// y[b, c] for R channels from c and NB activation rows from b0 (x in six_bit_order); channel c + r's codes start
// at codes + r * (its bytes), with 4 readable bytes past the last.
template <int SEG, int NB, int R>
void gemv_six_bit_rows(const Operands& o, const uint8_t* planes, const uint8_t* codes, const float* x, float* y,
                       int64_t b0, int64_t c) {
  const Layout& l = o.l;
  const int64_t group = l.group ? l.group : l.length, channel_bytes = l.length / SEG * 3 / 4;
  const uint8_t* book[R];
  V total[R][NB];
  for (int r = 0; r < R; ++r) {
    book[r] = planes + ((c + r) / l.rows_per_book) * kSixBitBookBytes<SEG>;
    for (int b = 0; b < NB; ++b) total[r][b] = Simd::zero();
  }
  for (int64_t g0 = 0, gi = 0; g0 < l.length; g0 += group, ++gi) {
    V acc[R][NB];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < NB; ++b) acc[r][b] = Simd::zero();
    for_six_bit_steps<SEG>(g0, group, [&](int64_t p, auto codes_per_step) {
      constexpr int kCodes = decltype(codes_per_step)::value, kVectors = kCodes * SEG / W;
      for (int r = 0; r < R; ++r) {
        V w[kVectors];
        six_bit_weights<SEG, kCodes>(codes + r * channel_bytes + p / SEG * 3 / 4, book[r], w);
        for (int b = 0; b < NB; ++b)
          for (int k = 0; k < kVectors; ++k)
            acc[r][b] = Simd::fmadd(w[k], Simd::load_full(x + (b0 + b) * l.length + p + k * W), acc[r][b]);
      }
    });
    add_scaled_group<NB, R>(o, c, gi, acc, total);
  }
  store_sums<NB, R>(total, l.channels, y, b0, c);
}

// Calls rows(b0, c, channel_codes, NB, R) as for_channel_passes does, channel_codes pointing at channel c's codes
// (channel_bytes each, the channels one after another), with `pad` readable bytes past each channel's last: channels
// without them in the stream (the last ones) read a zero-padded copy, one channel a pass.
template <class Rows>
ALWAYS_INLINE void for_padded_channel_passes(const Operands& o, int64_t B, int64_t c0, int64_t c1,
                                             int64_t channel_bytes, int64_t pad, Rows rows) {
  int64_t end = c1;  // channels from `end` on read a copy
  while (end > c0 && end * channel_bytes + pad > o.code_bytes) --end;
  for_channel_passes(o, B, c0, end, [&](int64_t b0, int64_t c, auto nb, auto r) {
    rows(b0, c, o.codes + c * channel_bytes, nb, r);
  });
  std::vector<uint8_t> copy(end < c1 ? channel_bytes + pad : 0, 0);
  for (int64_t c = end; c < c1; ++c) {
    std::memcpy(copy.data(), o.codes + c * channel_bytes, channel_bytes);
    for_batch_blocks(B, [&](int64_t b0, auto nb, auto) {
      rows(b0, c, copy.data(), nb, std::integral_constant<int, 1>{});
    });
  }
}

// gemv for layouts with six_bit_planes, x in six_bit_order.
template <int SEG>
void gemv_six_bit_seg(const Operands& o, const uint8_t* planes, const float* x, int64_t B, float* y, int64_t c0,
                      int64_t c1) {
  for_padded_channel_passes(o, B, c0, c1, o.l.length / SEG * 3 / 4, 4,
                            [&](int64_t b0, int64_t c, const uint8_t* codes, auto nb, auto r) {
    gemv_six_bit_rows<SEG, decltype(nb)::value, decltype(r)::value>(o, planes, codes, x, y, b0, c);
  });
}

void gemv_six_bit(const Operands& o, const uint8_t* planes, const float* x, int64_t B, float* y, int64_t c0,
                  int64_t c1) {
  if (o.l.seg == 1) gemv_six_bit_seg<1>(o, planes, x, B, y, c0, c1);
  else gemv_six_bit_seg<2>(o, planes, x, B, y, c0, c1);
}

// Pairs of 5-8-bit codes (32-256 codewords; 6-bit codes in blocks of 32 values take pair_planes) whose values are
// float16 exactly, in scale groups (or channels) of whole 16 values: 8 codes a step, read by one 64-bit load (8 codes
// of BITS bits are BITS whole bytes), each code's pair by one scalar load of a 32-bit table entry (element 0 in the
// low half), 16 values in order, which F16C widens. On a Zen 3 EPYC an 8-lane gather of pairs took about 6.5 ns, and
// the scalar loads ran the 256-pair GEMVs (most of the 4.25-bit preset's layers) about 2x faster than one gather of
// the 8 pairs did, the 32- and 128-pair ones faster than the general decoder's gather of each value (docs/design.md).
// AVX-512 CPUs run it for pairs of 7-8-bit codes (with VBMI for several tokens only; vbmi::gemv_byte_planes): on a
// Zen 4 EPYC about 2x their 16-lane gather, and faster than the same loads assembled into 512-bit registers; 5-6-bit
// pairs keep their 16-bit permutes there.
constexpr int64_t kHalfPairStep = 16;  // values per step (8 codes)

// Per codebook the 2^bits pairs as float16 bits (element 0 low), past n_clusters zero; empty unless the layout is
// pairs of 5-8-bit codes in groups of whole kHalfPairStep values and every value is a float16 exactly.
std::vector<uint32_t> half_pair_table(const Operands& o) {
  const Layout& l = o.l;
  const int64_t group = l.group ? l.group : l.length;
  if (l.seg != 2 || l.bits < 5 || l.length % kHalfPairStep || group % kHalfPairStep) return {};
  const int64_t n_books = (l.channels + l.rows_per_book - 1) / l.rows_per_book, entries = int64_t(1) << l.bits;
  std::vector<uint32_t> table(n_books * entries, 0);
  for (int64_t b = 0; b < n_books; ++b)
    for (int64_t k = 0; k < l.n_clusters; ++k) {
      uint16_t e0, e1;
      if (!o.half_value(b, 2 * k, e0) || !o.half_value(b, 2 * k + 1, e1)) return {};
      table[b * entries + k] = uint32_t(e0) | uint32_t(e1) << 16;
    }
  return table;
}

// y[b, c] for R channels from c and NB activation rows from b0 (x in its own order); channel c + r's codes start at
// codes + r * (its bytes), with 8 - BITS readable bytes past the last.
template <int BITS, int NB, int R>
void gemv_half_pair_rows(const Operands& o, const uint32_t* table, const uint8_t* codes, const float* x, float* y,
                         int64_t b0, int64_t c) {
  constexpr uint64_t kMask = (uint64_t(1) << BITS) - 1;
  const Layout& l = o.l;
  const int64_t group = l.group ? l.group : l.length;
  const uint8_t* src[R];
  const uint32_t* book[R];
  V total[R][NB];
  for (int r = 0; r < R; ++r) {
    src[r] = codes + r * (l.segs / 8 * BITS);
    book[r] = table + (c + r) / l.rows_per_book * (int64_t(1) << BITS);
    for (int b = 0; b < NB; ++b) total[r][b] = Simd::zero();
  }
  for (int64_t g0 = 0, gi = 0; g0 < l.length; g0 += group, ++gi) {
    V acc[R][NB];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < NB; ++b) acc[r][b] = Simd::zero();
    for (int64_t p = g0; p < g0 + group; p += kHalfPairStep) {
      V xv[NB][2];
      for (int b = 0; b < NB; ++b)
        for (int k = 0; k < 2; ++k) xv[b][k] = Simd::load_full(x + (b0 + b) * l.length + p + k * W);
      for (int r = 0; r < R; ++r) {
        uint64_t word;
        std::memcpy(&word, src[r], 8);
        src[r] += BITS;
        const uint32_t* pairs = book[r];
        const V w[2] = {_mm256_cvtph_ps(_mm_setr_epi32(pairs[word & kMask], pairs[(word >> BITS) & kMask],
                                                       pairs[(word >> 2 * BITS) & kMask],
                                                       pairs[(word >> 3 * BITS) & kMask])),
                        _mm256_cvtph_ps(_mm_setr_epi32(pairs[(word >> 4 * BITS) & kMask],
                                                       pairs[(word >> 5 * BITS) & kMask],
                                                       pairs[(word >> 6 * BITS) & kMask],
                                                       pairs[(word >> 7 * BITS) & kMask]))};
        for (int b = 0; b < NB; ++b)
          for (int k = 0; k < 2; ++k) acc[r][b] = Simd::fmadd(w[k], xv[b][k], acc[r][b]);
      }
    }
    add_scaled_group<NB, R>(o, c, gi, acc, total);
  }
  store_sums<NB, R>(total, l.channels, y, b0, c);
}

template <int BITS>
void gemv_half_pairs_of(const Operands& o, const uint32_t* table, const float* x, int64_t B, float* y, int64_t c0,
                        int64_t c1) {
  for_padded_channel_passes(o, B, c0, c1, o.l.segs / 8 * BITS, 8 - BITS,
                            [&](int64_t b0, int64_t c, const uint8_t* codes, auto nb, auto r) {
    gemv_half_pair_rows<BITS, decltype(nb)::value, decltype(r)::value>(o, table, codes, x, y, b0, c);
  });
}

// gemv for layouts with a half_pair_table.
void gemv_half_pairs(const Operands& o, const uint32_t* table, const float* x, int64_t B, float* y, int64_t c0,
                     int64_t c1) {
  switch (o.l.bits) {
    case 5: return gemv_half_pairs_of<5>(o, table, x, B, y, c0, c1);
    case 6: return gemv_half_pairs_of<6>(o, table, x, B, y, c0, c1);
    case 7: return gemv_half_pairs_of<7>(o, table, x, B, y, c0, c1);
    default: return gemv_half_pairs_of<8>(o, table, x, B, y, c0, c1);
  }
}

}  // namespace avx2
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------------------------
// Integer dot products (plan_gemv chooses them) for 8-bit codes of 4-dim vectors over output channels
// (swsc-2bit), where the float kernels spend a load and an insert per 4-value codeword. The codebook is rounded to
// 8-bit integers (one step per codebook) kept as byte planes, one per element, offset by 128 to unsigned bytes; the
// activations to 15-bit integers per unit of 32 values, each as two signed bytes (hi * 128 + lo); unsigned-by-signed
// byte dot products (AVX-512 VNNI `vpdpbusd`, 64 per instruction) multiply the codebook bytes by each activation
// byte. Four channels share a 512-bit register, 16 code bytes each in a 128-bit lane, so every look-up decodes four
// channels: a 256-entry plane is four byte permutes over 64 bytes (AVX-512 VBMI), each merging the bytes whose codes
// it holds (bits 6 and 7). Each 32-bit lane sums 16 products of one unit (the low bytes' sum started at -128 times
// the sum of the activations: the offset), is converted to float once, times the activation step, group scale and
// codebook step. Codebooks on their 8-bit grid (books_on_int_grid) run here by default: the outputs then differ
// from the float kernels' by the activations' rounding only. Others run here with set_integer_dot(true), rounded.
constexpr int32_t kIntBookMax = 127;       // codebook integers in [-127, 127]
constexpr int32_t kIntActMax = 127 * 128;  // activation integers in [-16256, 16256]: two signed bytes, hi * 128 + lo
constexpr int64_t kIntUnit = 32;           // values per activation step
constexpr int64_t kIntBlock = 64;          // values per pass: 16 quadruples of each of four channels
constexpr int64_t kIntBookBytes = 4 * 256;  // per codebook: 4 elements, 256 codes

std::atomic<bool> integer_dot{false};

bool int_dot_supported() {
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
           __builtin_cpu_supports("avx512vnni");
  }();
  return supported;
}

bool int_dot_available() { return active_isa() == kAvx512 && int_dot_supported(); }

// Whether the integer kernel reads a layout: the CPU has it (within the cap), 8-bit codes of 4-dim vectors in
// channels of whole 64 values and scale groups of whole units.
bool int_layout(const Layout& l) {
  return int_dot_available() && l.seg == 4 && l.bits == 8 && l.length % kIntBlock == 0 && l.group % kIntUnit == 0;
}

// Float16 rounds a value by at most 1/2048 of it, so each value of a book stored in float16 from its 8-bit grid is
// within this fraction of itself from its multiple of the step (recomputed from the stored top, the same step).
// An off-grid value passes with a chance of at most |q| / 512 (under 1 in 4), a value the grid would zero never.
constexpr float kGridTolerance = 1.0f / 1024;

// Whether value c is off the 8-bit grid of `step`: farther than kGridTolerance * |c| from q * step, q = c / step
// rounded.
inline bool off_int_grid(float c, float q, float step) {
  return std::fabs(c - q * step) > std::fabs(c) * kGridTolerance;
}

// Whether each codebook's first n values lie on its 8-bit grid: none off_int_grid of the step the integer kernels
// use, the book's largest magnitude / 127 (swsc_hf.core.int8_grid_codebook writes such books). The integer kernels
// read those exactly.
bool books_on_int_grid(const Operands& o, int64_t n) {
  const int64_t n_books = (o.l.channels + o.l.rows_per_book - 1) / o.l.rows_per_book;
  for (int64_t b = 0; b < n_books; ++b) {
    const float* book = o.tables.data() + b * o.l.book_stride;
    float top = 0.0f;
    for (int64_t i = 0; i < n; ++i) top = std::max(top, std::fabs(book[i]));
    const float step = top / kIntBookMax;
    for (int64_t i = 0; i < n && top > 0.0f; ++i)
      if (off_int_grid(book[i], std::nearbyint(book[i] / step), step)) return false;
  }
  return true;
}

// The codebooks as integers plus 128: per book and element a plane of bytes, an entry per code (past n_clusters:
// 128, the value 0); per book the float value of one integer step.
struct IntTables {
  std::vector<uint8_t> planes;
  std::vector<float> step;
  // Channel c's codebook; one per matrix needs no division (about 15 cycles, per pack of channels here).
  static ALWAYS_INLINE int64_t index(int64_t c, const Layout& l) {
    return l.rows_per_book >= l.channels ? 0 : c / l.rows_per_book;
  }
  ALWAYS_INLINE const uint8_t* book(int64_t c, const Layout& l) const {
    return planes.data() + index(c, l) * kIntBookBytes;
  }
  ALWAYS_INLINE float book_step(int64_t c, const Layout& l) const { return step[index(c, l)]; }
};

// The activations as two signed bytes each (hi * 128 + lo) in the order the kernel multiplies them, the 32-bit lane
// starts (-128 times the sum of the integers each lane multiplies) and the activation steps (int_activations).
struct IntActivations {
  std::vector<int8_t> hi, lo;
  std::vector<int32_t> offset;
  std::vector<float> step;
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,f16c")
namespace vbmi {

// Rounds 16 floats to integers in [-limit, limit] (to nearest, ties to even: what lrint does) into q.
ALWAYS_INLINE void round_clamped(__m512 v, int32_t limit, int32_t* q) {
  const __m512i r = _mm512_cvtps_epi32(v);
  _mm512_store_si512(q, _mm512_max_epi32(_mm512_min_epi32(r, _mm512_set1_epi32(limit)), _mm512_set1_epi32(-limit)));
}

IntTables int_tables(const Operands& o) {
  const Layout& l = o.l;
  const int64_t n_books = (l.channels + l.rows_per_book - 1) / l.rows_per_book, n = l.n_clusters * 4;
  IntTables t{std::vector<uint8_t>(n_books * kIntBookBytes, 128), std::vector<float>(n_books, 1.0f)};
  alignas(64) int32_t q[1024];
  for (int64_t b = 0; b < n_books; ++b) {
    const float* book = o.tables.data() + b * l.book_stride;  // padded past n: whole vectors stay in the table
    __m512 amax = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(book + i)));
    const float top = _mm512_reduce_max_ps(amax);
    if (top > 0.0f) t.step[b] = top / kIntBookMax;
    for (int64_t i = 0; i < n; i += 16)
      round_clamped(_mm512_div_ps(_mm512_loadu_ps(book + i), _mm512_set1_ps(t.step[b])), kIntBookMax, q + i);
    for (int64_t e = 0; e < 4; ++e) {
      uint8_t* plane = t.planes.data() + b * kIntBookBytes + e * 256;
      for (int64_t k = 0; k < l.n_clusters; ++k) plane[k] = uint8_t(q[4 * k + e] + 128);
    }
  }
  return t;
}

// A unit's 32 activations as integers (q) and the float value of one integer step.
ALWAYS_INLINE float unit_integers(const float* xu, int32_t* q) {
  const __m512 lo = _mm512_loadu_ps(xu), hi = _mm512_loadu_ps(xu + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
  const float inv = amax > 0.0f ? kIntActMax / amax : 0.0f;
  round_clamped(_mm512_mul_ps(lo, _mm512_set1_ps(inv)), kIntActMax, q);
  round_clamped(_mm512_mul_ps(hi, _mm512_set1_ps(inv)), kIntActMax, q + 16);
  return amax > 0.0f ? amax / kIntActMax : 0.0f;
}

// q as hi * 128 + lo (lo in [-64, 63]) at index i of a.hi and a.lo.
ALWAYS_INLINE void split(int32_t q, IntActivations& a, int64_t i) {
  const int32_t hi = (q + 64) >> 7;
  a.hi[i] = int8_t(hi);
  a.lo[i] = int8_t(q - 128 * hi);
}

// For the quadruples, B rows of `length` values: per row and pass of 64 values, element e's 16 values (of its 16
// quadruples) at e * 16; per pass four lane starts and four steps (lanes 0-1: the pass's first unit, 2-3: its
// second), repeated in each 128-bit lane by the kernel.
IntActivations int_activations(const float* x, int64_t B, int64_t length) {
  const int64_t passes = length / kIntBlock;
  IntActivations a{std::vector<int8_t>(B * length), std::vector<int8_t>(B * length),
                   std::vector<int32_t>(B * passes * 4), std::vector<float>(B * passes * 4)};
  alignas(64) int32_t q[kIntUnit];
  for (int64_t b = 0; b < B; ++b)
    for (int64_t u = 0; u < length / kIntUnit; ++u) {
      const float step = unit_integers(x + b * length + u * kIntUnit, q);
      const int64_t pass = b * passes + u / 2, half = u % 2;
      const int64_t at = pass * kIntBlock + half * 8;  // quadruples 8 * half .. 8 * half + 7 of the pass
      for (int64_t i = 0; i < kIntUnit; ++i) split(q[i], a, at + (i % 4) * 16 + i / 4);  // element i % 4
      for (int64_t lane = 0; lane < 2; ++lane) {  // a 32-bit lane multiplies 4 quadruples: 16 values
        int32_t sum = 0;
        for (int64_t i = 16 * lane; i < 16 * lane + 16; ++i) sum += q[i];
        a.offset[pass * 4 + 2 * half + lane] = -128 * sum;
        a.step[pass * 4 + 2 * half + lane] = step;
      }
    }
  return a;
}

// Lane k (4 floats): the scale of group g of the channel whose scale row starts at first[k], times `step`. Reads the
// four stored scales in one vector conversion (a scalar conversion each costs more than a unit's products here).
ALWAYS_INLINE __m512 lane_scales(const Operands& o, const int64_t* first, int64_t g, __m512 step, __m512i lane_of) {
  __m128 s = _mm_set1_ps(1.0f);
  if (o.scales.data && o.scales.type == at::kFloat) {
    const float* p = static_cast<const float*>(o.scales.data) + g;
    s = _mm_setr_ps(p[first[0]], p[first[1]], p[first[2]], p[first[3]]);
  } else if (o.scales.data) {  // float16 or bfloat16
    const uint16_t* p = static_cast<const uint16_t*>(o.scales.data) + g;
    const __m128i h = _mm_setr_epi32(p[first[0]], p[first[1]], p[first[2]], p[first[3]]);
    s = o.scales.type == at::kHalf ? _mm_cvtph_ps(_mm_packus_epi32(h, h)) : _mm_castsi128_ps(_mm_slli_epi32(h, 16));
  }
  return _mm512_mul_ps(_mm512_permutexvar_ps(lane_of, _mm512_castps128_ps512(s)), step);
}

ALWAYS_INLINE __m128i load128(const void* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// y[b, c] for the `live` (1..4) channels from c, which share a codebook, and NB activation rows from b0.
template <int NB>
void int_rows(const Operands& o, const IntTables& t, const IntActivations& a, float* y, int64_t b0, int64_t c,
              int64_t live) {
  const Layout& l = o.l;
  const int64_t passes = l.length / kIntBlock, units_per_group = (l.group ? l.group : l.length) / kIntUnit;
  int64_t scale_row[4];  // lanes past `live` repeat the last channel
  const uint8_t* src[4];
  for (int k = 0; k < 4; ++k) {
    const int64_t row = c + std::min<int64_t>(k, live - 1);
    scale_row[k] = row * o.n_groups;
    src[k] = o.codes + row * l.segs;  // a byte per code
  }
  const uint8_t* book = t.book(c, l);
  __m512i plane[4][4];  // element e's 256 entries as four 64-byte registers
  for (int e = 0; e < 4; ++e)
    for (int k = 0; k < 4; ++k) plane[e][k] = _mm512_loadu_si512(book + e * 256 + 64 * k);
  const __m512 step = _mm512_set1_ps(t.book_step(c, l));
  const __m512i lane_of = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i bit6_of = _mm512_set1_epi8(0x40);
  __m512 total[NB], scale = _mm512_setzero_ps();
  for (int b = 0; b < NB; ++b) total[b] = _mm512_setzero_ps();
  int64_t group_first = -1, group_second = -1, unit_group = 0, left_in_group = units_per_group;
  for (int64_t j = 0; j < passes; ++j) {  // 16 code bytes per channel: 16 quadruples, two units
    __m512i codes = _mm512_castsi128_si512(load128(src[0] + 16 * j));
    codes = _mm512_inserti32x4(codes, load128(src[1] + 16 * j), 1);
    codes = _mm512_inserti32x4(codes, load128(src[2] + 16 * j), 2);
    codes = _mm512_inserti32x4(codes, load128(src[3] + 16 * j), 3);
    __m512i acc[NB], acc_hi[NB];  // sums of the low activation bytes (and the offset), of the high ones
    for (int b = 0; b < NB; ++b) {
      acc[b] = _mm512_broadcast_i32x4(load128(a.offset.data() + ((b0 + b) * passes + j) * 4));
      acc_hi[b] = _mm512_setzero_si512();
    }
    // a byte permute reads a code's low 6 bits: bits 6 and 7 pick one of a plane's four 64-byte registers, each
    // permute writing only the bytes whose codes it holds
    const __mmask64 bit6 = _mm512_test_epi8_mask(codes, bit6_of), bit7 = _mm512_movepi8_mask(codes);
    const __mmask64 in[3] = {_kandn_mask64(bit7, bit6), _kandn_mask64(bit6, bit7), _kand_mask64(bit6, bit7)};
    for (int e = 0; e < 4; ++e) {
      __m512i w = _mm512_permutexvar_epi8(codes, plane[e][0]);
      for (int k = 1; k < 4; ++k) w = _mm512_mask_permutexvar_epi8(w, in[k - 1], codes, plane[e][k]);
      for (int b = 0; b < NB; ++b) {
        const int64_t at = ((b0 + b) * passes + j) * kIntBlock + e * 16;
        acc[b] = _mm512_dpbusd_epi32(acc[b], w, _mm512_broadcast_i32x4(load128(a.lo.data() + at)));
        acc_hi[b] = _mm512_dpbusd_epi32(acc_hi[b], w, _mm512_broadcast_i32x4(load128(a.hi.data() + at)));
      }
    }
    const int64_t first = unit_group;  // the groups of units 2 j and 2 j + 1, counted (a division costs ~15 cycles)
    if (--left_in_group == 0) left_in_group = units_per_group, ++unit_group;
    const int64_t second = unit_group;
    if (--left_in_group == 0) left_in_group = units_per_group, ++unit_group;
    if (first != group_first || second != group_second) {  // lanes 0-1: the first unit's group, 2-3: the second's
      const __m512 s = lane_scales(o, scale_row, first, step, lane_of);
      scale = second == first ? s : _mm512_mask_blend_ps(0xCCCC, s, lane_scales(o, scale_row, second, step, lane_of));
      group_first = first;
      group_second = second;
    }
    for (int b = 0; b < NB; ++b) {
      const __m512 xs = _mm512_broadcast_f32x4(_mm_loadu_ps(a.step.data() + ((b0 + b) * passes + j) * 4));
      const __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(acc_hi[b], 7), acc[b]);
      total[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(scale, xs), total[b]);
    }
  }
  for (int b = 0; b < NB; ++b) {
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, total[b]);
    for (int k = 0; k < live; ++k)
      y[(b0 + b) * l.channels + c + k] = (lanes[4 * k] + lanes[4 * k + 1]) + (lanes[4 * k + 2] + lanes[4 * k + 3]);
  }
}

// y[b, c] for channels c0 .. c1 - 1, in packs of up to four channels that share a codebook.
void int_dot(const Operands& o, const IntTables& t, const IntActivations& a, int64_t B, float* y, int64_t c0,
             int64_t c1) {
  const Layout& l = o.l;
  for (int64_t c = c0; c < c1;) {
    const int64_t book_left = l.rows_per_book >= l.channels ? c1 - c : l.rows_per_book - c % l.rows_per_book;
    const int64_t live = std::min({int64_t(4), c1 - c, book_left});
    prefetch_channels(o, c + kPrefetchPasses * 4, 4, c1);
    for (int64_t b0 = 0; b0 < B; b0 += 4) {
      switch (std::min<int64_t>(4, B - b0)) {
        case 1: int_rows<1>(o, t, a, y, b0, c, live); break;
        case 2: int_rows<2>(o, t, a, y, b0, c, live); break;
        case 3: int_rows<3>(o, t, a, y, b0, c, live); break;
        default: int_rows<4>(o, t, a, y, b0, c, live); break;
      }
    }
    c += live;
  }
}

// Scalars of 6-8-bit codes and pairs of 5-8-bit codes whose values are float16 exactly, on AVX-512 VBMI, one
// activation row, scale groups (or channels) of whole 16-code steps. Each value's float16 bits are split into byte
// planes (byte_planes: two per element, plane_bytes each), and four channels share a 512-bit register, a step's 16
// codes of each in a 128-bit lane. Codes under 8 bits come out of their 2 x BITS bytes by one byte permute (each 64-bit
// lane gets the BITS bytes of 8 codes) and one multishift (each byte gets its code in its low bits). A plane's
// look-up of the 64 codes is one byte permute over 64 bytes for <= 6 bits (5-bit tables are repeated, so the byte's
// sixth bit need not be cleared), one over 128 bytes for 7, and two merged on bit 7 for 8. Unpacking the planes'
// bytes in each lane gives the channels' float16 values, element 0 of codes 0-7 and 8-15 (then element 1 of pairs),
// which F16C widens in halves of two channels (x in byte_plane_order: each 8 activations twice). For 256 pairs
// about 0.4 instructions a value, against about 2 for half_pairs' scalar loads (14.3 against 8.1 G weights/s in a
// standalone loop on a Zen 4 EPYC, codes in L2). Against the kernels these layouts took before (the same EPYC, one
// thread, SmolLM2's shapes): 6-bit scalars 1.25x the general decoder, 7-8-bit scalars 3.8x its gather, 32 and 64
// pairs 1.2x the 16-bit permutes, 128 pairs 1.4x the scalar loads (docs/design.md). Several tokens take those
// kernels (the look-ups here are per row).
constexpr int64_t kPlaneStepCodes = 16;  // codes per step of each of four channels

// Bytes per plane: the 64 a byte permute reads (<= 6 bits; 5-bit tables twice), else the 2^bits entries.
int64_t plane_bytes(const Layout& l) { return std::max<int64_t>(64, int64_t(1) << l.bits); }

// Whether gemv_byte_planes reads a layout: a CPU with VBMI (int_dot_supported), scalars of 6-8-bit codes or pairs of
// 5-8-bit ones, channels and scale groups of whole steps, quads of channels (from multiples of 4) within one
// codebook. 5-bit scalars keep the float kernel's two 16-float permutes, which measured faster (11.7 against 9.7 G
// weights/s, one thread, 1536 x 576).
bool byte_plane_layout(const Layout& l) {
  const int64_t group = l.group ? l.group : l.length, step = kPlaneStepCodes * l.seg;
  const bool quads = l.rows_per_book >= l.channels || l.rows_per_book % 4 == 0;
  return int_dot_supported() && ((l.seg == 1 && l.bits >= 6) || (l.seg == 2 && l.bits >= 5)) && l.bits <= 8 &&
         l.length % step == 0 && group % step == 0 && quads;
}

// x (one row of `length`) in the order the kernel multiplies: per step of 16 codes, for each element (one for
// scalars, two for pairs) the activations of codes 0-7 and of codes 8-15, each 8 twice (two channels per F16C
// widening).
std::vector<float> byte_plane_order(const float* x, int64_t length, int64_t seg) {
  std::vector<float> out(length * 2);
  const int64_t step = kPlaneStepCodes * seg;
  for (int64_t p = 0; p < length; p += step)
    for (int64_t k = 0; k < 2 * seg; ++k)
      for (int twice = 0; twice < 2; ++twice)
        for (int j = 0; j < 8; ++j) out[2 * p + 16 * k + 8 * twice + j] = x[p + seg * (8 * (k & 1) + j) + (k >> 1)];
  return out;
}

// 16 floats: a in the low 8 lanes, b in the high 8.
ALWAYS_INLINE __m512 two_scales(float a, float b) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(a)),
                                             _mm256_castps_pd(_mm256_set1_ps(b)), 1));
}

// The 16 codes of a step of four channels (one per 128-bit lane) as bytes, each code in its low BITS bits (the bits
// above: neighbours' bits, which the look-ups ignore or the repeated tables absorb). lanes[r] points at channel r's
// 2 x BITS bytes; under 8 bits the load is masked, so a stream's last step reads nothing past its end.
template <int BITS>
ALWAYS_INLINE __m512i step_codes(const uint8_t* const lanes[4]) {
  constexpr __mmask16 kBytes = BITS == 8 ? 0xFFFF : (1u << (2 * BITS)) - 1;
  const auto lane = [&](int r) { return _mm_maskz_loadu_epi8(kBytes, lanes[r]); };
  __m512i bytes = _mm512_castsi128_si512(lane(0));
  bytes = _mm512_inserti32x4(bytes, lane(1), 1);
  bytes = _mm512_inserti32x4(bytes, lane(2), 2);
  bytes = _mm512_inserti32x4(bytes, lane(3), 3);
  if constexpr (BITS == 8) {
    return bytes;
  } else {
    // 64-bit lane q of each 128-bit lane: the BITS bytes of codes 8q .. 8q + 7; byte i then takes bits i x BITS on
    static const __m512i kSpread = [] {
      alignas(64) uint8_t index[64];
      for (int d = 0; d < 64; ++d) index[d] = uint8_t(d / 16 * 16 + (d % 16) / 8 * BITS + d % 8);
      return _mm512_load_si512(index);
    }();
    static const __m512i kShifts = [] {
      alignas(64) uint8_t shift[64];
      for (int d = 0; d < 64; ++d) shift[d] = uint8_t(d % 8 * BITS);
      return _mm512_load_si512(shift);
    }();
    return _mm512_multishift_epi64_epi8(kShifts, _mm512_permutexvar_epi8(kSpread, bytes));
  }
}

// The plane's bytes of 64 codes: t holds the plane's first 64 (<= 6 bits), 128 (7) or 256 (8) bytes.
template <int BITS>
ALWAYS_INLINE __m512i plane_lookup(const __m512i* t, __m512i codes) {
  if constexpr (BITS <= 6) {
    return _mm512_permutexvar_epi8(codes, t[0]);
  } else if constexpr (BITS == 7) {
    return _mm512_permutex2var_epi8(t[0], codes, t[1]);
  } else {
    return _mm512_mask_blend_epi8(_mm512_movepi8_mask(codes), _mm512_permutex2var_epi8(t[0], codes, t[1]),
                                  _mm512_permutex2var_epi8(t[2], codes, t[3]));
  }
}

// y[c .. c + 3] for one activation row (x in byte_plane_order); the four channels share a codebook.
template <int BITS, int SEG>
void byte_plane_rows(const Operands& o, const uint8_t* planes, const float* x, float* y, int64_t c) {
  constexpr int kPlanes = 2 * SEG, kRegs = BITS <= 6 ? 1 : BITS == 7 ? 2 : 4, kBytes = 64 * kRegs;
  constexpr int64_t kStep = kPlaneStepCodes * SEG;  // values per step of a channel
  const Layout& l = o.l;
  const int64_t group = l.group ? l.group : l.length, channel_bytes = l.segs * BITS / 8;
  const uint8_t* book = planes + (l.rows_per_book >= l.channels ? 0 : c / l.rows_per_book) * kPlanes * kBytes;
  __m512i t[kPlanes][kRegs];
  for (int q = 0; q < kPlanes; ++q)
    for (int k = 0; k < kRegs; ++k) t[q][k] = _mm512_loadu_si512(book + q * kBytes + k * 64);
  const uint8_t* src = o.codes + c * channel_bytes;
  __m512 total01 = _mm512_setzero_ps(), total23 = _mm512_setzero_ps();
  for (int64_t g0 = 0, gi = 0; g0 < l.length; g0 += group, ++gi) {
    __m512 acc01 = _mm512_setzero_ps(), acc23 = _mm512_setzero_ps();
    for (int64_t p = g0; p < g0 + group; p += kStep) {
      const uint8_t* step = src + p / SEG * BITS / 8;
      const uint8_t* const lanes[4] = {step, step + channel_bytes, step + 2 * channel_bytes, step + 3 * channel_bytes};
      const __m512i codes = step_codes<BITS>(lanes);
      __m512i b[kPlanes];
      for (int q = 0; q < kPlanes; ++q) b[q] = plane_lookup<BITS>(t[q], codes);
      for (int e = 0; e < SEG; ++e) {
        const __m512i h[2] = {_mm512_unpacklo_epi8(b[2 * e], b[2 * e + 1]),
                              _mm512_unpackhi_epi8(b[2 * e], b[2 * e + 1])};
        for (int half = 0; half < 2; ++half) {
          const __m512 xv = _mm512_loadu_ps(x + 2 * p + 16 * (2 * e + half));
          acc01 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(h[half])), xv, acc01);
          acc23 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h[half], 1)), xv, acc23);
        }
      }
    }
    total01 = _mm512_fmadd_ps(acc01, two_scales(avx512::group_scale(o, c, gi), avx512::group_scale(o, c + 1, gi)),
                              total01);
    total23 = _mm512_fmadd_ps(acc23, two_scales(avx512::group_scale(o, c + 2, gi),
                                                avx512::group_scale(o, c + 3, gi)), total23);
  }
  y[c] = _mm512_mask_reduce_add_ps(0x00FF, total01);  // the low 8 lanes hold channel c, the high 8 channel c + 1
  y[c + 1] = _mm512_mask_reduce_add_ps(0xFF00, total01);
  y[c + 2] = _mm512_mask_reduce_add_ps(0x00FF, total23);
  y[c + 3] = _mm512_mask_reduce_add_ps(0xFF00, total23);
}

template <int BITS, int SEG>
void byte_plane_quads(const Operands& o, const uint8_t* planes, const float* x, float* y, int64_t q0, int64_t q1) {
  for (int64_t c = q0; c < q1; c += 4) {
    prefetch_channels(o, c + kPrefetchPasses * 4, 4, q1);
    byte_plane_rows<BITS, SEG>(o, planes, x, y, c);
  }
}

// gemv of one activation row for layouts with byte_planes: whole quads of channels (from a multiple of 4) here, the
// channels before and after them by the general decoder (plane_x: x in byte_plane_order, x in its own order).
void gemv_byte_planes(const Operands& o, const uint8_t* planes, const float* plane_x, const float* x, float* y,
                      int64_t c0, int64_t c1) {
  const int64_t q0 = std::min(c1, (c0 + 3) / 4 * 4), q1 = std::max(q0, c1 / 4 * 4);
  if (c0 < q0) avx512::gemv(o, x, 1, y, c0, q0);
  const auto run = [&](auto bits) {
    constexpr int B = decltype(bits)::value;
    if (o.l.seg == 1) byte_plane_quads<B, 1>(o, planes, plane_x, y, q0, q1);
    else byte_plane_quads<B, 2>(o, planes, plane_x, y, q0, q1);
  };
  switch (o.l.bits) {
    case 5: run(std::integral_constant<int, 5>{}); break;
    case 6: run(std::integral_constant<int, 6>{}); break;
    case 7: run(std::integral_constant<int, 7>{}); break;
    default: run(std::integral_constant<int, 8>{}); break;
  }
  if (q1 < c1) avx512::gemv(o, x, 1, y, q1, c1);
}

}  // namespace vbmi
#pragma GCC pop_options

// Integer dot products on AVX2 for 4-bit scalar tables, chosen like the above: llama.cpp's IQ4_NL
// recipe with two activation bytes. The 16-entry table is rounded to 8-bit integers (one step per codebook) plus 128,
// one register; per unit of 32 values a byte shuffle looks up the 32 codes (low nibbles in the low 128-bit lane, high
// nibbles in the high one), `vpmaddubsw` multiplies those unsigned bytes by each activation byte and sums pairs to 16
// bits, and `vpmaddwd` sums those to 32 bits, converted to float once per unit. The pair sums saturate past 32767, so
// the activations are 14-bit integers per unit, hi * 128 + lo with |hi| <= 64 and lo in [-64, 63]; the table's
// offset of 128 is taken out once per scale group (128 times the activation integers' sum, in float). On a CPU
// without AVX-512 the float path spends a float16 conversion per 8 values on top of the shuffles.
constexpr int32_t kNibbleActMax = 64 * 128;  // activation integers in [-8192, 8192]
constexpr int64_t kNibbleBookBytes = 16;     // per codebook: 16 table bytes
static_assert(kIntUnit == avx2::kPlaneBlock, "both 4-bit kernels read x in nibble_order of 16 lanes");

bool nibble_int_layout(const Layout& l) { return active_isa() == kAvx2 && whole_nibble_blocks(l, kIntUnit); }

// The 4-bit tables as integers plus 128 (past n_clusters: 128, the value 0) and the float value of one step.
struct NibbleTables {
  std::vector<uint8_t> bytes;
  std::vector<float> step;
};

// The tables rounded to integers of one step per book (its largest magnitude / 127). With `grid_only` (no
// set_integer_dot), empty if a value is off_int_grid; otherwise the books are on their 8-bit grid, which the kernel
// then reads exactly (books_on_int_grid's test, made while rounding).
NibbleTables nibble_tables(const Operands& o, bool grid_only) {
  const Layout& l = o.l;
  const int64_t n_books = (l.channels + l.rows_per_book - 1) / l.rows_per_book;
  NibbleTables t{std::vector<uint8_t>(n_books * kNibbleBookBytes, 128), std::vector<float>(n_books, 1.0f)};
  for (int64_t b = 0; b < n_books; ++b) {
    const float* book = o.tables.data() + b * l.book_stride;
    float top = 0.0f;
    for (int64_t k = 0; k < l.n_clusters; ++k) top = std::max(top, std::fabs(book[k]));
    if (top > 0.0f) t.step[b] = top / kIntBookMax;
    const float step = t.step[b];
    for (int64_t k = 0; k < l.n_clusters; ++k) {
      const float q = std::nearbyint(book[k] / step);  // to nearest, ties to even
      if (grid_only && off_int_grid(book[k], q, step)) return {};
      t.bytes[b * kNibbleBookBytes + k] = uint8_t(int32_t(std::clamp(q, -127.0f, 127.0f)) + 128);
    }
  }
  return t;
}

// Per row and unit the activation bytes in the order of the looked-up codes (nibble_order of 16 lanes: the unit's
// even values, then its odd ones) and the activation step; per row and scale group the table offset's share of the
// sums.
struct NibbleActivations {
  std::vector<int8_t> lo, hi;
  std::vector<float> step, offset;
};

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

// 32 integers in [-128, 127] (four vectors, in order) as bytes, in order.
ALWAYS_INLINE __m256i ordered_bytes(const __m256i (&v)[4]) {
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));  // undo the in-lane packs
}

// From x in nibble_order of 16 lanes.
NibbleActivations nibble_activations(const float* x, int64_t B, const Layout& l) {
  const int64_t units = l.length / kIntUnit, units_per_group = (l.group ? l.group : l.length) / kIntUnit;
  NibbleActivations a{std::vector<int8_t>(B * l.length), std::vector<int8_t>(B * l.length),
                      std::vector<float>(B * units), std::vector<float>(B * (units / units_per_group), 0.0f)};
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i limit = _mm256_set1_epi32(kNibbleActMax), low_limit = _mm256_set1_epi32(-kNibbleActMax);
  const __m256i half_step = _mm256_set1_epi32(64);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t u = 0; u < units; ++u) {
      const float* xu = x + b * l.length + u * kIntUnit;
      __m256 v[4], amax = _mm256_setzero_ps();
      for (int k = 0; k < 4; ++k) {
        v[k] = _mm256_loadu_ps(xu + 8 * k);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[k]));
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, amax);
      const float top = *std::max_element(lanes, lanes + 8);
      const __m256 inv = _mm256_set1_ps(top > 0.0f ? kNibbleActMax / top : 0.0f);
      __m256i hi[4], lo[4], sum = _mm256_setzero_si256();
      for (int k = 0; k < 4; ++k) {  // to nearest, ties to even (the MXCSR default), clamped; q = hi * 128 + lo
        const __m256i q = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[k], inv)), limit),
                                           low_limit);
        hi[k] = _mm256_srai_epi32(_mm256_add_epi32(q, half_step), 7);
        lo[k] = _mm256_sub_epi32(q, _mm256_slli_epi32(hi[k], 7));
        sum = _mm256_add_epi32(sum, q);
      }
      const int64_t at = b * l.length + u * kIntUnit;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.hi.data() + at), ordered_bytes(hi));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.lo.data() + at), ordered_bytes(lo));
      alignas(32) int32_t sums[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(sums), sum);
      const float step = top > 0.0f ? top / kNibbleActMax : 0.0f;
      a.step[b * units + u] = step;
      a.offset[b * (units / units_per_group) + u / units_per_group] +=
          128.0f * step * float(std::accumulate(sums, sums + 8, 0));
    }
  return a;
}

// y[b, c] for R channels from c and NB activation rows from b0.
template <int NB, int R>
void int_nibble_rows(const Operands& o, const NibbleTables& t, const NibbleActivations& a, float* y, int64_t b0,
                     int64_t c) {
  const Layout& l = o.l;
  const int64_t units = l.length / kIntUnit, units_per_group = (l.group ? l.group : l.length) / kIntUnit;
  const int64_t groups = units / units_per_group;
  const __m256i shifts = _mm256_setr_epi64x(0, 0, 4, 4), low_nibble = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1), hi_weight = _mm256_set1_epi16(128);
  const uint8_t* src[R];
  __m256i table[R];
  V total[R][NB];
  for (int r = 0; r < R; ++r) {
    src[r] = o.codes + (c + r) * l.length / 2;
    const uint8_t* book = t.bytes.data() + (c + r) / l.rows_per_book * kNibbleBookBytes;
    table[r] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(book)));
    for (int b = 0; b < NB; ++b) total[r][b] = Simd::zero();
  }
  for (int64_t u0 = 0, gi = 0; u0 < units; u0 += units_per_group, ++gi) {
    V acc[R][NB];
    for (int b = 0; b < NB; ++b) {  // the table offset's share, taken out in lane 0
      const V offset = _mm256_setr_ps(-a.offset[(b0 + b) * groups + gi], 0, 0, 0, 0, 0, 0, 0);
      for (int r = 0; r < R; ++r) acc[r][b] = offset;
    }
    for (int64_t u = u0; u < u0 + units_per_group; ++u) {
      __m256i lo[NB], hi[NB];
      V step[NB];
      for (int b = 0; b < NB; ++b) {
        const int64_t at = (b0 + b) * l.length + u * kIntUnit;
        lo[b] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.lo.data() + at));
        hi[b] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.hi.data() + at));
        step[b] = Simd::set1(a.step[(b0 + b) * units + u]);
      }
      for (int r = 0; r < R; ++r) {
        const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src[r])));
        src[r] += kIntUnit / 2;
        const __m256i w = _mm256_shuffle_epi8(table[r], _mm256_and_si256(_mm256_srlv_epi64(bytes, shifts), low_nibble));
        for (int b = 0; b < NB; ++b) {
          const __m256i sum = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(w, lo[b]), ones),
                                               _mm256_madd_epi16(_mm256_maddubs_epi16(w, hi[b]), hi_weight));
          acc[r][b] = Simd::fmadd(_mm256_cvtepi32_ps(sum), step[b], acc[r][b]);
        }
      }
    }
    add_scaled_group<NB, R>(o, c, gi, acc, total);
  }
  for (int r = 0; r < R; ++r) {
    const V book_step = Simd::set1(t.step[(c + r) / l.rows_per_book]);
    for (int b = 0; b < NB; ++b) total[r][b] = _mm256_mul_ps(total[r][b], book_step);
  }
  store_sums<NB, R>(total, l.channels, y, b0, c);
}

// y[b, c] for channels c0 .. c1 - 1.
void int_nibble_dot(const Operands& o, const NibbleTables& t, const NibbleActivations& a, int64_t B, float* y,
                    int64_t c0, int64_t c1) {
  for_channel_passes(o, B, c0, c1, [&](int64_t b0, int64_t c, auto nb, auto r) {
    int_nibble_rows<decltype(nb)::value, decltype(r)::value>(o, t, a, y, b0, c);
  });
}

}  // namespace avx2
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------------------------
// Ops: pick the instruction set once per call and split rows over torch's threads.
// Activations t (..., width) as contiguous float32 (t itself when it already is): the ops take any leading shape
// and dtype, and read the rows as (numel / width, width).
at::Tensor float_rows(const at::Tensor& t, int64_t width, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "swsc_hf_cpu: ", name, " must be on the CPU");
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == width, "swsc_hf_cpu: ", name, " must be (..., ", width, "), got ",
              t.sizes());
  return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
}

// An empty float32 result (..., width) for the activations `like` (..., any).
at::Tensor float_result(const at::Tensor& like, int64_t width) {
  std::vector<int64_t> sizes(like.sizes().begin(), like.sizes().end());
  sizes.back() = width;
  return at::empty(sizes, like.options().dtype(at::kFloat));
}

// The instruction set for a layout: 4- and 8-dim vectors with tables over 32 floats run the AVX2 kernels on AVX-512
// CPUs too. Their codewords are whole 128/256-bit loads; combining them into 512-bit registers takes inserts on the
// ports the 512-bit FMAs use, and measured 1.2-1.3x slower than 256-bit registers.
int64_t kernel_isa(const Layout& l) {
  const int64_t isa = active_isa();
  return isa == kAvx512 && l.seg > 2 && (int64_t(1) << l.bits) * l.seg > 32 ? kAvx2 : isa;
}

// SIMD lanes of instruction set `isa` (0: the portable path).
int64_t simd_lanes(int64_t isa) { return isa == kAvx512 ? 16 : isa == kAvx2 ? 8 : 0; }

// Whether gemv_nibbles runs this layout on `isa`: 4-bit codes of scalar tables, channels and scale groups of whole
// blocks of two vectors.
bool nibble_layout(const Layout& l, int64_t isa) { return whole_nibble_blocks(l, 2 * simd_lanes(isa)); }

// The n values of x with each block of 2 * lanes reordered as its even values, then its odd ones (gemv_nibbles').
std::vector<float> nibble_order(const float* x, int64_t n, int64_t lanes) {
  std::vector<float> out(n);
  for (int64_t block = 0; block < n; block += 2 * lanes)
    for (int64_t i = 0; i < lanes; ++i) {
      out[block + i] = x[block + 2 * i];
      out[block + lanes + i] = x[block + 2 * i + 1];
    }
  return out;
}

// The kernel gemv runs a layout's call on, and what that kernel needs from the codebooks.
struct GemvPlan {
  enum Kernel {
    kInteger, kIntegerNibbles, kPlanes, kSixBitPlanes, kBytePlanes, kHalfPairs, kNibbles, kFloat
  } kernel;
  int64_t isa;
  std::vector<uint8_t> planes;       // kPlanes: avx2::half_planes; kSixBitPlanes: avx2::six_bit_planes;
                                     // kBytePlanes: vbmi::byte_planes
  NibbleTables tables = {};          // kIntegerNibbles: nibble_tables
  std::vector<uint32_t> pairs = {};  // kHalfPairs: avx2::half_pair_table
};

// The plan of a call with `tokens` rows of x: the VBMI byte planes serve one token (their look-ups are per row).
GemvPlan plan_gemv(const Operands& o, int64_t tokens) {
  const int64_t isa = kernel_isa(o.l);
  const bool grid_only = !integer_dot.load();
  if (int_layout(o.l) && (!grid_only || books_on_int_grid(o, o.l.n_clusters * 4))) return {GemvPlan::kInteger, isa, {}};
  if (isa == kAvx512 && tokens == 1 && vbmi::byte_plane_layout(o.l)) {
    std::vector<uint8_t> planes = byte_planes(o, vbmi::plane_bytes(o.l));
    if (!planes.empty()) return {GemvPlan::kBytePlanes, isa, std::move(planes)};
  }
  if (nibble_int_layout(o.l)) {
    NibbleTables tables = nibble_tables(o, grid_only);
    if (!tables.bytes.empty()) return {GemvPlan::kIntegerNibbles, isa, {}, std::move(tables)};
  }
  if (isa == kAvx2) {
    std::vector<uint8_t> planes = avx2::six_bit_planes(o);
    if (!planes.empty()) return {GemvPlan::kSixBitPlanes, isa, std::move(planes)};
  }
  // AVX-512 CPUs read pairs of over 64 codewords by these scalar loads too (16-bit permutes cover <= 64).
  if (isa == kAvx2 || (isa == kAvx512 && o.l.bits > 6)) {
    std::vector<uint32_t> pairs = avx2::half_pair_table(o);
    if (!pairs.empty()) return {GemvPlan::kHalfPairs, kAvx2, {}, {}, std::move(pairs)};
  }
  if (!nibble_layout(o.l, isa)) return {GemvPlan::kFloat, isa, {}};
  if (isa == kAvx2) {
    std::vector<uint8_t> planes = avx2::half_planes(o);
    if (!planes.empty()) return {GemvPlan::kPlanes, isa, std::move(planes)};
  }
  return {GemvPlan::kNibbles, isa, {}};
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebook,
                const c10::optional<at::Tensor>& scales, at::IntArrayRef layout) {
  const Operands o = make_operands(codes, codebook, scales, layout);
  const at::Tensor xf = float_rows(x, o.l.length, "x");
  at::Tensor y = float_result(x, o.l.channels);
  const int64_t B = xf.numel() / o.l.length;
  const GemvPlan plan = plan_gemv(o, B);
  const int64_t isa = plan.isa;
  float* yp = y.data_ptr<float>();
  const bool integer = plan.kernel == GemvPlan::kInteger, int_nibbles = plan.kernel == GemvPlan::kIntegerNibbles;
  const bool planes = plan.kernel == GemvPlan::kPlanes, six_bit = plan.kernel == GemvPlan::kSixBitPlanes;
  const bool nibbles = planes || int_nibbles || plan.kernel == GemvPlan::kNibbles;  // x in nibble_order
  const int64_t order_lanes = planes || int_nibbles ? avx2::kPlaneBlock / 2 : simd_lanes(isa);
  const std::vector<float> reordered =
      nibbles ? nibble_order(xf.data_ptr<float>(), xf.numel(), order_lanes)
      : six_bit ? avx2::six_bit_order(xf.data_ptr<float>(), xf.numel(), o.l.length,
                                      o.l.group ? o.l.group : o.l.length, o.l.seg)
              : std::vector<float>();
  const float* xp = nibbles || six_bit ? reordered.data() : xf.data_ptr<float>();
  const IntTables int_books = integer ? vbmi::int_tables(o) : IntTables{};
  const IntActivations int_x = integer ? vbmi::int_activations(xp, B, o.l.length) : IntActivations{};
  const NibbleActivations nibble_x = int_nibbles ? avx2::nibble_activations(xp, B, o.l) : NibbleActivations{};
  const bool byte_planes = plan.kernel == GemvPlan::kBytePlanes;
  const std::vector<float> plane_x =
      byte_planes ? vbmi::byte_plane_order(xp, o.l.length, o.l.seg) : std::vector<float>();
  at::parallel_for(0, o.l.channels, row_grain(o.l.length), [&](int64_t c0, int64_t c1) {
    if (byte_planes) vbmi::gemv_byte_planes(o, plan.planes.data(), plane_x.data(), xp, yp, c0, c1);
    else if (integer) vbmi::int_dot(o, int_books, int_x, B, yp, c0, c1);
    else if (int_nibbles) avx2::int_nibble_dot(o, plan.tables, nibble_x, B, yp, c0, c1);
    else if (planes) avx2::gemv_planes(o, plan.planes.data(), xp, B, yp, c0, c1);
    else if (six_bit) avx2::gemv_six_bit(o, plan.planes.data(), xp, B, yp, c0, c1);
    else if (plan.kernel == GemvPlan::kHalfPairs) avx2::gemv_half_pairs(o, plan.pairs.data(), xp, B, yp, c0, c1);
    else if (nibbles && isa == kAvx512) avx512::gemv_nibbles(o, xp, B, yp, c0, c1);
    else if (nibbles) avx2::gemv_nibbles(o, xp, B, yp, c0, c1);
    else if (isa == kAvx512) avx512::gemv(o, xp, B, yp, c0, c1);
    else if (isa == kAvx2) avx2::gemv(o, xp, B, yp, c0, c1);
    else gemv_portable(o, xp, B, yp, c0, c1);
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// The name of the kernel gemv runs these operands on here (within set_max_isa's cap): "integer" (AVX-512 VBMI,
// quadruples) and "integer_nibbles" (AVX2, 4-bit scalar tables) for books on their 8-bit grid or when opted in,
// "planes", "pair_planes" and "six_bit_planes" (AVX2, float16 byte planes of 4-bit scalar, 6-bit pair and 6-bit
// scalar tables), "byte_planes" (AVX-512 VBMI, one token, float16 scalars of 6-8-bit codes and pairs of 5-8-bit
// codes), "half_pairs" (float16 pairs of 5-8-bit codes, 7-8 on AVX-512), "nibbles" (4-bit codes, float permutes),
// "float" (the general decoder) or "portable".
std::string gemv_kernel(const at::Tensor& codes, const at::Tensor& codebook, const c10::optional<at::Tensor>& scales,
                        at::IntArrayRef layout) {
  const Operands o = make_operands(codes, codebook, scales, layout);
  const GemvPlan plan = plan_gemv(o, 1);
  switch (plan.kernel) {
    case GemvPlan::kInteger: return "integer";
    case GemvPlan::kIntegerNibbles: return "integer_nibbles";
    case GemvPlan::kPlanes: return "planes";
    case GemvPlan::kSixBitPlanes: return o.l.seg == 2 ? "pair_planes" : "six_bit_planes";
    case GemvPlan::kBytePlanes: return "byte_planes";
    case GemvPlan::kHalfPairs: return "half_pairs";
    case GemvPlan::kNibbles: return "nibbles";
    default: return plan.isa == kPortable ? "portable" : "float";
  }
}

at::Tensor gemv_t(const at::Tensor& u, const at::Tensor& codes, const at::Tensor& codebook,
                  const c10::optional<at::Tensor>& scales, at::IntArrayRef layout) {
  const Operands o = make_operands(codes, codebook, scales, layout);
  const at::Tensor uf = float_rows(u, o.l.channels, "u");
  at::Tensor z = float_result(u, o.l.length);
  const float* up = uf.data_ptr<float>();
  float* zp = z.data_ptr<float>();
  const int64_t B = uf.numel() / o.l.channels, isa = kernel_isa(o.l);
  const int64_t blocks = (o.l.length + kColumnBlock - 1) / kColumnBlock;
  at::parallel_for(0, blocks, row_grain(kColumnBlock * o.l.channels), [&](int64_t k0, int64_t k1) {
    if (isa == kAvx512) avx512::gemv_t(o, up, B, zp, k0, k1);
    else if (isa == kAvx2) avx2::gemv_t(o, up, B, zp, k0, k1);
    else gemv_t_portable(o, up, B, zp, k0, k1);
  });
  return u.scalar_type() == at::kFloat ? z : z.to(u.scalar_type());
}

at::Tensor dequant(const at::Tensor& codes, const at::Tensor& codebook, const c10::optional<at::Tensor>& scales,
                   at::IntArrayRef layout, int64_t start, int64_t stop) {
  const Operands o = make_operands(codes, codebook, scales, layout);
  TORCH_CHECK(0 <= start && start <= stop && stop <= o.l.channels, "swsc_hf_cpu: bad channel range");
  at::Tensor out = at::empty({stop - start, o.l.length}, at::TensorOptions().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  const int64_t isa = kernel_isa(o.l);
  at::parallel_for(start, stop, row_grain(o.l.length), [&](int64_t c0, int64_t c1) {
    if (isa == kAvx512) avx512::dequant(o, start, op, c0, c1);
    else if (isa == kAvx2) avx2::dequant(o, start, op, c0, c1);
    else dequant_portable(o, start, op, c0, c1);
  });
  return out;
}

// The tables' gradients from dL/dM (channels x length; M the channel matrix, M[c, p] = scale * book[code][p % seg]):
// for the codebooks the sum of dL/dM * scale over the values each codeword rebuilds, for the scales per group the
// sum of dL/dM * book[code]. One pass over the stream, no unpacked codes; per chunk of channels a double accumulator
// for the codebooks it touches, merged in channel order (the same result for any thread count).
std::tuple<at::Tensor, at::Tensor> table_grads(const at::Tensor& grad_m, const at::Tensor& codes,
                                               const at::Tensor& codebook, const c10::optional<at::Tensor>& scales,
                                               at::IntArrayRef layout, bool book_grad, bool scales_grad) {
  const Operands o = make_operands(codes, codebook, scales, layout);
  const Layout& l = o.l;
  TORCH_CHECK(grad_m.device().is_cpu() && grad_m.dim() == 2 && grad_m.size(0) == l.channels &&
                  grad_m.size(1) == l.length,
              "swsc_hf_cpu: grad_m must be (channels, length) = (", l.channels, ", ", l.length, "), got ",
              grad_m.sizes());
  const at::Tensor g = grad_m.to(at::kFloat).contiguous();
  const float* gp = g.data_ptr<float>();
  const int64_t n_books = (l.channels + l.rows_per_book - 1) / l.rows_per_book;
  const int64_t stride = (int64_t(1) << l.bits) * l.seg;  // every representable code: a corrupt one lands in padding
  const int64_t group = l.group ? l.group : l.length;
  const uint64_t mask = (uint64_t(1) << l.bits) - 1;
  scales_grad = scales_grad && l.group;
  const auto options = at::TensorOptions().dtype(at::kFloat);
  at::Tensor grad_scales = at::empty({scales_grad ? l.channels : 0, scales_grad ? o.n_groups : 0}, options);
  float* sp = grad_scales.data_ptr<float>();
  // Segments j of a channel add into replica j % kReplicas of the sums (and of the dot product): repeated codes
  // then do not wait on each other's read-modify-write.
  constexpr int64_t kReplicas = 4;
  std::mutex merge;
  std::map<int64_t, std::vector<double>> chunks;  // first channel -> its books' sums, kReplicas per book
  at::parallel_for(0, l.channels, row_grain(l.length), [&](int64_t c0, int64_t c1) {
    const int64_t b0 = c0 / l.rows_per_book, b1 = (c1 - 1) / l.rows_per_book + 1;
    std::vector<double> sums(book_grad ? (b1 - b0) * kReplicas * stride : 0, 0.0);
    for (int64_t c = c0; c < c1; ++c) {
      const float* table = o.table(c);
      const float* gc = gp + c * l.length;
      double* book = book_grad ? sums.data() + (c / l.rows_per_book - b0) * kReplicas * stride : nullptr;
      for (int64_t p0 = 0, gi = 0; p0 < l.length; p0 += group, ++gi) {
        const float scale = o.group_scale(c, gi);
        double dot[kReplicas] = {0.0, 0.0, 0.0, 0.0};
        const int64_t p1 = p0 + group;
        for (int64_t p = p0, n = c * l.segs + p0 / l.seg; p < p1; n += 8) {
          const uint64_t word = code_word(o, n);  // the next 8 codes
          const int64_t count = std::min<int64_t>(8, (p1 - p) / l.seg);
          for (int64_t i = 0; i < count; ++i, p += l.seg) {
            const int64_t k = int64_t((word >> (i * l.bits)) & mask) * l.seg, j = i % kReplicas;
            for (int64_t e = 0; e < l.seg; ++e) {
              if (book_grad) book[j * stride + k + e] += double(gc[p + e]) * scale;
              dot[j] += double(gc[p + e]) * table[k + e];
            }
          }
        }
        if (scales_grad) sp[c * o.n_groups + gi] = float((dot[0] + dot[1]) + (dot[2] + dot[3]));
      }
    }
    if (book_grad) {
      const std::lock_guard<std::mutex> lock(merge);
      chunks.emplace(c0, std::move(sums));
    }
  });
  at::Tensor grad_book = at::zeros({book_grad ? n_books : 0, l.n_clusters, l.seg}, options);
  if (book_grad) {
    std::vector<double> total(n_books * stride, 0.0);
    for (const auto& [c0, sums] : chunks) {
      const int64_t first = c0 / l.rows_per_book;
      for (size_t i = 0; i < sums.size(); ++i) {
        const int64_t b = int64_t(i) / (kReplicas * stride);
        total[(first + b) * stride + int64_t(i) % stride] += sums[i];
      }
    }
    float* bp = grad_book.data_ptr<float>();
    const int64_t book_size = l.n_clusters * l.seg;
    for (int64_t b = 0; b < n_books; ++b)
      for (int64_t i = 0; i < book_size; ++i) bp[b * book_size + i] = float(total[b * stride + i]);
  }
  return {grad_book, grad_scales};
}

int64_t isa() { return active_isa(); }

bool set_integer_dot(bool enabled) { return integer_dot.exchange(enabled); }

bool integer_dot_available() { return int_dot_available() || active_isa() == kAvx2; }

}  // namespace

TORCH_LIBRARY(swsc_hf_cpu, m) {
  m.def("gemv(Tensor x, Tensor codes, Tensor codebook, Tensor? scales, int[] layout) -> Tensor");
  m.def("gemv_t(Tensor u, Tensor codes, Tensor codebook, Tensor? scales, int[] layout) -> Tensor");
  m.def("dequant(Tensor codes, Tensor codebook, Tensor? scales, int[] layout, int start, int stop) -> Tensor");
  m.def("table_grads(Tensor grad_m, Tensor codes, Tensor codebook, Tensor? scales, int[] layout, bool book_grad, "
        "bool scales_grad) -> (Tensor, Tensor)");
  m.def("set_max_isa(int level) -> int");
  m.def("isa() -> int");
  m.def("set_integer_dot(bool enabled) -> bool");
  m.def("integer_dot_available() -> bool");
  m.def("gemv_kernel(Tensor codes, Tensor codebook, Tensor? scales, int[] layout) -> str");
}

TORCH_LIBRARY_IMPL(swsc_hf_cpu, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("gemv_t", &gemv_t);
  m.impl("dequant", &dequant);
  m.impl("table_grads", &table_grads);
  m.impl("gemv_kernel", &gemv_kernel);
}

TORCH_LIBRARY_IMPL(swsc_hf_cpu, CompositeExplicitAutograd, m) {
  m.impl("set_max_isa", &set_max_isa);
  m.impl("isa", &isa);
  m.impl("set_integer_dot", &set_integer_dot);
  m.impl("integer_dot_available", &integer_dot_available);
}
