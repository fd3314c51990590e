// Multi-scale deformable attention on CUDA: forward and backward kernels (fp32, fp64), for current torch.
//
// Same tensors and sampling rule as the CPU kernel (ms_deform_attn_cpu.cpp) and Deformable-DETR's op:
//   value (N, S, M, D), spatial_shapes (L, 2) int64 (H, W), level_start_index (L,) int64,
//   sampling_locations (N, Lq, M, L, P, 2) (x, y) in [0, 1], attention_weights (N, Lq, M, L, P) -> (N, Lq, M * D)
// with grid_sample(align_corners=False, padding_mode='zeros') bilinear sampling (ms_deform_attn_bilinear.h, shared
// with the CPU kernel).
// Differences from the reference kernels: dtype dispatch through scalar_type() (the reference's value.type() no
// longer compiles on torch 2.x), the current stream and a device guard, no im2col batching (the whole batch is one
// launch; im2col_step is accepted for signature compatibility), and one thread per sampling point in the backward
// (grad_locations / grad_weights need no cross-thread reduction; grad_value uses atomics as in the reference).
// fp16 / bf16 inputs are cast to fp32 by the Python caller.
#include <torch/extension.h>

#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <vector>

#include "ms_deform_attn_bilinear.h"
#include "ms_deform_attn_checks.h"

namespace {

constexpr int kThreads = 256;

using msda::neighbours;
using msda::Sizes;

// One thread per output element (n, q, m, d); consecutive threads read consecutive channels of a value row.
template <typename scalar_t>
__global__ void forward_kernel(Sizes sz, const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts, const scalar_t* __restrict__ locations,
                               const scalar_t* __restrict__ weights, scalar_t* __restrict__ out) {
  const int64_t total = sz.batch * sz.num_query * sz.heads * sz.channels;
  const int64_t L = sz.levels, P = sz.points, M = sz.heads, D = sz.channels;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t d = i % D;
    const int64_t head = i / D;  // index of (n, q, m)
    const int64_t m = head % M;
    const int64_t n = head / (M * sz.num_query);
    const scalar_t* loc = locations + head * L * P * 2;
    const scalar_t* attn = weights + head * L * P;
    scalar_t acc = 0;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t height = shapes[2 * l], width = shapes[2 * l + 1], start = starts[l];
      for (int64_t p = 0; p < P; ++p, loc += 2, ++attn) {
        const auto nb = neighbours<scalar_t>(loc[0], loc[1], height, width, start);
        if (!nb.any) continue;
        scalar_t sample = 0;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (nb.row[c] >= 0) sample += nb.weight[c] * value[((n * sz.num_value + nb.row[c]) * M + m) * D + d];
        }
        acc += *attn * sample;
      }
    }
    out[i] = acc;
  }
}

// One thread per sampling point (n, q, m, l, p): it owns grad_locations / grad_weights of the point and adds its
// share to the four value rows with atomics.
template <typename scalar_t>
__global__ void backward_kernel(Sizes sz, const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts, const scalar_t* __restrict__ locations,
                                const scalar_t* __restrict__ weights, const scalar_t* __restrict__ grad_out,
                                scalar_t* __restrict__ grad_value, scalar_t* __restrict__ grad_locations,
                                scalar_t* __restrict__ grad_weights) {
  const int64_t L = sz.levels, P = sz.points, M = sz.heads, D = sz.channels;
  const int64_t total = sz.batch * sz.num_query * M * L * P;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t l = (i / P) % L;
    const int64_t head = i / (L * P);  // index of (n, q, m)
    const int64_t m = head % M;
    const int64_t n = head / (M * sz.num_query);
    const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
    const auto nb = neighbours<scalar_t>(locations[2 * i], locations[2 * i + 1], height, width, starts[l]);
    if (!nb.any) continue;  // the gradients of this point stay zero
    const scalar_t attn = weights[i];
    const scalar_t* go = grad_out + head * D;
    scalar_t dot[4] = {0, 0, 0, 0};
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (nb.row[c] < 0) continue;
      const int64_t offset = ((n * sz.num_value + nb.row[c]) * M + m) * D;
      const scalar_t a = attn * nb.weight[c];
      scalar_t s = 0;
      for (int64_t d = 0; d < D; ++d) {
        const scalar_t g = go[d];
        s += g * value[offset + d];
        gpuAtomicAdd(grad_value + offset + d, a * g);
      }
      dot[c] = s;
    }
    const auto g = msda::point_gradients<scalar_t>(nb.lh, nb.lw, dot, attn, static_cast<scalar_t>(height),
                                                   static_cast<scalar_t>(width));
    grad_weights[i] = g.attn;
    grad_locations[2 * i] = g.x;
    grad_locations[2 * i + 1] = g.y;
  }
}

// The shared checks (ms_deform_attn_checks.h) and the device; the level shapes live on the GPU and are not read.
Sizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const auto device = value.device();
  TORCH_CHECK(device.is_cuda() && spatial_shapes.device() == device && level_start_index.device() == device &&
                  sampling_locations.device() == device && attention_weights.device() == device,
              "ms_deform_attn_cuda: all inputs must be CUDA tensors on one device");
  return msda::check_inputs("ms_deform_attn_cuda", value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights);
}

int blocks_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65535LL * 32)));
}

at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights, int64_t im2col_step) {
  TORCH_CHECK(im2col_step > 0, "ms_deform_attn_cuda: im2col_step must be positive, got ", im2col_step);
  const Sizes sz = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  auto out = at::empty({sz.batch, sz.num_query, sz.heads * sz.channels}, value.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cuda_forward", [&] {
    forward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        sz, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
        sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_cuda_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_locations,
                                                     const at::Tensor& attention_weights,
                                                     const at::Tensor& grad_output, int64_t im2col_step) {
  TORCH_CHECK(im2col_step > 0, "ms_deform_attn_cuda: im2col_step must be positive, got ", im2col_step);
  const Sizes sz = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  msda::check_grad_output("ms_deform_attn_cuda", sz, grad_output, value);
  const c10::cuda::CUDAGuard guard(value.device());
  auto grad_value = at::zeros_like(value);
  auto grad_locations = at::zeros_like(sampling_locations);
  auto grad_weights = at::zeros_like(attention_weights);
  const int64_t total = attention_weights.numel();
  if (total == 0 || sz.channels == 0) return {grad_value, grad_locations, grad_weights};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cuda_backward", [&] {
    backward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        sz, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
        sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(),
        grad_output.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(), grad_locations.data_ptr<scalar_t>(),
        grad_weights.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Multi-scale deformable attention, CUDA kernels (CAFF-DINO models/ops)";
  m.def("forward", &ms_deform_attn_cuda_forward, "MSDeformAttn forward (CUDA)", py::arg("value"),
        py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("im2col_step"));
  m.def("backward", &ms_deform_attn_cuda_backward, "MSDeformAttn backward (CUDA): grad value, locations, weights",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("grad_output"), py::arg("im2col_step"));
}
