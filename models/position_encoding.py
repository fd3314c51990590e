"""Sine position encoding of a padded feature map, with separate temperatures for rows and columns.

Follows DINO's `PositionEmbeddingSineHW` (IDEA-Research/DINO `models/dino/position_encoding.py`), which generalises
DETR's `PositionEmbeddingSine` to two temperatures; the numbers are the same as the reference. Only the normalised
variant is offered (the reference builds it with `normalize=True` for every config); the learned variant is not
used by any DINO/CAFF-DINO config and is left out. The temperatures are spelled `pe_temperatureH/W` as the config
keys (DINO's class says `temperatureH/W`). The frequencies are computed once per (width, temperature,
device), and each sin/cos pair shares one division (DETR divides by the same value twice): same values.
"""
import math

import torch
from torch import Tensor, nn

from util.misc import NestedTensor

from .fused_layers import tracing
from .utils import interleaved_sin_cos, sine_frequencies


class PositionEmbeddingSineHW(nn.Module):
    """Sine/cosine encoding of the (y, x) position of every unpadded pixel; no parameters.

    With m the (B, H, W) padding mask (True on padding), the positions count the unpadded pixels:

        y = cumsum_rows(~m),  x = cumsum_cols(~m)                   (1 at the first image pixel)
        y <- y / (y[last row] + 1e-6) * scale,  x <- x / (x[last col] + 1e-6) * scale     (normalize)

    and for k = 0 .. F-1 (F = num_pos_feats), with T the row (H) or column (W) temperature,

        pos_x[..., k] = sin(x / T^(2*floor(k/2)/F))  if k even,  cos(...)  if k odd     (interleaved)

    The output is cat(pos_y, pos_x) on the channel axis: (B, 2F, H, W) float32. Padded pixels keep the count
    of the last image pixel before them; in a column (row) that is all padding the count is 0, and the eps
    keeps y (x) at 0 there instead of dividing by zero.
    """

    def __init__(self, num_pos_feats: int = 128, pe_temperatureH: float = 20, pe_temperatureW: float = 20,
                 normalize: bool = True, scale: float | None = None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError('PositionEmbeddingSineHW: `scale` is only used with normalize=True; '
                             'pass normalize=True or drop scale')
        self.num_pos_feats = num_pos_feats
        self.pe_temperatureH = pe_temperatureH
        self.pe_temperatureW = pe_temperatureW
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def _encode(self, embed: Tensor, temperature: float) -> Tensor:
        """(B, H, W) positions -> (B, H, W, F) interleaved sin/cos features."""
        freqs = sine_frequencies(self.num_pos_feats, temperature, embed.device, cached=not tracing(embed))
        return interleaved_sin_cos(embed[..., None] / freqs)

    def forward(self, tensor_list: NestedTensor) -> Tensor:
        """tensor_list.mask (B, H, W) bool, True on padding -> (B, 2*num_pos_feats, H, W) float32."""
        mask = tensor_list.mask
        if mask is None:
            raise ValueError('PositionEmbeddingSineHW: the NestedTensor has no mask; build it with '
                             'util.misc.nested_tensor_from_tensor_list or pass an all-False mask')
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        pos_y = self._encode(y_embed, self.pe_temperatureH)
        pos_x = self._encode(x_embed, self.pe_temperatureW)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f'num_pos_feats={self.num_pos_feats}, pe_temperatureH={self.pe_temperatureH}, '
                f'pe_temperatureW={self.pe_temperatureW}, normalize={self.normalize}, scale={self.scale:.4f}')
