"""Test-wide JAX setup. Must run before anything initializes a JAX backend.

- JAX_PLATFORMS=cpu: with libtpu installed, jax would otherwise probe for a TPU on every import (slow, noisy).
- 8 fake CPU devices so mesh tests can build data/fsdp/tensor/expert meshes; single-device tests are unaffected
  (un-sharded jit runs on device 0).
- No persistent compilation cache: with it, a full `-n 2` run crashed a worker inside jax's compilation_cache twice
  in a row (a segfault reading and an abort writing the executable of the BERT/T5 train step in
  test_objectives::test_loss_falls; the test passes alone; `jaxtx train` run in-process by earlier tests had
  switched on its shared ~/.cache/jaxtx-jit). A cold run measured 17.5 min, within the CI budget.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAXTX_COMPILATION_CACHE"] = "off"  # in-process `jaxtx train` calls must not switch the cache on either

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop each module's compiled programs when it ends. A worker that kept every executable of ~900 tests aborted
    inside XLA's compiler late in three full `-n 2` runs (no message; at ~90% of the run), consistent with the
    process running out of memory mappings (vm.max_map_count 65530 here; .ci/run raises it where it can)."""
    yield
    jax.clear_caches()
    gc.collect()
