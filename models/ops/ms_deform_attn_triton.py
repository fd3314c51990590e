"""The `triton` backend of `ms_deform_attn`: forward and backward Triton kernels, with the interface of a compiled
extension (`forward(...)`, `backward(...)`, as `csrc/ms_deform_attn_cpu.cpp` exposes them).

Math (the same as the `pytorch` path, `grid_sample(align_corners=False, padding_mode='zeros')`): for query q,
head m, level l of size (H, W), point p with location (x, y) and attention weight a,

    w_im = x * W - 0.5,  h_im = y * H - 0.5,  (x0, y0) = floor((w_im, h_im)),  (lx, ly) = (w_im - x0, h_im - y0)
    sample = sum over the corners (y0 + dy, x0 + dx), dx, dy in {0, 1}, inside the map, of
             wy * wx * value_l[y0 + dy, x0 + dx, m, :]     with wx = dx ? lx : 1 - lx, wy = dy ? ly : 1 - ly
    out[n, q, m, :] = sum_{l, p} a * sample

and the backward, with g = grad_out[n, q, m, :]:

    grad_a              = <g, sample>
    grad_value[corner] += a * wy * wx * g                     (atomic: corners are shared between queries)
    grad_x              = W * a * sum_corners wy * (2 dx - 1) * <g, value[corner]>,  grad_y likewise with H.

Layout: one program per (n * M + m, block of BLOCK_Q queries); a program holds a (BLOCK_Q, BLOCK_D) tile, BLOCK_D
the head size rounded up to a power of two; queries past Lq and channels past D are masked. Levels and points are
runtime loops, so L and P do not recompile the kernels; offsets are int64. Inputs are fp32 or fp64 (the
dispatcher computes fp16 / bf16 inputs in fp32); accumulation is in the inputs' dtype.

Triton reads TRITON_INTERPRET when `triton.jit` decorates the kernels, i.e. when this module is imported (the
dispatcher imports it on the first use of the backend). With TRITON_INTERPRET=1 they run on CPU tensors through
Triton's interpreter (how the tests check them without a GPU); otherwise they need CUDA tensors, and
`compile_for_gpu` compiles them down to a cubin for a given GPU without needing one (a CPU-side check).
"""
import torch
import triton
import triton.language as tl

ROWS = 128  # default rows (query, level, point) per program: BLOCK_Q = ROWS / BLOCK_LP queries
INTERPRETED = bool(triton.knobs.runtime.interpret)  # read by triton.jit below, when this module is imported


def can_run(device: torch.device) -> bool:
    """Whether the kernels can run tensors on `device`: CUDA with a driver, or CPU when they are interpreted."""
    if device.type == 'cpu':
        return INTERPRETED
    return device.type == 'cuda' and torch.cuda.is_available()


