"""Rows written into a tensor in place at positions read from an index tensor: a KV cache's
update in a decode step (`index_put_(cache, [None, None, positions], values)`), as one C
call through the native launcher (runtime/extern.py `RowWrite`).

`memopt_write_rows_packed(p, s)`: p = [x, index, values]; s = [outer, size, count, row_bytes]
for x viewed as (outer, size, row) and values as (outer, count, row), all contiguous, index
`count` int64 positions along `size`. Each row is copied whole (any dtype: bytes). A
negative position counts from the end, as in ATen; one outside [-size, size) returns 2
before any row is written, and the caller runs ATen's op, which raises.
"""

from __future__ import annotations

import functools

from memopt.backends.cpp import build

SOURCE = r"""
// memopt's row writes (memopt/backends/cpp/rows.py).
#include <cstdint>
#include <cstring>

extern "C" int32_t memopt_write_rows_packed(void* const* p, const int64_t* s) {
  char* x = static_cast<char*>(p[0]);
  const int64_t* index = static_cast<const int64_t*>(p[1]);
  const char* values = static_cast<const char*>(p[2]);
  const int64_t outer = s[0], size = s[1], count = s[2], row = s[3];
  for (int64_t l = 0; l < count; ++l)
    if (index[l] < -size || index[l] >= size) return 2;
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t l = 0; l < count; ++l) {
      const int64_t at = index[l] < 0 ? index[l] + size : index[l];
      std::memcpy(x + (o * size + at) * row, values + (o * count + l) * row, row);
    }
  return 0;
}
"""


@functools.cache
def packed_address() -> int:
    """The address of `memopt_write_rows_packed` (module doc), built on first use."""
    return build.entry_address(SOURCE, "memopt_write_rows_packed")
