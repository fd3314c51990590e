// Fused multi-scale deformable attention on the CPU: forward and backward kernels (fp32, fp64).
//
// Replaces the "not implemented" CPU stub of Deformable-DETR's op (also in DINO / CAFF-DINO) with a real kernel.
// Same tensors as the reference op:
//   value               (N, S, M, D)            levels flattened row-major, one after the other
//   spatial_shapes      (L, 2) int64 (H, W)     level_start_index (L,) int64
//   sampling_locations  (N, Lq, M, L, P, 2)     (x, y) in [0, 1] over each level
//   attention_weights   (N, Lq, M, L, P)
//   output              (N, Lq, M * D)
// Bilinear sampling is grid_sample(align_corners=False, padding_mode='zeros'), as written down once for both kernels
// in ms_deform_attn_bilinear.h.
//
// Layout: D is the fastest axis of value, so each sample reads / writes whole contiguous D-vectors.
// Per (n, q, m) the kernels first compute the 4 neighbours ("taps") of all L * P points in one loop that the
// compiler vectorises over the points (fill_taps: rows, bilinear weights times attention, cell positions), then
// run the D-vector loops over the taps without branches (a neighbour outside the map reads a row of zeros).
// Forward: parallel over (n, q); each (n, q, m) sums 4 * L * P weighted rows in four accumulators. The (q, m) order
// is the fast one: the M heads of one query sample around the same pixel, so they share the value rows' cache lines
// (a head-major order measured 1.6x slower).
// Backward: parallel over (n, query chunk), in the same (q, m) order. A thread owns the n slice of grad_value for
// its chunk, so no atomics are needed; when there are fewer images than threads, the queries are split into
// chunks that accumulate into private copies of grad_value, summed at the end. grad_locations and grad_weights are
// written once per (n, q, m, l, p), from the four dot products <grad_out, neighbour row> of the point.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ms_deform_attn_bilinear.h"
#include "ms_deform_attn_checks.h"

namespace {

using msda::Sizes;

// The shared checks (ms_deform_attn_checks.h), the device, and that every level fits in value (read on the host).
Sizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK(value.device().is_cpu() && spatial_shapes.device().is_cpu() && level_start_index.device().is_cpu() &&
                  sampling_locations.device().is_cpu() && attention_weights.device().is_cpu(),
              "ms_deform_attn_cpu: all inputs must be CPU tensors");
  const Sizes sz = msda::check_inputs("ms_deform_attn_cpu", value, spatial_shapes, level_start_index,
                                      sampling_locations, attention_weights);
  TORCH_CHECK(sz.num_value < (int64_t(1) << 30), "ms_deform_attn_cpu: value's S = ", sz.num_value,
              " positions is too many (the kernel indexes rows with 32-bit integers)");
  const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
  const int64_t* starts = level_start_index.data_ptr<int64_t>();
  for (int64_t l = 0; l < sz.levels; ++l) {
    TORCH_CHECK(shapes[2 * l] > 0 && shapes[2 * l + 1] > 0 && starts[l] >= 0 &&
                    starts[l] + shapes[2 * l] * shapes[2 * l + 1] <= sz.num_value,
                "ms_deform_attn_cpu: level ", l, " of shape (", shapes[2 * l], ", ", shapes[2 * l + 1],
                ") starting at ", starts[l], " does not fit in value's S = ", sz.num_value);
  }
  return sz;
}

// Per-point level data of one (n, q, m): point i = l * P + p lies on level l. Filled once per call.
template <typename scalar_t>
struct PointLevels {
  std::vector<scalar_t> height, width;  // H_l, W_l as scalars (for the pixel coordinates)
  std::vector<int32_t> rows, cols, start;  // H_l, W_l, level_start_index[l] as integers

