"""Test helper shared by the LoRA tests (tests/ is on sys.path through tests/conftest.py)."""
import jax


def random_b(params, seed: int, std: float = 0.5):
    """Every `lora_b` drawn from N(0, std^2) (add_lora makes them zero, which would make any adapter the base)."""
    def f(path, x):
        if path[-1].key != "lora_b":
            return x
        return jax.random.normal(jax.random.fold_in(jax.random.key(seed), x.size), x.shape, x.dtype) * std
    return jax.tree_util.tree_map_with_path(f, params)
