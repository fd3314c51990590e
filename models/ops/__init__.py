"""Multi-scale deformable attention: the op (four backends chosen at call time) and the `MSDeformAttn` layer.

Importing this package compiles nothing; the fused `cpu` / `cuda` kernels are built on first use (see `build.py`)
and the `triton` kernels are imported on first use.
"""
from .ms_deform_attn_func import BACKENDS, backend_from_config, ms_deform_attn, resolve_backend
from .ms_deform_attn_layer import MSDeformAttn, use_backend
from .ms_deform_attn_pytorch import ms_deform_attn_pytorch

__all__ = ['BACKENDS', 'MSDeformAttn', 'backend_from_config', 'ms_deform_attn', 'ms_deform_attn_pytorch',
           'resolve_backend', 'use_backend']
