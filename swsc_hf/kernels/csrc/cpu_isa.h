// The instruction set the CPU kernels use, chosen at run time and shared by every source file of the extension.
#pragma once

#include <cstdint>

namespace swsc_hf_isa {

enum Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// The best of AVX-512F+BW, AVX2+FMA+F16C and portable C++ this CPU has, capped by set_max_isa.
int64_t active_isa();

// Caps active_isa at `level` (for tests); returns the previous cap.
int64_t set_max_isa(int64_t level);

}  // namespace swsc_hf_isa