@triton.jit
def _rows(M, Lq, LP, D, BLOCK_Q: tl.constexpr, BLOCK_LP: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (n, m) and first query q0 (from its ids); row r of its (BLOCK_Q * BLOCK_LP, BLOCK_D) tile is
    query q0 + r // BLOCK_LP and sampling point lp = r % BLOCK_LP of the L * P (level, point) pairs. Returns n, m,
    q0, the query of each row, the index of its point in the (N, Lq, M, L, P) weights, its (level, point) number,
    the row and tile masks and the channels."""
    nm = tl.program_id(0).to(tl.int64)
    n = nm // M
    m = nm % M
    q0 = tl.program_id(1).to(tl.int64) * BLOCK_Q
    r = tl.arange(0, BLOCK_Q * BLOCK_LP)
    q = q0 + r // BLOCK_LP
    lp = r % BLOCK_LP
    d = tl.arange(0, BLOCK_D)
    row_ok = (q < Lq) & (lp < LP)
    index = ((n * Lq + q) * M + m) * LP + lp
    return n, m, q0, q, index, lp, row_ok, row_ok[:, None] & (d < D)[None, :], d


@triton.jit
def _sampling_point(shapes_ptr, starts_ptr, loc_ptr, attn_ptr, index, lp, row_ok, P):
    """Per row: the level's (height, width, start), the weight a, the top-left neighbour (x0, y0) and the
    fractions (lx, ly) of the bilinear sample at w_im = x * W - 0.5, h_im = y * H - 0.5."""
    level = lp // P
    height = tl.load(shapes_ptr + 2 * level, mask=row_ok, other=0)
    width = tl.load(shapes_ptr + 2 * level + 1, mask=row_ok, other=0)
    start = tl.load(starts_ptr + level, mask=row_ok, other=0)
    x = tl.load(loc_ptr + 2 * index, mask=row_ok, other=0.0)
    y = tl.load(loc_ptr + 2 * index + 1, mask=row_ok, other=0.0)
    a = tl.load(attn_ptr + index, mask=row_ok, other=0.0)
    # Clamping keeps the int conversion in range; points beyond -1 or the size contribute 0 either way.
    w_im = tl.minimum(tl.maximum(x * width.to(x.dtype) - 0.5, -2.0), width.to(x.dtype) + 1.0)
    h_im = tl.minimum(tl.maximum(y * height.to(y.dtype) - 0.5, -2.0), height.to(y.dtype) + 1.0)
    x0f = tl.floor(w_im)
    y0f = tl.floor(h_im)
    return height, width, start, a, x0f.to(tl.int64), y0f.to(tl.int64), w_im - x0f, h_im - y0f


@triton.jit
def _corner(height, width, start, x0, y0, lx, ly, row_ok, dx: tl.constexpr, dy: tl.constexpr):
    """Neighbour (y0 + dy, x0 + dx): whether it is inside the map, its position in S (0 if outside) and its
    bilinear weights along x and y."""
    yy = y0 + dy
    xx = x0 + dx
    inside = row_ok & (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
    position = tl.where(inside, start + yy * width + xx, 0)
    wx = dx * lx + (1 - dx) * (1 - lx)
    wy = dy * ly + (1 - dy) * (1 - ly)
    return inside, position, wx, wy


@triton.jit
def _forward_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr, S, M, Lq, P, LP, D,
                    BLOCK_Q: tl.constexpr, BLOCK_LP: tl.constexpr, BLOCK_D: tl.constexpr):
    n, m, q0, _, index, lp, row_ok, tile_ok, d = _rows(M, Lq, LP, D, BLOCK_Q, BLOCK_LP, BLOCK_D)
    height, width, start, a, x0, y0, lx, ly = _sampling_point(shapes_ptr, starts_ptr, loc_ptr, attn_ptr, index,
                                                              lp, row_ok, P)
    value_rows = value_ptr + n * S * M * D + m * D + d[None, :]
    acc = tl.zeros((BLOCK_Q * BLOCK_LP, BLOCK_D), dtype=value_ptr.dtype.element_ty)
    for corner in tl.static_range(4):
        inside, position, wx, wy = _corner(height, width, start, x0, y0, lx, ly, row_ok, corner % 2, corner // 2)
        v = tl.load(value_rows + position[:, None] * M * D, mask=inside[:, None] & tile_ok, other=0.0)
        acc += (a * wy * wx)[:, None] * v
    out = tl.sum(tl.reshape(acc, (BLOCK_Q, BLOCK_LP, BLOCK_D)), axis=1)
    q_out = q0 + tl.arange(0, BLOCK_Q)
    out_ok = (q_out < Lq)[:, None] & (d < D)[None, :]
    tl.store(out_ptr + ((n * Lq + q_out) * M + m)[:, None] * D + d[None, :], out, mask=out_ok)


@triton.jit
def _backward_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr, grad_value_ptr,
                     grad_loc_ptr, grad_attn_ptr, S, M, Lq, P, LP, D, BLOCK_Q: tl.constexpr,
                     BLOCK_LP: tl.constexpr, BLOCK_D: tl.constexpr):
    n, m, q0, q, index, lp, row_ok, tile_ok, d = _rows(M, Lq, LP, D, BLOCK_Q, BLOCK_LP, BLOCK_D)
    height, width, start, a, x0, y0, lx, ly = _sampling_point(shapes_ptr, starts_ptr, loc_ptr, attn_ptr, index,
                                                              lp, row_ok, P)
    # Every row of a query reads that query's grad_out (the same D values L * P times).
    g = tl.load(grad_out_ptr + ((n * Lq + q) * M + m)[:, None] * D + d[None, :], mask=tile_ok, other=0.0)
    value_offsets = n * S * M * D + m * D + d[None, :]
    grad_a = tl.zeros((BLOCK_Q * BLOCK_LP,), dtype=a.dtype)
    grad_w_im = tl.zeros((BLOCK_Q * BLOCK_LP,), dtype=a.dtype)
    grad_h_im = tl.zeros((BLOCK_Q * BLOCK_LP,), dtype=a.dtype)
    for corner in tl.static_range(4):
        dx = corner % 2
        dy = corner // 2
        inside, position, wx, wy = _corner(height, width, start, x0, y0, lx, ly, row_ok, dx, dy)
        offsets = value_offsets + position[:, None] * M * D
        corner_ok = inside[:, None] & tile_ok
        v = tl.load(value_ptr + offsets, mask=corner_ok, other=0.0)
        dot = tl.sum(g * v, axis=1)  # <grad_out, value at this neighbour>
        grad_a += wy * wx * dot
        grad_w_im += (2 * dx - 1) * wy * a * dot
        grad_h_im += (2 * dy - 1) * wx * a * dot
        tl.atomic_add(grad_value_ptr + offsets, (a * wy * wx)[:, None] * g, mask=corner_ok)
    tl.store(grad_attn_ptr + index, grad_a, mask=row_ok)
    tl.store(grad_loc_ptr + 2 * index, grad_w_im * width.to(a.dtype), mask=row_ok)
    tl.store(grad_loc_ptr + 2 * index + 1, grad_h_im * height.to(a.dtype), mask=row_ok)


def compile_for_gpu(capability: int, dtype: torch.dtype = torch.float32, head_dim: int = 32,
                    levels_points: int = 16, block_q: int = 8) -> dict[str, int]:
    """Compile both kernels for CUDA compute capability `capability` (e.g. 80, 90) without a GPU; returns the
    cubin size in bytes of each. Needs the module imported without TRITON_INTERPRET."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if INTERPRETED:
        raise RuntimeError('compile_for_gpu: the kernels were imported under TRITON_INTERPRET=1')
    ty = {torch.float32: '*fp32', torch.float64: '*fp64'}[dtype]
    sizes = {name: 'i32' for name in ('S', 'M', 'Lq', 'P', 'LP', 'D')}
    blocks = {'BLOCK_Q': block_q, 'BLOCK_LP': triton.next_power_of_2(levels_points),
              'BLOCK_D': triton.next_power_of_2(head_dim)}
    integers = {'shapes_ptr': '*i64', 'starts_ptr': '*i64'}
    signatures = {
        'forward': (_forward_kernel, ['value_ptr', 'loc_ptr', 'attn_ptr', 'out_ptr']),
        'backward': (_backward_kernel, ['value_ptr', 'loc_ptr', 'attn_ptr', 'grad_out_ptr', 'grad_value_ptr',
                                        'grad_loc_ptr', 'grad_attn_ptr'])}
    compiled = {}
    for name, (kernel, floats) in signatures.items():
        types = {**integers, **{arg: ty for arg in floats}, **sizes, **{block: 'constexpr' for block in blocks}}
        signature = {arg: types[arg] for arg in kernel.arg_names}
        binary = triton.compile(ASTSource(kernel, signature, constexprs=blocks),
                                target=GPUTarget('cuda', capability, 32))
        compiled[name] = len(binary.asm['cubin'])
    return compiled


def _launch(value: torch.Tensor, sampling_locations: torch.Tensor, block_q: int | None):
    """Grid, runtime sizes and block sizes for one call; block_q defaults to about ROWS rows per program."""
    n, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    block_lp = triton.next_power_of_2(n_levels * n_points)
    if block_q is None:
        block_q = min(max(1, ROWS // block_lp), triton.next_power_of_2(lq))
    grid = (n * m, triton.cdiv(lq, block_q))
    sizes = (s, m, lq, n_points, n_levels * n_points, d)
    return grid, sizes, dict(BLOCK_Q=block_q, BLOCK_LP=block_lp, BLOCK_D=triton.next_power_of_2(d))


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not t.is_contiguous():
            raise RuntimeError('ms_deform_attn_triton: inputs must be contiguous')
        if not can_run(t.device):
            raise RuntimeError(f'ms_deform_attn_triton: cannot run {t.device.type} tensors (CPU tensors need '
                               'TRITON_INTERPRET=1 before this module is imported)')


def forward(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
            sampling_locations: torch.Tensor, attention_weights: torch.Tensor, im2col_step: int = 64,
            block_q: int | None = None) -> torch.Tensor:
    """(N, S, M, D) value, (L, 2) int64 (H, W), (L,) int64 starts, (N, Lq, M, L, P, 2) locations, (N, Lq, M, L, P)
    weights, all contiguous, of one float dtype -> (N, Lq, M * D). `im2col_step` is accepted and unused;
    `block_q` (a power of two) overrides the queries per program."""
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    n, _, m, d = value.shape
    out = value.new_empty(n, sampling_locations.shape[1], m * d)
    grid, sizes, blocks = _launch(value, sampling_locations, block_q)
    _forward_kernel[grid](value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out,
                          *sizes, **blocks)
    return out


def backward(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
             sampling_locations: torch.Tensor, attention_weights: torch.Tensor, grad_output: torch.Tensor,
             im2col_step: int = 64, block_q: int | None = None) -> list[torch.Tensor]:
    """The inputs of `forward` plus grad_output (N, Lq, M * D) -> [grad_value, grad_locations, grad_weights]."""
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output)
    grad_value = torch.zeros_like(value)
    grad_locations = torch.empty_like(sampling_locations)
    grad_weights = torch.empty_like(attention_weights)
    grid, sizes, blocks = _launch(value, sampling_locations, block_q)
    _backward_kernel[grid](value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                           grad_output, grad_value, grad_locations, grad_weights, *sizes, **blocks)
    return [grad_value, grad_locations, grad_weights]
