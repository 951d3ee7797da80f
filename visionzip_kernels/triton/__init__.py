"""Triton kernels of visionzip-kernels (placeholder of the scores branch: the Triton helper's
version of this file replaces it; it only has to fail with ImportError where triton is missing)."""

import triton  # noqa: F401
