"""2 processes x 4 CPU devices on 127.0.0.1 train exactly like 1 process x 8 devices.

Each process runs jaxtx.sharding.initialize_distributed, builds a hybrid mesh (FSDP over its 4 local devices, data
parallel across the 2 processes over "DCN"), loads only its own rows of every global batch, and takes a few AdamW steps;
process 0 alone writes the result. The reference is the same script as one process with 8 devices and no DCN axis.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

WORKER = textwrap.dedent('''
    import json, os, sys
    pid, nproc, port, ndev, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_num_cpu_devices", ndev)
    from jaxtx import sharding
    sharding.initialize_distributed(f"127.0.0.1:{port}" if nproc > 1 else None, nproc, pid)
    import jax.numpy as jnp, numpy as np, optax
    from jax.experimental import multihost_utils
    from jaxtx import model as model_lib
    from jaxtx.config import load_model_config

    cfg = load_model_config("tiny", ["n_layers=2", "d_model=64", "n_heads=4", "n_kv_heads=2", "d_ff=128",
                                     "vocab_size=512"])
    model, opt = model_lib.build(cfg), optax.adamw(3e-3, weight_decay=0.1)
    mesh_cfg = sharding.MeshConfig(data=1, fsdp=4, dcn_data=2) if nproc > 1 else sharding.MeshConfig(data=2, fsdp=4)
    mesh, rules = sharding.make_mesh(mesh_cfg), sharding.rules_for(mesh_cfg)
    B, T, steps = 8, 16, 3
    dummy = jnp.zeros((B, T), jnp.int32)
    _, psh = sharding.param_shardings(model, mesh, rules, dummy)
    p = sharding.init_sharded(model, jax.random.key(0), mesh, rules, dummy)
    osh = sharding.opt_state_shardings(opt, p, psh)
    s = sharding.init_opt_state(opt, p, psh)
    bsh = sharding.batch_sharding(mesh, rules)
    lo, hi = sharding.process_rows(bsh, B)
    all_ids = np.asarray(jax.random.randint(jax.random.key(1), (steps, B, T + 1), 0, cfg.vocab_size))

    def step(p, s, x):
        def loss_fn(p):
            logits = model.apply({"params": p}, x[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    losses = []
    with sharding.use_mesh(mesh, rules):
        run = jax.jit(step, in_shardings=(psh, osh, bsh), out_shardings=(psh, osh, None))
        for i in range(steps):
            x = sharding.global_batch({"x": all_ids[i, lo:hi]}, bsh, B)["x"]  # this process's rows only
            p, s, loss = run(p, s, x)
            losses.append(float(loss))
    flat = multihost_utils.process_allgather(p, tiled=True)
    if jax.process_index() == 0:
        np.savez(out, losses=np.array(losses), rows=np.array([lo, hi]),
                 **{jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(flat)[0]})
    print("done", pid, lo, hi, losses, flush=True)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-c", WORKER, *map(str, args)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_processes_match_one(tmp_path):
    port = _free_port()
    procs = [_launch([i, 2, port, 4, tmp_path / "multi.npz"], tmp_path) for i in range(2)]
    ref = _launch([0, 1, 0, 8, tmp_path / "single.npz"], tmp_path)
    outs = [p.communicate(timeout=300)[0] for p in [*procs, ref]]
    for p, o in zip([*procs, ref], outs):
        assert p.returncode == 0, o[-3000:]
    # Each process loaded its own half of every global batch.
    assert "done 0 0 4" in outs[0] and "done 1 4 8" in outs[1], (outs[0][-300:], outs[1][-300:])
    multi, single = np.load(tmp_path / "multi.npz"), np.load(tmp_path / "single.npz")
    assert set(multi.files) == set(single.files) and len(multi.files) > 5
    np.testing.assert_allclose(multi["losses"], single["losses"], rtol=2e-5)
    assert multi["losses"][-1] < multi["losses"][0]  # it trained
    for k in single.files:
        if k not in ("losses", "rows"):
            np.testing.assert_allclose(multi[k], single[k], rtol=1e-4, atol=1e-4, err_msg=k)
