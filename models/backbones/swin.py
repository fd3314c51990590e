"""Swin Transformer backbone (Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows") for detection: any input size, multi-scale masked outputs, optional gradient checkpointing.

Follows the detection variant that DINO ships (IDEA-Research/DINO `models/dino/swin_transformer.py`, itself from
Swin-Transformer-Object-Detection): the parameter and buffer names (`patch_embed.proj`, `layers.i.blocks.j.attn.qkv`,
`attn.relative_position_bias_table`, `attn.relative_position_index`, `layers.i.downsample.reduction`, `norm{i}` for
each returned stage, ...) are the reference's, so the official Swin and DINO-Swin weights load without renaming.
As in the reference, feature maps are zero-padded to the patch size, to whole windows and to even sizes before
patch merging, the padding is not masked inside attention, and a shifted window whose regions wrap around gets
-100 added to the logits between tokens of different regions.

Differences from the reference:
- Window attention runs through `F.scaled_dot_product_attention` (same math: softmax(q k^T / sqrt(d) + bias)),
  which lets PyTorch pick a fused kernel.
- Checkpointing (`use_checkpoint`) uses the non-reentrant `torch.utils.checkpoint` and only applies while
  training with autograd on; it has no effect on the state dict.
- No absolute position embedding, `frozen_stages` or `pos_drop` (the DINO builds use ape=False, frozen_stages=-1,
  drop_rate=0); `pretrain_img_size` is only the name suffix.
- Block sizes travel as forward arguments instead of `blk.H`/`blk.W` attributes.
"""
import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.backbones.resnet import check_return_interm_indices, interpolate_mask
from util.misc import NestedTensor

# Stage layout of each variant, as DINO's build_swin_transformer names them (name: size, pretraining set).
SWIN_VARIANTS = {
    'swin_T_224_1k': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    'swin_B_224_22k': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7),
    'swin_B_384_22k': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12),
    'swin_L_224_22k': dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=7),
    'swin_L_384_22k': dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),
}
SWIN_NAMES = tuple(SWIN_VARIANTS)

_SHIFT_MASK_VALUE = -100.0  # the reference's logit penalty between tokens of different shifted regions


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """(B, H, W, C) with H, W multiples of window_size -> (B * nW, window_size**2, C), windows row-major per image."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_merge(windows: Tensor, window_size: int, height: int, width: int) -> Tensor:
    """Inverse of window_partition: (B * nW, window_size**2, C) -> (B, height, width, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window_size, width // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def relative_position_index(window_size: int) -> Tensor:
    """(N, N) long, N = window_size**2: index into the (2w-1)**2 bias table of the offset between tokens i and j.

    index(i, j) = (dy + w - 1) * (2w - 1) + (dx + w - 1), with (dy, dx) = position(i) - position(j).
    """
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing='ij'))
    coords = coords.flatten(1)
    offsets = (coords[:, :, None] - coords[:, None, :]) + (window_size - 1)
    return offsets[0] * (2 * window_size - 1) + offsets[1]


def shifted_window_mask(height: int, width: int, window_size: int, shift: int, device: torch.device) -> Tensor:
    """(nW, N, N) additive mask for the cyclically shifted (height, width) map: 0 within a region, -100 across.

    After rolling by -shift, the last window row/column holds tokens from up to three regions per axis:
    [0, H - w), [H - w, H - shift) and [H - shift, H) (same for W); tokens may only attend within their region.
    """
    def region_ids(size):
        ids = torch.zeros(size, device=device)
        ids[size - window_size:] = 1
        ids[size - shift:] = 2
        return ids

    regions = region_ids(height)[:, None] * 3 + region_ids(width)[None, :]
    windows = window_partition(regions[None, :, :, None], window_size).squeeze(-1)  # nW, N
    different = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill_(different, _SHIFT_MASK_VALUE)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias.

    forward(x (B*nW, N, C), mask (nW, N, N) additive or None) -> (B*nW, N, C), N = window_size**2:
        attn = softmax(q k^T / sqrt(C / heads) + table[relative_position_index] + mask) v,  then proj.
    """

    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer('relative_position_index', relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, self.num_heads).permute(2, 0, 1)  # heads, N, N
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        else:
            num_windows = mask.shape[0]
            # Windows and heads share one axis, (B, nW*heads, N, d), so the (nW*heads, N, N) mask broadcasts over
            # the images and the attention stays 4-d (fused kernels only take 4-d inputs).
            q, k, v = (t.reshape(bw // num_windows, num_windows * self.num_heads, n, -1) for t in (q, k, v))
            attn_mask = (bias[None] + mask[:, None]).flatten(0, 1).to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).view(bw, self.num_heads, n, -1)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    """Pre-norm (shifted) window attention and MLP, each with a residual and stochastic depth.

    forward(x (B, H*W, C), height, width, shift_mask (nW, N, N) for the window-padded map) -> (B, H*W, C).
    The normalised map is zero-padded to whole windows, rolled by -shift_size (if shifted), attended per window,
    rolled back and cropped.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float,
                 drop_path: float):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f'SwinBlock: shift_size={shift_size} must be in [0, window_size={window_size})')
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, height: int, width: int, shift_mask: Tensor) -> Tensor:
        b, _, c = x.shape
        ws, shift = self.window_size, self.shift_size
        h = self.norm1(x).view(b, height, width, c)
        pad_b, pad_r = -height % ws, -width % ws
        h = F.pad(h, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = height + pad_b, width + pad_r
        if shift:
            h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2))
        windows = self.attn(window_partition(h, ws), mask=shift_mask if shift else None)
        h = window_merge(windows, ws, hp, wp)
        if shift:
            h = torch.roll(h, shifts=(shift, shift), dims=(1, 2))
        h = h[:, :height, :width].reshape(b, height * width, c)
        x = x + self.drop_path(h)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concatenation then a linear reduction: (B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 2C).

    Odd sizes are zero-padded at the bottom/right; the concatenation order is (0,0), (1,0), (0,1), (1,1).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        b, _, c = x.shape
        x = F.pad(x.view(b, height, width, c), (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.flatten(1, 2)))


