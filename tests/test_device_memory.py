"""sfjax.device_memory: XLA's out-of-memory error recognised, named by phase, explained."""

from __future__ import annotations

import jax
import pytest

from sfjax import device_memory as dm

# what XLA:GPU raises: the line that matters, then pages of buffer listings
XLA_OOM = ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 34359738368 bytes.\n"
           "BufferAssignment OOM Debugging.\nBufferAssignment stats:\n"
           + "allocation 0: x\n" * 50)  # fmt: skip


def test_recognises_xla_and_torch_out_of_memory_and_nothing_else():
    assert dm.is_out_of_memory(jax.errors.JaxRuntimeError(XLA_OOM))
    assert dm.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert dm.is_out_of_memory(type("OutOfMemoryError", (RuntimeError,), {})("CUDA"))
    tpu = "RESOURCE_EXHAUSTED: Error allocating device buffer: Attempting to allocate 1.00G."
    assert dm.is_out_of_memory(jax.errors.JaxRuntimeError(tpu))
    assert dm.is_out_of_memory(jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
        "hbm. Used 20.5G of 15.48G hbm."))  # fmt: skip
    assert not dm.is_out_of_memory(jax.errors.JaxRuntimeError("INTERNAL: cuDNN failed"))
    # the same status code for what is not memory (a gRPC message over its limit)
    assert not dm.is_out_of_memory(jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Received message larger than max (5000000 vs. 4194304)"))
    assert dm.text_is_out_of_memory("job log ...\ntorch.OutOfMemoryError: CUDA out of memory.")
    assert not dm.is_out_of_memory(ValueError("memory_analysis is unavailable"))


def test_detail_is_the_line_that_says_what_did_not_fit():
    assert dm.detail(jax.errors.JaxRuntimeError(XLA_OOM)) == \
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 34359738368 bytes."  # fmt: skip
    long = dm.detail(RuntimeError("out of memory " + "x" * 500), limit=40)
    assert len(long) == 40 and long.endswith("...")
    assert dm.detail(RuntimeError("")) == ""


def test_during_names_the_innermost_place_and_passes_other_errors():
    with pytest.raises(dm.OutOfDeviceMemory) as e:
        with dm.during("phase iter0/kto_0"):
            with dm.during("the reference log-probs"):
                raise jax.errors.JaxRuntimeError(XLA_OOM)
    assert e.value.where == "the reference log-probs"
    assert str(e.value) == ("out of device memory in the reference log-probs: "
                            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                            "34359738368 bytes.")  # fmt: skip
    assert isinstance(e.value.__cause__, jax.errors.JaxRuntimeError)  # the original is kept
    with pytest.raises(ValueError, match="not memory"):
        with dm.during("phase iter0/collect"):
            raise ValueError("not memory")
    with pytest.raises(KeyboardInterrupt):
        with dm.during("phase iter0/collect"):
            raise KeyboardInterrupt


def test_advice_lists_what_keeps_results_before_what_needs_a_new_run():
    text = dm.advice([
        dm.MemoryOption("--b N", "changes results", same_results=False),
        dm.MemoryOption("--a True", "keeps them", same_results=True),
        dm.MemoryOption("--longer-a G", "keeps them too", same_results=True),
        dm.MemoryOption("python -m wrapper -- the command", "keeps them", same_results=True),
    ], width=12)  # fmt: skip
    assert text.splitlines() == [
        "To lower memory, run the same command with (the run's results stay the same up to "
        "float rounding):",
        "  --a True      keeps them",
        "  --longer-a G  keeps them too",
        "  python -m wrapper -- the command",  # longer than the column: effect below
        "                keeps them",
        "Or start a new --run-dir with (these change results):",
        "  --b N  changes results",
    ]
    assert dm.advice([dm.MemoryOption("--b N", "x", same_results=False)]).startswith(
        "To lower memory, start a new --run-dir with")


def test_advice_keeps_the_options_that_help_where_it_ran_out():
    opts = [dm.MemoryOption("--kto.remat", "x", same_results=True, applies_to="kto"),
            dm.MemoryOption("--fsdp N", "y", same_results=True)]  # fmt: skip
    assert "--kto.remat" in dm.advice(opts, "phase iter0/kto_0 (...)")
    assert "--kto.remat" not in dm.advice(opts, "phase iter0/collect (...)")
    assert "--fsdp N" in dm.advice(opts, "phase iter0/collect (...)")
    assert "--kto.remat" in dm.advice(opts)  # not known where: every option
    assert dm.advice(opts[:1], "the held-out evaluation") == ""


def test_every_cli_suggests_a_larger_gpu_pool(capsys):
    """run_cli's default advice (Reflexion, the RL baselines): JAX's GPU memory pool."""
    from experiment_scripts import experiment

    cli_common = experiment("cli_common")

    def run():
        with dm.during("the Reflexion trials"):
            raise jax.errors.JaxRuntimeError(XLA_OOM)

    with pytest.raises(SystemExit) as e:
        cli_common.run_cli(run)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.splitlines()[0] == (
        "error: out of device memory in the Reflexion trials: RESOURCE_EXHAUSTED: Out of memory "
        "while trying to allocate 34359738368 bytes.")  # fmt: skip
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=.95" in err and "--kto" not in err
    # an error of no known place still gets the advice, without a place
    with pytest.raises(SystemExit):
        cli_common.run_cli(lambda: (_ for _ in ()).throw(RuntimeError("CUDA out of memory.")))
    assert capsys.readouterr().err.startswith("error: out of device memory: CUDA out of memory.")
