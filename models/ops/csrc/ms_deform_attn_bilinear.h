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
// The helpers are small branch-free functions of scalars, so the CPU kernel can call them inside loops that the
// compiler vectorises over the points of a query: pixel_coordinate, corner_inside, corner_weights and
// point_gradients. neighbours() combines them for one point (what the CUDA kernel uses). Functions are `inline`
// for the C++ compiler and `__host__ __device__` for nvcc.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MSDA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MSDA_HOST_DEVICE inline
#endif

namespace msda {

// h = y * H - 0.5 (or w = x * W - 0.5) for a level `size` pixels high (wide), clamped to [-2, size + 1]: beyond one
// pixel outside the map every neighbour is outside anyway, NaN becomes -2 (outside), and the integer cast of
// floor() stays safe.
template <typename scalar_t>
MSDA_HOST_DEVICE scalar_t pixel_coordinate(scalar_t u, scalar_t size) {
  scalar_t c = u * size - scalar_t(0.5);
  c = c > scalar_t(-2) ? c : scalar_t(-2);
  return c < size + scalar_t(1) ? c : size + scalar_t(1);
}

// 1 if pixel (h, w) lies inside a height x width map, else 0 (bitwise, without branches: GCC vectorises it).
template <typename index_t>
MSDA_HOST_DEVICE int corner_inside(index_t h, index_t w, index_t height, index_t width) {
  return int(h >= 0) & int(h < height) & int(w >= 0) & int(w < width);
}

// Bilinear weights of the neighbours (h0, w0), (h0, w1), (h1, w0), (h1, w1) at fractional position (lh, lw).
template <typename scalar_t>
struct CornerWeights {
  scalar_t w00, w01, w10, w11;
};

template <typename scalar_t>
MSDA_HOST_DEVICE CornerWeights<scalar_t> corner_weights(scalar_t lh, scalar_t lw) {
  const scalar_t hh = scalar_t(1) - lh, hw = scalar_t(1) - lw;
  return {hh * hw, hh * lw, lh * hw, lh * lw};
}

// Gradients of one point's contribution attn * sum_c weight[c] * value[neighbour c] to the output.
template <typename scalar_t>
struct PointGradients {
  scalar_t attn;  // d / d attention weight
  scalar_t x, y;  // d / d sampling location
};

// dot[c] = <grad_out, value row of neighbour c> (0 for a neighbour outside the map); attn is the point's attention
// weight; (lh, lw) its fractional position; height x width the level's size.
template <typename scalar_t>
MSDA_HOST_DEVICE PointGradients<scalar_t> point_gradients(scalar_t lh, scalar_t lw, const scalar_t dot[4],
                                                          scalar_t attn, scalar_t height, scalar_t width) {
  const scalar_t hh = scalar_t(1) - lh, hw = scalar_t(1) - lw;
  // d(sample)/d(lw) and d(sample)/d(lh), then the chain rule through w = x * W - 0.5, h = y * H - 0.5.
  const scalar_t d_lw = hh * (dot[1] - dot[0]) + lh * (dot[3] - dot[2]);
  const scalar_t d_lh = hw * (dot[2] - dot[0]) + lw * (dot[3] - dot[1]);
  PointGradients<scalar_t> g;
  g.attn = hh * (hw * dot[0] + lw * dot[1]) + lh * (hw * dot[2] + lw * dot[3]);
  g.x = attn * width * d_lw;
  g.y = attn * height * d_lh;
  return g;
}

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
  const scalar_t h = pixel_coordinate(y, static_cast<scalar_t>(height));
  const scalar_t w = pixel_coordinate(x, static_cast<scalar_t>(width));
  const scalar_t h_floor = floor(h), w_floor = floor(w);
  const int64_t h0 = static_cast<int64_t>(h_floor), w0 = static_cast<int64_t>(w_floor);
  Neighbours<scalar_t> nb;
  nb.lh = h - h_floor;
  nb.lw = w - w_floor;
  const CornerWeights<scalar_t> cw = corner_weights(nb.lh, nb.lw);
  nb.weight[0] = cw.w00;
  nb.weight[1] = cw.w01;
  nb.weight[2] = cw.w10;
  nb.weight[3] = cw.w11;
  nb.any = false;
  for (int c = 0; c < 4; ++c) {
    const int64_t hc = h0 + c / 2, wc = w0 + c % 2;
    const bool inside = corner_inside(hc, wc, height, width) != 0;
    nb.row[c] = inside ? start + hc * width + wc : -1;
    nb.any = nb.any || inside;
  }
  return nb;
}

}  // namespace msda
