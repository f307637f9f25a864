"""The smoke preset end to end (shortened): real tiny Qwen3 Actor + sampler + KTO on LoRA, the
JAX RAN env and the rule reflector; summary.json, TensorBoard events, PEFT adapter; and a
kill after a phase + ``--resume`` equal to the uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from experiment_scripts import experiment  # tests/experiment_scripts.py


def _experiment():
    return experiment("sf_ranslicing")


def _short(mod, run_dir, **kw):
    s = mod.SMOKE
    return dataclasses.replace(
        s,
        run_dir=str(run_dir),
        loop=dataclasses.replace(s.loop, sf_iterations=1, num_envs=2, trajectory_steps=4),
        rfr=dataclasses.replace(s.rfr, kto_iterations=1, num_rollouts=2),
        kto=dataclasses.replace(s.kto, micro_batch_size=4),
        **kw,
    )


def _strip(summary):
    s = json.loads(json.dumps(summary))
    s.pop("timings_s")
    s.pop("actor")  # the tiny checkpoint's path, inside each run dir
    for r in s["iterations"]:
        r.pop("wall_s", None)
    return s


def _scalar_events(tb_dir):
    """(tag, step, value) of the run's TensorBoard events (tensorboard's own reader)."""
    from sfjax.baselines.report import read_scalar_events

    return read_scalar_events(tb_dir)


def _adapter(run_dir):
    from safetensors.numpy import load_file

    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_smoke_end_to_end_and_resume(tmp_path, capsys):
    mod = _experiment()
    full_dir = tmp_path / "full"
    summary = mod.run(_short(mod, full_dir), progress=False)

    # the closing summary: what ran, before/after with units, artefacts, TensorBoard
    printed = capsys.readouterr().out
    assert "=== Self-finetuning: summary ===" in printed and "bit/s/Hz" in printed
    assert "Before -> after fine-tuning" in printed
    for name in ("summary.json", "tb", "adapter", "trajectories", "checkpoints"):
        assert str(full_dir / name) in printed
    assert f"tensorboard --logdir {full_dir / 'tb'}" in printed
    # the adapter names its base model (AutoPeftModel loads it: test_adapter_loads_with_...)
    adapter_cfg = json.loads((full_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str((full_dir / "tiny_actor").resolve())

    # summary.json per the issue: iteration 0 = before fine-tuning
    on_disk = json.loads((full_dir / "summary.json").read_text())
    its = on_disk["iterations"]
    assert [r["iteration"] for r in its] == [0, 1]
    for key in ("avg_se", "reconfigurations", "violations", "utility", "parse_failures"):
        assert all(np.isfinite(r[key]) for r in its)
    assert its[0]["parse_failures"] == 0  # constrained decoding: every output parses
    assert its[0]["n_desirable"] + its[0]["n_undesirable"] > 0
    assert "rule" in on_disk["reflector"] and "no LLM" in on_disk["reflector"]
    assert np.isfinite(its[0]["kto_iterations"][0]["kto/loss"])

    # trajectories persisted with full prompts and valid actions
    traj = json.loads((full_dir / "trajectories" / "iter_0.json").read_text())
    assert len(traj) == 2 and len(traj[0]["steps"]) == 4
    assert all(1 <= s["action"] <= 12 for t in traj for s in t["steps"])
    assert "<|im_start|>assistant" in traj[0]["steps"][0]["prompt"]
    assert "utility" not in traj[0]["steps"][0]["feedback"]  # the agent never sees the reward

    # TensorBoard events with the KTO and env tags
    tags = {tag for tag, _, _ in _scalar_events(full_dir / "tb")}
    for tag in (
        "train/rewards/chosen",
        "train/rewards/rejected",
        "train/kl",
        "train/kl_unclamped",
        "train/rewards/margins",
        "kto_iter/rewards/chosen",
        "kto_iter/kl",
        "env/utility",
        "env/avg_se",
        "rfr/n_desirable",
    ):
        assert tag in tags, sorted(tags)

    # the adapter moved away from its zero-B init
    adapter = _adapter(full_dir)
    assert any(np.abs(v).max() > 0 for k, v in adapter.items() if "lora_B" in k)

    # kill after the KTO phase, resume, and compare with the uninterrupted run
    class Killed(Exception):
        pass

    def kill(phase):
        if phase.kind == "kto":
            raise Killed

    res_dir = tmp_path / "resumed"
    with pytest.raises(Killed):
        mod.run(_short(mod, res_dir), on_phase_end=kill, progress=False)
    other = _short(mod, res_dir)
    other = dataclasses.replace(other, loop=dataclasses.replace(other.loop, seed=7))
    with pytest.raises(FileExistsError, match=r"different config .*differs in: loop\.seed\)"):
        mod.run(other, progress=False)
    resumed = mod.run(_short(mod, res_dir, resume=True), progress=False)
    assert _strip(resumed) == _strip(summary)
    a, b = _adapter(full_dir), _adapter(res_dir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # a finished run with the same config is reported, not rerun (`make demo` twice)
    again = mod.run(_short(mod, res_dir), progress=False)
    assert _strip(again) == _strip(summary)


def test_cli_help_lists_presets(capsys):
    mod = _experiment()
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    out = capsys.readouterr().out
    assert "smoke" in out and "paper" in out


def test_paper_preset_needs_key_before_loading_model(tmp_path, monkeypatch):
    mod = _experiment()
    monkeypatch.delenv("DEEPSEEK_API_KEY", raising=False)
    cfg = dataclasses.replace(
        mod.PAPER,
        run_dir=str(tmp_path / "p"),
        model=dataclasses.replace(mod.PAPER.model, checkpoint=str(tmp_path / "missing")),
    )
    from sfjax.agents.reflector import ReflectorError

    with pytest.raises(ReflectorError, match="DEEPSEEK_API_KEY"):
        mod.run(cfg, progress=False)


def test_adapter_loads_with_auto_peft_model(tmp_path, tiny_checkpoint):
    """The exported adapter names its base checkpoint: AutoPeftModel needs nothing else."""
    import jax.numpy as jnp
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    from sfjax.agents.finetune import KTOFineTuner
    from sfjax.models import qwen3
    from sfjax.models.lora import LoRAConfig
    from sfjax.tokenizer import load_tokenizer
    from sfjax.train.kto import KTOConfig

    mod = _experiment()
    model = qwen3.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    ft = KTOFineTuner(model, load_tokenizer(tiny_checkpoint), KTOConfig(progress=False),
                      LoRAConfig(rank=4, alpha=8.0))  # fmt: skip
    out = tmp_path / "adapter"
    mod._save_adapter(ft, out, mod.base_model_id(tiny_checkpoint))
    auto = AutoPeftModelForCausalLM.from_pretrained(str(out))
    manual = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_checkpoint), out)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(auto(ids).logits, manual(ids).logits)
    assert mod.base_model_id("Qwen/Qwen3-4B") == "Qwen/Qwen3-4B"  # a hub id stays as it is
