"""Test-wide JAX setup. Must run before anything initializes a JAX backend.

- JAX_PLATFORMS=cpu: with libtpu installed, jax would otherwise probe for a TPU on every import (slow, noisy).
- 8 fake CPU devices so mesh tests can build data/fsdp/tensor/expert meshes; single-device tests are unaffected
  (un-sharded jit runs on device 0).
- A persistent compilation cache makes the second run of the suite much faster. One folder per xdist worker: two
  workers compiling the same program at once had one read the other's half-written entry (a segfault inside
  jax's compilation_cache.get_executable_and_time, seen once in a full `-n 2` run).
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
_worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
jax.config.update("jax_compilation_cache_dir", os.path.expanduser(f"~/.cache/jaxtx-test-jit/{_worker}"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