class SwinStage(nn.Module):
    """`depth` blocks alternating regular and shifted windows, then an optional PatchMerging.

    forward(x (B, H*W, C), height, width) -> (stage output (B, H*W, C), next input, next height, next width);
    without downsampling the next input is the stage output.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 drop_paths: list[float], downsample: bool, use_checkpoint: bool):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else self.shift_size, mlp_ratio, drop_paths[i])
            for i in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, int, int]:
        ws = self.window_size
        shift_mask = shifted_window_mask(height + -height % ws, width + -width % ws, ws, self.shift_size, x.device)
        recompute = self.use_checkpoint and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x = checkpoint(block, x, height, width, shift_mask, use_reentrant=False)
            else:
                x = block(x, height, width, shift_mask)
        if self.downsample is None:
            return x, x, height, width
        return x, self.downsample(x, height, width), (height + 1) // 2, (width + 1) // 2


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size patches -> embed_dim, then LayerNorm: (B,3,H,W) -> (B,C,H/p,W/p).

    H and W are zero-padded at the bottom/right to multiples of patch_size first.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        x = self.proj(F.pad(x, (0, -x.shape[-1] % p, 0, -x.shape[-2] % p)))
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SwinTransformer(nn.Module):
    """Four Swin stages; returns the LayerNorm-ed maps of the stages in `out_indices`, with resized masks.

    forward(NestedTensor (B,3,H,W) + mask (B,H,W)) -> list of NestedTensor, one per index i in out_indices:
    (B, num_features[i], ceil(H/s), ceil(W/s)) with s = strides of that output, mask nearest-resized.
    num_features[i] = embed_dim * 2**i. With `dilation` the last stage is not downsampled: it runs at stride 16
    with embed_dim * 4 channels. Stochastic depth rises linearly from 0 to drop_path_rate over all blocks.
    """

    def __init__(self, embed_dim: int, depths: tuple[int, ...], num_heads: tuple[int, ...], window_size: int,
                 out_indices: list[int], patch_size: int = 4, in_chans: int = 3, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.2, dilation: bool = False, use_checkpoint: bool = False):
        super().__init__()
        num_stages = len(depths)
        if len(num_heads) != num_stages:
            raise ValueError(f'SwinTransformer: depths {depths} and num_heads {num_heads} differ in length')
        self.out_indices = list(out_indices)
        if not self.out_indices or any(not 0 <= i < num_stages for i in self.out_indices):
            raise ValueError(f'SwinTransformer: out_indices={self.out_indices} must be stage indices in '
                             f'0..{num_stages - 1}')
        self.num_features = [embed_dim * 2 ** i for i in range(num_stages)]
        downsample = [i < num_stages - 1 for i in range(num_stages)]
        stage_strides = [patch_size * 2 ** i for i in range(num_stages)]
        if dilation:
            downsample[-2] = False
            self.num_features[-1] = self.num_features[-2]
            stage_strides[-1] = stage_strides[-2]
        total = sum(depths)
        drop_paths = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            first = sum(depths[:i])
            self.layers.append(SwinStage(self.num_features[i], depths[i], num_heads[i], window_size, mlp_ratio,
                                         drop_paths[first:first + depths[i]], downsample[i], use_checkpoint))
        for i in self.out_indices:
            self.add_module(f'norm{i}', nn.LayerNorm(self.num_features[i]))
        self.num_channels = [self.num_features[i] for i in self.out_indices]
        self.strides = [stage_strides[i] for i in self.out_indices]

    def forward(self, tensor_list: NestedTensor) -> list[NestedTensor]:
        if tensor_list.mask is None:
            raise ValueError('SwinTransformer: the input NestedTensor has no mask; the padding mask is required')
        x = self.patch_embed(tensor_list.tensors)
        height, width = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        outs = []
        for i, stage in enumerate(self.layers):
            out, x, next_height, next_width = stage(x, height, width)
            if i in self.out_indices:
                out = getattr(self, f'norm{i}')(out)
                out = out.view(-1, height, width, self.num_features[i]).permute(0, 3, 1, 2).contiguous()
                outs.append(NestedTensor(out, interpolate_mask(tensor_list.mask, (height, width))))
            height, width = next_height, next_width
        return outs


def build_swin_transformer(name: str, return_interm_indices: list[int], dilation: bool = False,
                           use_checkpoint: bool = False, drop_path_rate: float = 0.2) -> SwinTransformer:
    """The DINO Swin variant `name` (one of SWIN_NAMES) returning stages `return_interm_indices`."""
    if name not in SWIN_VARIANTS:
        raise ValueError(f'build_swin_transformer: unknown name {name!r}; known: {", ".join(SWIN_NAMES)}')
    return SwinTransformer(**SWIN_VARIANTS[name], out_indices=check_return_interm_indices(return_interm_indices),
                           drop_path_rate=drop_path_rate, dilation=dilation, use_checkpoint=use_checkpoint)
