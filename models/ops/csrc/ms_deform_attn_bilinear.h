// Bilinear sampling of one MSDeformAttn point, shared by the CPU (ms_deform_attn_cpu.cpp) and CUDA
// (ms_deform_attn_cuda.cu) kernels, so both follow one rule and one set of gradient formulas.
//
// The rule is grid_sample(align_corners=False, padding_mode='zeros'): a point (x, y) in [0, 1] over a level of
// H x W pixels sits at h = y * H - 0.5, w = x * W - 0.5 (pixel units, pixel centres at integers); its four
// neighbours (h0, w0), (h0, w1), (h1, w0), (h1, w1) with h0 = floor(h), h1 = h0 + 1 (likewise w) have the weights
// (1 - lh)(1 - lw), (1 - lh) lw, lh (1 - lw), lh lw with lh = h - h0, lw = w - w0; a neighbour outside the map
// contributes 0. (The reference kernel also skips points with h <= -1 or w <= -1 entirely; that differs from
// grid_sample only on that measure-zero boundary, where we follow grid_sample.)
//
// neighbours() returns the four rows (index into S, or -1 outside the map) and weights of a point;
// point_gradients() turns the four dot products <grad_out, value row> of a point into its gradients.
// Functions are `inline` for the C++ compiler and `__host__ __device__` for nvcc.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MSDA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MSDA_HOST_DEVICE inline
#endif

namespace msda {

// The four bilinear neighbours of one sampling point, in the order (h0, w0), (h0, w1), (h1, w0), (h1, w1).
template <typename scalar_t>
struct Neighbours {
  int64_t row[4];      // index into S of each neighbour, or -1 when it lies outside the map
  scalar_t weight[4];  // its bilinear weight
  scalar_t lh, lw;     // fractional position inside the cell
  bool any;            // whether at least one neighbour is inside the map
};

// Neighbours of the point (x, y) on the level of `height` x `width` pixels whose first row in S is `start`.
template <typename scalar_t>
MSDA_HOST_DEVICE Neighbours<scalar_t> neighbours(scalar_t x, scalar_t y, int64_t height, int64_t width,
                                                 int64_t start) {
  using std::floor;
  Neighbours<scalar_t> nb;
  nb.any = false;
  const scalar_t h = y * static_cast<scalar_t>(height) - scalar_t(0.5);
  const scalar_t w = x * static_cast<scalar_t>(width) - scalar_t(0.5);
  // Beyond one pixel outside the map every neighbour is outside; this also rejects NaN and keeps the int cast safe.
  if (!(h > scalar_t(-2) && w > scalar_t(-2) && h < static_cast<scalar_t>(height + 1) &&
        w < static_cast<scalar_t>(width + 1))) {
    return nb;
  }
  const scalar_t h_floor = floor(h);
  const scalar_t w_floor = floor(w);
  const int64_t h0 = static_cast<int64_t>(h_floor);
  const int64_t w0 = static_cast<int64_t>(w_floor);
  nb.lh = h - h_floor;
  nb.lw = w - w_floor;
  const scalar_t hh = scalar_t(1) - nb.lh;
  const scalar_t hw = scalar_t(1) - nb.lw;
  const int64_t hs[4] = {h0, h0, h0 + 1, h0 + 1};
  const int64_t ws[4] = {w0, w0 + 1, w0, w0 + 1};
  const scalar_t weights[4] = {hh * hw, hh * nb.lw, nb.lh * hw, nb.lh * nb.lw};
#ifdef __CUDACC__
#pragma unroll
#endif
  for (int c = 0; c < 4; ++c) {
    const bool inside = hs[c] >= 0 && hs[c] < height && ws[c] >= 0 && ws[c] < width;
    nb.row[c] = inside ? start + hs[c] * width + ws[c] : -1;
    nb.weight[c] = weights[c];
    nb.any = nb.any || inside;
  }
  return nb;
}

// Gradients of one point's contribution attn * sum_c weight[c] * value[row[c]] to the output.
template <typename scalar_t>
struct PointGradients {
  scalar_t attn;  // d / d attention weight
  scalar_t x, y;  // d / d sampling location
};

// dot[c] = <grad_out, value row of neighbour c> (0 for a neighbour outside the map); attn is the point's weight.
template <typename scalar_t>
MSDA_HOST_DEVICE PointGradients<scalar_t> point_gradients(const Neighbours<scalar_t>& nb, const scalar_t dot[4],
                                                          scalar_t attn, int64_t height, int64_t width) {
  const scalar_t hh = scalar_t(1) - nb.lh, hw = scalar_t(1) - nb.lw;
  // d(sample)/d(lw) and d(sample)/d(lh), then the chain rule through w = x * W - 0.5, h = y * H - 0.5.
  const scalar_t d_lw = hh * (dot[1] - dot[0]) + nb.lh * (dot[3] - dot[2]);
  const scalar_t d_lh = hw * (dot[2] - dot[0]) + nb.lw * (dot[3] - dot[1]);
  PointGradients<scalar_t> g;
  g.attn = nb.weight[0] * dot[0] + nb.weight[1] * dot[1] + nb.weight[2] * dot[2] + nb.weight[3] * dot[3];
  g.x = attn * static_cast<scalar_t>(width) * d_lw;
  g.y = attn * static_cast<scalar_t>(height) * d_lh;
  return g;
}

}  // namespace msda
