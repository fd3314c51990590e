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
// Forward: parallel over (n, q); each (n, q, m) accumulates its D-vector from L * P * 4 neighbours.
// Backward: parallel over (n, m, query chunk). A thread owns the (n, m) slice of grad_value for its chunk, so no
// atomics are needed; when there are fewer (n, m) pairs than threads, the queries are split into chunks that
// accumulate into private copies of grad_value, summed at the end. grad_locations and grad_weights are written
// once per (n, q, m, l, p).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "ms_deform_attn_bilinear.h"
#include "ms_deform_attn_checks.h"

namespace {

using msda::neighbours;
using msda::Sizes;

// The shared checks (ms_deform_attn_checks.h), the device, and that every level fits in value (read on the host).
Sizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK(value.device().is_cpu() && spatial_shapes.device().is_cpu() && level_start_index.device().is_cpu() &&
                  sampling_locations.device().is_cpu() && attention_weights.device().is_cpu(),
              "ms_deform_attn_cpu: all inputs must be CPU tensors");
  const Sizes sz = msda::check_inputs("ms_deform_attn_cpu", value, spatial_shapes, level_start_index,
                                      sampling_locations, attention_weights);
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

// kD > 0 fixes the head size at compile time (the common 32, and 16 / 64), so the D-vector accumulator lives in
// registers; kD == 0 is the generic path for any D.
template <typename scalar_t, int kD>
void forward_kernel(const Sizes& sz, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                    const scalar_t* locations, const scalar_t* weights, scalar_t* out) {
  const int64_t M = sz.heads, L = sz.levels, P = sz.points;
  const int64_t D = kD > 0 ? kD : sz.channels;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, M * L * P * D));
  at::parallel_for(0, sz.batch * sz.num_query, grain, [&](int64_t begin, int64_t end) {
    scalar_t fixed[kD > 0 ? kD : 1];
    std::vector<scalar_t> dynamic(kD > 0 ? 0 : D);
    scalar_t* acc = kD > 0 ? fixed : dynamic.data();
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / sz.num_query;
      for (int64_t m = 0; m < M; ++m) {
        const int64_t head = nq * M + m;  // index of (n, q, m)
        std::fill(acc, acc + D, scalar_t(0));
        const scalar_t* loc = locations + head * L * P * 2;
        const scalar_t* attn = weights + head * L * P;
        for (int64_t l = 0; l < L; ++l) {
          for (int64_t p = 0; p < P; ++p, loc += 2, ++attn) {
            const auto nb = neighbours<scalar_t>(loc[0], loc[1], shapes[2 * l], shapes[2 * l + 1], starts[l]);
            if (!nb.any) continue;
            for (int c = 0; c < 4; ++c) {
              if (nb.row[c] < 0) continue;
              const scalar_t a = *attn * nb.weight[c];
              const scalar_t* v = value + ((n * sz.num_value + nb.row[c]) * M + m) * D;
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) acc[d] += a * v[d];
            }
          }
        }
        std::copy(acc, acc + D, out + head * D);
      }
    }
  });
}

template <typename scalar_t, int kD>
void backward_kernel(const Sizes& sz, int64_t chunks, const scalar_t* value, const int64_t* shapes,
                     const int64_t* starts, const scalar_t* locations, const scalar_t* weights,
                     const scalar_t* grad_out, scalar_t* grad_value_chunks, scalar_t* grad_locations,
                     scalar_t* grad_weights) {
  const int64_t N = sz.batch, Lq = sz.num_query, M = sz.heads, L = sz.levels, P = sz.points;
  const int64_t D = kD > 0 ? kD : sz.channels;
  const int64_t value_numel = N * sz.num_value * M * D;
  const int64_t per_chunk = (Lq + chunks - 1) / chunks;
  at::parallel_for(0, N * M * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t chunk = unit % chunks;
      const int64_t m = (unit / chunks) % M;
      const int64_t n = unit / (chunks * M);
      scalar_t* grad_value = grad_value_chunks + chunk * value_numel;
      const int64_t q_end = std::min(Lq, (chunk + 1) * per_chunk);
      for (int64_t q = chunk * per_chunk; q < q_end; ++q) {
        const int64_t head = (n * Lq + q) * M + m;  // index of (n, q, m)
        const scalar_t* go = grad_out + head * D;
        const scalar_t* loc = locations + head * L * P * 2;
        const scalar_t* attn = weights + head * L * P;
        scalar_t* g_loc = grad_locations + head * L * P * 2;
        scalar_t* g_attn = grad_weights + head * L * P;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
          for (int64_t p = 0; p < P; ++p, loc += 2, g_loc += 2, ++attn, ++g_attn) {
            const auto nb = neighbours<scalar_t>(loc[0], loc[1], height, width, starts[l]);
            if (!nb.any) continue;
            // dot[c] = <grad_out, value at neighbour c>: the gradient of the sample w.r.t. its bilinear weights.
            scalar_t dot[4] = {0, 0, 0, 0};
            for (int c = 0; c < 4; ++c) {
              if (nb.row[c] < 0) continue;
              const int64_t offset = ((n * sz.num_value + nb.row[c]) * M + m) * D;
              const scalar_t* v = value + offset;
              scalar_t* gv = grad_value + offset;
              const scalar_t a = *attn * nb.weight[c];
              scalar_t s = 0;
#pragma omp simd reduction(+ : s)
              for (int64_t d = 0; d < D; ++d) {
                s += go[d] * v[d];
                gv[d] += a * go[d];
              }
              dot[c] = s;
            }
            const auto g = msda::point_gradients<scalar_t>(nb, dot, *attn, height, width);
            *g_attn = g.attn;
            g_loc[0] = g.x;
            g_loc[1] = g.y;
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
  // Split the queries only when there are fewer (n, m) slices than threads; each extra chunk costs one copy of
  // grad_value.
  const int64_t slices = sz.batch * sz.heads;
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
