"""Weights stored narrow: the formats, as the precision pass stores them and kernels read them.

`quantize` turns a float weight matrix W (N, K), one row per output channel, into a
`QuantizedWeight`:

- "int8": symmetric, one scale per row: `q = round(W / s)`, `s = max|W[n]| / 127`, so
  `|W - dequantize(q)| <= s / 2` element by element;
- "int4": symmetric, one scale per group of `group` consecutive elements of a row (the
  last group shorter when `group` does not divide the row), `s = max|group| / 7`, values in
  [-7, 7] stored as nibbles `q + 8`, two to a byte: a group of L elements is L / 2 bytes,
  element j in the low nibble of byte j for j < L/2, in the high nibble of byte j - L/2
  otherwise (two contiguous runs of x meet the two nibbles: no shuffles in a kernel);
  error at most `s / 2`;
- "bf16": the weight rounded to bfloat16 (error at most 2^-8 relative);
- "fp8_e4m3": float8 e4m3 (3 mantissa bits) with one scale per row mapping the row's
  max to 448, the format's largest value (error at most 2^-4 relative, more for values
  below its normal range). For GPUs: only the Triton kernel reads it.

Each backend multiplies by them with its own kernel (`Backend.quantized_matmul`: the C++
GEMV, the Triton tile loop, the reference's dequantize-then-mm), which reads these bytes;
the GEMV and the Triton loop widen them in registers, never writing a float32 copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("int8", "int4", "bf16", "fp8_e4m3")
# The largest finite float8_e4m3fn value: a row's max maps to it.
FP8_E4M3_MAX = 448.0
# Formats whose values are integers times a scale per row (dequantized the same way).
_ROW_SCALED = ("int8", "fp8_e4m3")


@dataclass(frozen=True)
class QuantizedWeight:
    """W (N, K) stored narrow: `data` and `scale` as the kernels read them (module doc)."""

    kind: str
    rows: int
    cols: int
    data: torch.Tensor
    scale: torch.Tensor | None
    group: int = 0

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (self.scale.nbytes if self.scale is not None else 0)

    @property
    def row_nbytes(self) -> int:
        return self.nbytes // self.rows

    def dequantize(self) -> torch.Tensor:
        """W as float32 (N, K): the reference the kernels are tested against."""
        return self._widen(self.data, self.scale)

    def gather_rows(self, index: torch.Tensor, wraps: bool = True) -> torch.Tensor:
        """Rows `index` of W as float32, shaped `index.shape + (K,)`: an embedding lookup. A
        negative index counts from the end where `wraps` (indexing's rule), else raises
        IndexError as `index_select` and `embedding` do; one past the end raises."""
        flat = index.reshape(-1)
        if not wraps and flat.numel() and int(flat.min()) < 0:
            raise IndexError(f"index {int(flat.min())} is out of range for {self.rows} rows")
        scale = None if self.scale is None else self.scale[flat]
        return self._widen(self.data[flat], scale).view(*index.shape, self.cols)

    def _widen(self, data: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """Stored rows (and their scales) as float32 rows."""
        if self.kind == "bf16":
            return data.float()
        if self.kind in _ROW_SCALED:
            return data.float() * scale[:, None]
        return unpack_int4(data, self.group) * _per_element(scale, self.cols, self.group)


def quantize(weight: torch.Tensor, kind: str, group: int = 128) -> QuantizedWeight:
    """`weight` (N, K), float, as `kind` (module doc). ValueError for a shape `kind` cannot
    store: int4 needs an even K and an even `group` (the last group is shorter when `group`
    does not divide K)."""
    if kind not in KINDS:
        raise ValueError(f"unknown weight format {kind!r}; formats: {', '.join(KINDS)}")
    w = weight.detach().float().contiguous()
    rows, cols = w.shape
    if kind == "bf16":
        return QuantizedWeight(kind, rows, cols, w.to(torch.bfloat16), None)
    if kind == "fp8_e4m3":
        scale = _scale(w, FP8_E4M3_MAX)
        data = (w / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
        return QuantizedWeight(kind, rows, cols, data, scale[:, 0].contiguous())
    if kind == "int8":
        scale = _scale(w, 127)
        q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight(kind, rows, cols, q, scale[:, 0].contiguous())
    if group % 2 or cols % 2:
        raise ValueError(f"int4 needs an even group and an even row length, got {group} and {cols}")
    q_parts, scale_parts = [], []
    for start in range(0, cols, group):
        part = w[:, start : start + group]
        scale = _scale(part, 7)
        q = (torch.round(part / scale).clamp(-7, 7) + 8).to(torch.uint8)
        half = part.shape[1] // 2
        q_parts.append(q[:, :half] | (q[:, half:] << 4))
        scale_parts.append(scale)
    packed = torch.cat(q_parts, dim=1).contiguous()
    return QuantizedWeight(
        kind, rows, cols, packed, torch.cat(scale_parts, dim=1).contiguous(), group
    )


def _scale(w: torch.Tensor, top: float) -> torch.Tensor:
    """Each row's scale (R, 1): its largest magnitude maps to `top` (an all-zero row: the
    smallest normal float, so nothing divides by zero)."""
    return w.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / top


def unpack_int4(packed: torch.Tensor, group: int) -> torch.Tensor:
    """Packed int4 rows (R, K/2) as float values, (R, K): nibble - 8, in [-8, 7] (quantize
    stores [-7, 7])."""
    rows, cols = packed.shape[0], 2 * packed.shape[1]
    whole = cols // group * group  # the elements of the whole groups, then a shorter one
    b = packed.to(torch.int32)
    # Every whole group at once (a Python loop over groups cost 65 us for one 512-wide row,
    # an int4 embedding lookup: 8 us now).
    groups = b[:, : whole // 2].reshape(rows, whole // group, group // 2)
    parts = [torch.cat(((groups & 15) - 8, (groups >> 4) - 8), dim=2).reshape(rows, whole)]
    if whole < cols:
        last = b[:, whole // 2 :]
        parts += [(last & 15) - 8, (last >> 4) - 8]
    return torch.cat(parts, dim=1).float()


def _per_element(scale: torch.Tensor, cols: int, group: int) -> torch.Tensor:
    """Group scales (R, groups) repeated over their groups' elements: (R, cols)."""
    return scale.repeat_interleave(group, dim=1)[:, :cols]
