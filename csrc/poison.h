// FASTCONV_POISON_OUTPUTS=1, a debug switch the test suite sets: every floating-point tensor an
// op allocates for its kernels to write (outputs, gradients, saved statistics) is filled with NaN
// first, so an element no kernel writes shows up as NaN instead of as stale memory that may
// happen to hold the right value. Off when unset, empty or "0".
//
// Read at every allocation, not cached per process: tests switch it within one process
// (monkeypatch.setenv), and a getenv costs well under a microsecond beside an op's launch.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <limits>

namespace fastconv {

inline bool poison_outputs() {
  const char* v = std::getenv("FASTCONV_POISON_OUTPUTS");
  return v != nullptr && v[0] != '\0' && !(v[0] == '0' && v[1] == '\0');
}

// t, NaN-filled when the switch is on (on t's device and stream); integer tensors stay as they are.
inline at::Tensor poisoned(at::Tensor t) {
  if (t.is_floating_point() && t.numel() > 0 && poison_outputs()) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return t;
}

}  // namespace fastconv