  PointLevels(const Sizes& sz, const int64_t* shapes, const int64_t* starts) {
    for (int64_t l = 0; l < sz.levels; ++l) {
      for (int64_t p = 0; p < sz.points; ++p) {
        height.push_back(static_cast<scalar_t>(shapes[2 * l]));
        width.push_back(static_cast<scalar_t>(shapes[2 * l + 1]));
        rows.push_back(static_cast<int32_t>(shapes[2 * l]));
        cols.push_back(static_cast<int32_t>(shapes[2 * l + 1]));
        start.push_back(static_cast<int32_t>(starts[l]));
      }
    }
  }
};

// The 4 * L * P neighbours ("taps") of the L * P points of one (n, q, m), structure-of-arrays so that fill_taps
// vectorises over the points: tap (c, i) is neighbour c of point i, in the order of msda::neighbours.
template <typename scalar_t>
struct Taps {
  std::vector<int32_t> index[4];         // row of the tap in S, -1 outside the map
  std::vector<const scalar_t*> row[4];   // its D values in value; a row of zeros outside the map
  std::vector<scalar_t> weight[4];       // attention weight * bilinear weight; 0 outside the map
  std::vector<scalar_t> lh, lw;          // fractional position of each point in its cell

  explicit Taps(int64_t points) : lh(points), lw(points) {
    for (int c = 0; c < 4; ++c) {
      index[c].resize(points);
      row[c].resize(points);
      weight[c].resize(points);
    }
  }
};

// Fills `taps` for one (n, q, m): `loc` and `attn` are its L * P locations and attention weights, `head_value` is
// value + (n * S * M + m) * D (row r of the head starts at head_value + r * M * D). The first loop is branch-free
// (the shared helpers are, and the build passes -fno-trapping-math so that floor() vectorises).
template <typename scalar_t>
inline void fill_taps(const Sizes& sz, const PointLevels<scalar_t>& levels, const scalar_t* head_value,
                      const scalar_t* loc, const scalar_t* attn, const scalar_t* zero_row, Taps<scalar_t>& taps) {
  const int64_t LP = sz.levels * sz.points, row_stride = sz.heads * sz.channels;
  const scalar_t *height = levels.height.data(), *width = levels.width.data();
  const int32_t *rows = levels.rows.data(), *cols = levels.cols.data(), *start = levels.start.data();
  int32_t *i0 = taps.index[0].data(), *i1 = taps.index[1].data(), *i2 = taps.index[2].data(),
          *i3 = taps.index[3].data();
  scalar_t *a0 = taps.weight[0].data(), *a1 = taps.weight[1].data(), *a2 = taps.weight[2].data(),
           *a3 = taps.weight[3].data(), *lh_out = taps.lh.data(), *lw_out = taps.lw.data();
#pragma omp simd
  for (int64_t i = 0; i < LP; ++i) {
    const scalar_t h = msda::pixel_coordinate(loc[2 * i + 1], height[i]);
    const scalar_t w = msda::pixel_coordinate(loc[2 * i], width[i]);
    const scalar_t h_floor = std::floor(h), w_floor = std::floor(w);
    const int32_t h0 = static_cast<int32_t>(h_floor), w0 = static_cast<int32_t>(w_floor);
    const scalar_t lh = h - h_floor, lw = w - w_floor;
    const auto cw = msda::corner_weights(lh, lw);
    const int32_t H = rows[i], W = cols[i], r = start[i] + h0 * W + w0;
    const int in0 = msda::corner_inside(h0, w0, H, W), in1 = msda::corner_inside(h0, w0 + 1, H, W);
    const int in2 = msda::corner_inside(h0 + 1, w0, H, W), in3 = msda::corner_inside(h0 + 1, w0 + 1, H, W);
    i0[i] = in0 ? r : -1;
    i1[i] = in1 ? r + 1 : -1;
    i2[i] = in2 ? r + W : -1;
    i3[i] = in3 ? r + W + 1 : -1;
    a0[i] = in0 ? attn[i] * cw.w00 : scalar_t(0);
    a1[i] = in1 ? attn[i] * cw.w01 : scalar_t(0);
    a2[i] = in2 ? attn[i] * cw.w10 : scalar_t(0);
    a3[i] = in3 ? attn[i] * cw.w11 : scalar_t(0);
    lh_out[i] = lh;
    lw_out[i] = lw;
  }
  for (int c = 0; c < 4; ++c) {
    const int32_t* index = taps.index[c].data();
    const scalar_t** row = taps.row[c].data();
#pragma omp simd
    for (int64_t i = 0; i < LP; ++i) row[i] = index[i] >= 0 ? head_value + index[i] * row_stride : zero_row;
  }
}

