// Input checks shared by the CPU (ms_deform_attn_cpu.cpp) and CUDA (ms_deform_attn_cuda.cu) MSDeformAttn kernels.
//
// check_inputs() validates ranks, sizes, dtypes and contiguity of the five op inputs and returns their sizes;
// check_grad_output() does the same for the backward's incoming gradient. The device checks stay in each kernel
// file (CPU tensors there, CUDA tensors on one device here), and so does the CPU-only check that every level fits
// in value (it reads spatial_shapes on the host). Every message starts with the op's name, e.g.
// "ms_deform_attn_cpu: ...". The reference kernels check only contiguity and the device.
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace msda {

// Sizes of one call: value (N, S, M, D), sampling_locations (N, Lq, M, L, P, 2).
struct Sizes {
  int64_t batch, num_value, heads, channels, num_query, levels, points;
};

inline Sizes check_inputs(const char* op, const at::Tensor& value, const at::Tensor& spatial_shapes,
                          const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                          const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, op, ": value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2, op,
              ": sampling_locations must be (N, Lq, M, L, P, 2), got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5, op, ": attention_weights must be (N, Lq, M, L, P), got ",
              attention_weights.sizes());
  TORCH_CHECK(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble, op,
              ": value must be float32 or float64 (cast fp16/bf16 to float32), got ", value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              op, ": value, sampling_locations and attention_weights must share one dtype, got ",
              value.scalar_type(), ", ", sampling_locations.scalar_type(), ", ", attention_weights.scalar_type());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong, op,
              ": spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(value.is_contiguous() && sampling_locations.is_contiguous() && attention_weights.is_contiguous() &&
                  spatial_shapes.is_contiguous() && level_start_index.is_contiguous(),
              op, ": inputs must be contiguous (call .contiguous())");
  const Sizes sz{value.size(0), value.size(1), value.size(2), value.size(3), sampling_locations.size(1),
                 sampling_locations.size(3), sampling_locations.size(4)};
  TORCH_CHECK(sampling_locations.size(0) == sz.batch && sampling_locations.size(2) == sz.heads, op,
              ": sampling_locations ", sampling_locations.sizes(), " does not match value ", value.sizes());
  TORCH_CHECK(attention_weights.sizes() == at::IntArrayRef({sz.batch, sz.num_query, sz.heads, sz.levels, sz.points}),
              op, ": attention_weights ", attention_weights.sizes(), " does not match sampling_locations ",
              sampling_locations.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == sz.levels && spatial_shapes.size(1) == 2, op,
              ": spatial_shapes must be (L, 2) with L = ", sz.levels, ", got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == sz.levels, op,
              ": level_start_index must be (L,) with L = ", sz.levels, ", got ", level_start_index.sizes());
  return sz;
}

// grad_output of the backward: contiguous (N, Lq, M * D), value's dtype and device.
inline void check_grad_output(const char* op, const Sizes& sz, const at::Tensor& grad_output,
                              const at::Tensor& value) {
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({sz.batch, sz.num_query, sz.heads * sz.channels}) &&
                  grad_output.scalar_type() == value.scalar_type() && grad_output.is_contiguous() &&
                  grad_output.device() == value.device(),
              op, ": grad_output must be a contiguous (N, Lq, M*D) tensor of value's dtype and device, got ",
              grad_output.sizes(), " ", grad_output.scalar_type(), " on ", grad_output.device());
}

}  // namespace msda
