"""KTOTrainer's evaluation and reference passes under a mesh (issue 10's loose end): with 4 fake
CPU devices, ``completion_logps`` and the precomputed reference table run through explicit
shardings (state by the rules, rows over (data, fsdp)) and equal the single-device values.

The device count must be set before JAX starts, so the check runs in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from sfjax import parallel
    from sfjax.models import lora, qwen3
    from sfjax.train import KTOConfig, KTOExample, KTOTrainer
    from sfjax.train.data import fixed_kl_partners

    assert jax.device_count() == 4
    ckpt = {ckpt!r}
    rng = np.random.default_rng(3)
    exs = [KTOExample(rng.integers(1, 800, 3 + i).tolist(), rng.integers(1, 800, 2 + i % 3).tolist(),
                      bool(i % 2)) for i in range(6)]
    cfg = KTOConfig(micro_batch_size=4, shuffle=False, progress=False, max_prompt_length=16,
                    max_completion_length=8)
    out = []
    for mesh in (None, parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tp=1))):
        model = qwen3.from_pretrained(ckpt, dtype=jnp.float32)
        lora.apply_lora(model, lora.LoRAConfig(rank=4))
        for _, m in lora.lora_modules(model):
            m.lora_b[...] = jnp.full(m.lora_b[...].shape, 0.02)
        trainer = KTOTrainer(model, None, cfg, mesh=mesh)
        pol, ref = trainer.completion_logps(exs)
        tok = trainer.tokenize(exs)
        table = trainer.reference_logps(tok, fixed_kl_partners(tok, 4))
        out.append((pol, ref, *table))
        if mesh is not None:
            (program, in_sh), = trainer._logps_fn[1].programs.values()
            spec = parallel.logical_to_spec(("batch",), (4,), mesh)
            assert in_sh[1].spec[0] == spec[0] != None, in_sh[1].spec
            assert len(trainer._ref_fn[1].programs) == 1
    for a, b in zip(*out):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    assert np.abs(out[0][0] - out[0][1]).max() > 1e-3  # adapters on != off
    print("SHARDED-OK")
    """
)


def test_completion_logps_and_reference_table_under_a_mesh(tiny_checkpoint):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(ckpt=str(tiny_checkpoint))],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0 and "SHARDED-OK" in proc.stdout, proc.stderr[-3000:]