// kD > 0 fixes the head size at compile time (the common 32, and 16 / 64), so the D-vector loops are unrolled
// into whole SIMD registers and the accumulators live in registers; kD == 0 is the generic path for any D.
template <typename scalar_t, int kD>
void forward_kernel(const Sizes& sz, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                    const scalar_t* locations, const scalar_t* weights, scalar_t* out) {
  const int64_t M = sz.heads, LP = sz.levels * sz.points;
  const int64_t D = kD > 0 ? kD : sz.channels;
  const PointLevels<scalar_t> levels(sz, shapes, starts);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, M * LP * D));
  at::parallel_for(0, sz.batch * sz.num_query, grain, [&](int64_t begin, int64_t end) {
    Taps<scalar_t> taps(LP);
    std::vector<scalar_t> zero_row(D, scalar_t(0)), dynamic(kD > 0 ? 0 : 4 * D);
    scalar_t fixed[kD > 0 ? 4 * kD : 1];
    scalar_t* acc = kD > 0 ? fixed : dynamic.data();  // one accumulator per neighbour: 4 independent add chains
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / sz.num_query;
      for (int64_t m = 0; m < M; ++m) {
        const int64_t head = nq * M + m;  // index of (n, q, m)
        fill_taps(sz, levels, value + (n * sz.num_value * M + m) * D, locations + head * LP * 2,
                  weights + head * LP, zero_row.data(), taps);
        std::fill(acc, acc + 4 * D, scalar_t(0));
        for (int64_t i = 0; i < LP; ++i) {
          for (int c = 0; c < 4; ++c) {
            const scalar_t a = taps.weight[c][i];
            const scalar_t* __restrict__ v = taps.row[c][i];
            scalar_t* __restrict__ sum = acc + c * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) sum[d] += a * v[d];
          }
        }
        scalar_t* o = out + head * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] = (acc[d] + acc[D + d]) + (acc[2 * D + d] + acc[3 * D + d]);
      }
    }
  });
}

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define MSDA_TREE_DOTS 1
// 16 fp32 lanes (one AVX-512 register; compilers split it where the CPU has narrower ones).
typedef float Lanes16 __attribute__((vector_size(64)));

