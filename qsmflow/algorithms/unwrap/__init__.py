"""Phase unwrapping: spatial (Laplacian, region growing) and multi-echo strategies."""

from .laplacian import laplacian_kernel, laplacian_unwrap
from .multi_echo import laplacian_unwrap_echo_differences, temporal_unwrap, unwrap_multi_echo
from .region_growing import region_growing_unwrap, romeo_quality_map

__all__ = [
    "laplacian_kernel",
    "laplacian_unwrap",
    "laplacian_unwrap_echo_differences",
    "region_growing_unwrap",
    "romeo_quality_map",
    "temporal_unwrap",
    "unwrap_multi_echo",
]
