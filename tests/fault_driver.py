"""One process of the fault-injection test (tests/test_fault_injection.py): Algorithm 1 with the
light fakes of tests/agents/test_loop.py, the api Reflector against a fake server, TensorBoard,
orbax checkpoints -- killed with SIGKILL at a chosen point, or run to the end.

    python tests/fault_driver.py RUN_DIR URL KILL      KILL: none | phase:K | write:K | ckpt:K

``phase:K`` kills after the checkpoint of the K-th phase this process runs; ``write:K`` inside
the K-th atomic file write of this process (the temporary file half written, before the rename); ``ckpt:K`` inside the K-th
orbax save (arrays and meta written and TensorBoard flushed, before orbax's finalising rename).
Resumes when RUN_DIR holds checkpoints. At the end writes RUN_DIR/final_arrays.npz.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent / "agents"))


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _counting(n: int):
    ends = [0]

    def on_phase_end(phase):
        ends[0] += 1
        if ends[0] == n:
            _die()

    return on_phase_end


def main(run_dir: str, url: str, kill: str, envs: int = 2, steps: int = 8, context: int = 1300):
    import numpy as np
    from test_loop import PCFG, FakeActor, FakeEnv, FakeFineTuner

    from sfjax import atomic
    from sfjax.agents.loop import LoopConfig, SelfFinetuningLoop
    from sfjax.agents.reflector import ApiReflectorConfig, ReflectorConfig, make_reflector
    from sfjax.agents.rfr import RfRConfig
    from sfjax.parallel import summary_writer

    kind, _, n = kill.partition(":")
    n = int(n or 0)
    if kind == "write":
        real, count = atomic.write_bytes, [0]

        def write_bytes(path, data):
            count[0] += 1
            if count[0] == n:
                tmp = Path(path).with_name(f".{Path(path).name}.killed.tmp")
                tmp.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_bytes(data[: len(data) // 2])
                _die()
            return real(path, data)

        atomic.write_bytes = write_bytes
    if kind == "ckpt":
        from orbax.checkpoint._src.path import async_path

        real_rename, count = async_path.rename, [0]

        async def rename(src, dst):
            count[0] += 1
            if count[0] == n:
                _die()
            return await real_rename(src, dst)

        async_path.rename = rename

    api = ApiReflectorConfig(
        base_url=url, model="fake-r1", api_key_env="SFJAX_FAULT_KEY", max_concurrency=2,
        timeout_s=0.5, max_retries=40, backoff_base_s=0.001, backoff_max_s=0.01,
        max_format_retries=40, context_tokens=context, max_tokens=400,
    )  # fmt: skip
    run_dir = Path(run_dir)
    ft = FakeFineTuner()
    writer = summary_writer(run_dir / "tb")
    loop = SelfFinetuningLoop(
        LoopConfig(sf_iterations=1, num_envs=envs, trajectory_steps=steps, seed=3),
        RfRConfig(kto_iterations=2, num_rollouts=2, tau=0.5), PCFG, FakeActor(ft), FakeEnv(),
        make_reflector(ReflectorConfig(backend="api", api=api), PCFG, run_dir / "cache"), ft,
        run_dir, writer=writer, progress=False,
        on_phase_end=_counting(n) if kind == "phase" else None,
    )  # fmt: skip
    loop.run(resume=loop.ckpt.latest_step() is not None)
    writer.close()
    np.savez(run_dir / "final_arrays.npz", w=np.asarray(ft.w), opt_count=np.asarray(ft.opt_count))


if __name__ == "__main__":
    main(*sys.argv[1:4])