// dots[j] = the sum of the 16 lanes of part[j], for j < 16, as a tree of lane shuffles and adds: 15 vector adds for
// 16 sums, where one horizontal sum per vector costs about 8 instructions. Each level halves the lanes per sum and
// keeps the sums in order.
inline void sum_lanes16(const Lanes16* part, float* dots) {
  Lanes16 a[8], b[4], c[2];
  for (int j = 0; j < 8; ++j) {
    const Lanes16 x = part[2 * j], y = part[2 * j + 1];
    a[j] = __builtin_shufflevector(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int j = 0; j < 4; ++j) {
    const Lanes16 x = a[2 * j], y = a[2 * j + 1];
    b[j] = __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int j = 0; j < 2; ++j) {
    const Lanes16 x = b[2 * j], y = b[2 * j + 1];
    c[j] = __builtin_shufflevector(x, y, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(x, y, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  const Lanes16 r = __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
                    __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  std::memcpy(dots, &r, sizeof(r));
}
#else
#define MSDA_TREE_DOTS 0
struct Lanes16 {  // only declared: kTreeDots is false without vector extensions
  float lane[16];
};
#endif

// Whether the backward sums its dot products with sum_lanes16: fp32 with a head size that is a multiple of 16.
template <typename scalar_t, int kD>
constexpr bool kTreeDots = MSDA_TREE_DOTS && std::is_same<scalar_t, float>::value && kD > 0 && kD % 16 == 0;

// Work units are (n, query chunk) as described at the top; within a unit the order is (q, m), the forward's.
template <typename scalar_t, int kD>
void backward_kernel(const Sizes& sz, int64_t chunks, const scalar_t* value, const int64_t* shapes,
                     const int64_t* starts, const scalar_t* locations, const scalar_t* weights,
                     const scalar_t* grad_out, scalar_t* grad_value_chunks, scalar_t* grad_locations,
                     scalar_t* grad_weights) {
  const int64_t N = sz.batch, Lq = sz.num_query, M = sz.heads, LP = sz.levels * sz.points;
  const int64_t D = kD > 0 ? kD : sz.channels;
  const int64_t value_numel = N * sz.num_value * M * D;
  const int64_t per_chunk = (Lq + chunks - 1) / chunks;
  const PointLevels<scalar_t> levels(sz, shapes, starts);
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    Taps<scalar_t> taps(LP);
    // dot: <grad_out, tap row> per tap, padded to whole blocks of 16 for sum_lanes16 (the padding stays zero).
    const int64_t padded_taps = (4 * LP + 15) / 16 * 16;
    std::vector<scalar_t> zero_row(D, scalar_t(0)), scratch_row(D), dot(padded_taps), dynamic(kD > 0 ? 0 : D);
    std::vector<Lanes16> folded(kTreeDots<scalar_t, kD> ? padded_taps : 0, Lanes16{});
    scalar_t fixed[kD > 0 ? kD : 1];
    scalar_t* go = kD > 0 ? fixed : dynamic.data();  // this (n, q, m)'s grad_output, in registers if it fits
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t chunk = unit % chunks, n = unit / chunks;
      const int64_t q_end = std::min(Lq, (chunk + 1) * per_chunk);
      for (int64_t q = chunk * per_chunk; q < q_end; ++q) {
        for (int64_t m = 0; m < M; ++m) {
          const int64_t head = (n * Lq + q) * M + m;  // index of (n, q, m)
          const scalar_t* attn = weights + head * LP;
          scalar_t* head_grad = grad_value_chunks + chunk * value_numel + (n * sz.num_value * M + m) * D;
          fill_taps(sz, levels, value + (n * sz.num_value * M + m) * D, locations + head * LP * 2, attn,
                    zero_row.data(), taps);
          std::copy(grad_out + head * D, grad_out + (head + 1) * D, go);
          // dot = <grad_out, value row of the tap> (the gradient w.r.t. its bilinear weight), and the tap's share
          // of grad_value; a tap outside the map reads zeros and writes into the scratch row.
          for (int64_t i = 0; i < LP; ++i) {
            for (int c = 0; c < 4; ++c) {
              const int32_t index = taps.index[c][i];
              const scalar_t* __restrict__ v = taps.row[c][i];
              scalar_t* __restrict__ gv = index >= 0 ? head_grad + index * M * D : scratch_row.data();
              const scalar_t a = taps.weight[c][i];
              if constexpr (kTreeDots<scalar_t, kD>) {
                // Fold the D products into 16 lanes; sum_lanes16 below sums 16 taps' lanes at once.
                scalar_t lanes[16] = {0};
                for (int64_t j = 0; j < D; j += 16) {
#pragma omp simd
                  for (int k = 0; k < 16; ++k) {
                    lanes[k] += go[j + k] * v[j + k];
                    gv[j + k] += a * go[j + k];
                  }
                }
                std::memcpy(&folded[4 * i + c], lanes, sizeof(lanes));
              } else {
                scalar_t s = 0;
#pragma omp simd reduction(+ : s)
                for (int64_t d = 0; d < D; ++d) {
                  s += go[d] * v[d];
                  gv[d] += a * go[d];
                }
                dot[4 * i + c] = s;
              }
            }
          }
#if MSDA_TREE_DOTS
          if constexpr (kTreeDots<scalar_t, kD>) {
            for (int64_t t = 0; t < 4 * LP; t += 16) sum_lanes16(folded.data() + t, dot.data() + t);
          }
#endif
          scalar_t* g_loc = grad_locations + head * LP * 2;
          scalar_t* g_attn = grad_weights + head * LP;
          const scalar_t *height = levels.height.data(), *width = levels.width.data();
          const scalar_t *lh = taps.lh.data(), *lw = taps.lw.data(), *dots = dot.data();
#pragma omp simd
          for (int64_t i = 0; i < LP; ++i) {
            const auto g = msda::point_gradients(lh[i], lw[i], dots + 4 * i, attn[i], height[i], width[i]);
            g_attn[i] = g.attn;
            g_loc[2 * i] = g.x;
            g_loc[2 * i + 1] = g.y;
          }
        }
      }
    }
  });
}

at::Tensor ms_deform_attn_cpu_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights, int64_t im2col_step) {
  TORCH_CHECK(im2col_step > 0, "ms_deform_attn_cpu: im2col_step must be positive, got ", im2col_step);
  const Sizes sz = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  auto out = at::empty({sz.batch, sz.num_query, sz.heads * sz.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_forward", [&] {
    auto run = [&](auto kernel) {
      kernel(sz, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
             sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
    };
    switch (sz.channels) {
      case 16: run(forward_kernel<scalar_t, 16>); break;
      case 32: run(forward_kernel<scalar_t, 32>); break;
      case 64: run(forward_kernel<scalar_t, 64>); break;
      default: run(forward_kernel<scalar_t, 0>);
    }
  });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_cpu_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                    const at::Tensor& level_start_index,
                                                    const at::Tensor& sampling_locations,
                                                    const at::Tensor& attention_weights,
                                                    const at::Tensor& grad_output, int64_t im2col_step) {
  TORCH_CHECK(im2col_step > 0, "ms_deform_attn_cpu: im2col_step must be positive, got ", im2col_step);
  const Sizes sz = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  msda::check_grad_output("ms_deform_attn_cpu", sz, grad_output, value);
  // Split the queries only when there are fewer batch images than threads; each extra chunk costs one copy of
  // grad_value.
  const int64_t slices = sz.batch;
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(sz.num_query, (threads + slices - 1) / slices));
  auto grad_value_chunks = at::zeros({chunks, sz.batch, sz.num_value, sz.heads, sz.channels}, value.options());
  auto grad_locations = at::zeros_like(sampling_locations);
  auto grad_weights = at::zeros_like(attention_weights);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_backward", [&] {
    auto run = [&](auto kernel) {
      kernel(sz, chunks, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
             level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
             attention_weights.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
             grad_value_chunks.data_ptr<scalar_t>(), grad_locations.data_ptr<scalar_t>(),
             grad_weights.data_ptr<scalar_t>());
    };
    switch (sz.channels) {
      case 16: run(backward_kernel<scalar_t, 16>); break;
      case 32: run(backward_kernel<scalar_t, 32>); break;
      case 64: run(backward_kernel<scalar_t, 64>); break;
      default: run(backward_kernel<scalar_t, 0>);
    }
  });
  auto grad_value = chunks == 1 ? grad_value_chunks.squeeze(0) : grad_value_chunks.sum(0);
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused multi-scale deformable attention, CPU kernels (CAFF-DINO models/ops)";
  m.def("forward", &ms_deform_attn_cpu_forward, "MSDeformAttn forward (CPU)", py::arg("value"),
        py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("im2col_step"));
  m.def("backward", &ms_deform_attn_cpu_backward, "MSDeformAttn backward (CPU): grad value, locations, weights",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("grad_output"), py::arg("im2col_step"));
}
