"""Multi-scale deformable attention: the op (three backends chosen at call time) and the `MSDeformAttn` layer.

Importing this package compiles nothing; the fused `cpu` / `cuda` kernels are built on first use (see `build.py`).
"""
from .ms_deform_attn_layer import MSDeformAttn
from .ms_deform_attn_func import BACKENDS, ms_deform_attn, requested_backend, resolve_backend, set_backend
from .ms_deform_attn_pytorch import ms_deform_attn_pytorch

__all__ = ['BACKENDS', 'MSDeformAttn', 'ms_deform_attn', 'ms_deform_attn_pytorch', 'requested_backend',
           'resolve_backend', 'set_backend']
