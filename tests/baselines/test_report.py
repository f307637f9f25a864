"""Table III writer, figures and the TensorBoard event reader, on constructed results."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from sfjax.baselines.evaluation import METRICS, EvalProtocol
from sfjax.baselines.report import (
    MethodResult,
    Table3Inputs,
    format_table3,
    kto_iteration_curves,
    plot_fig2,
    plot_fig3,
    read_scalar_events,
    write_table3,
)
from sfjax.baselines.summary import preset_of, tiny_actor_note


def _row(name, se, rec, vio, util, samples=300):
    return MethodResult(
        name=name,
        summary={
            "mean_se": (se, 0.1),
            "reconfigurations": (rec, 2.0),
            "violations": (vio, 1.5),
            "utility": (util, 123.45),
        },  # fmt: skip
        train_samples=samples,
        eval_samples=600,
        num_trajectories=2,
        note=f"{name} note",
    )


ROWS = [
    _row("SAC", 5.748, 44.775, 59.967, 11704.3, 480_000),
    _row("SF", 5.354, 21.091, 8.561, 25702.2, 300),
    _row("DQN", 5.219, 46.204, 15.911, 22519.1, 480_000),
    _row("Reflexion", 5.299, 29.454, 8.630, 25314.69, 900),
    _row("PPO", 3.587, 51.411, 1.997, 19277.2, 480_000),
]
INPUTS = Table3Inputs(
    protocol=EvalProtocol(seeds=(0, 1), num_steps=300),
    llm_provenance="actor tiny (random), reflector rule (offline hindsight labeller, no LLM)",
    preset="smoke",
)


def _parse(text):
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and "±" in cells[1]:
            rows[cells[0]] = cells[1:]
    return rows


def test_table3_rows_columns_and_provenance(tmp_path):
    path = write_table3(tmp_path / "table3.md", ROWS, INPUTS)
    text = path.read_text()
    rows = _parse(text)
    # Rows come out in the paper's order whatever the input order.
    assert list(rows) == ["SF", "Reflexion", "DQN", "PPO", "SAC"]
    assert rows["SF"][:4] == ["5.354 ± 0.100", "21.091 ± 2.000", "8.561 ± 1.500",
                              "25702.2 ± 123.5"]  # fmt: skip
    assert rows["DQN"][4] == "480,000" and rows["SF"][4] == "300" and rows["PPO"][5] == "600"
    header = next(line for line in text.splitlines() if line.startswith("| Algorithm"))
    assert [c.strip() for c in header.strip("|").split("|")][1:5] == [
        "Avg. SE", "Reconf. times", "PQoS vio.", "Utility"]  # fmt: skip
    assert "LLM rows (SF, Reflexion): actor tiny (random), reflector rule" in text
    assert "seeds [0, 1] with 300-step trajectories" in text
    # The paper's numbers are printed for reference, after ours.
    assert text.index("Paper's Table III") > text.index("| SAC |")
    assert re.search(r"\| SF \| 5\.354 \| 21\.091 \| 8\.561 \| 25702\.2 \|", text)
    assert "Ran on" not in text  # no environment given
    where = "sfjax 97035bc4ae, jax 0.10.2, CPU AMD EPYC [avx2], devices cpu (1 x cpu)"
    text = write_table3(tmp_path / "t.md", ROWS,
                        dataclasses.replace(INPUTS, environment=where)).read_text()
    assert f"Ran on (environment.json): {where}" in text


def test_table3_rejects_bad_inputs():
    with pytest.raises(ValueError, match="duplicate"):
        format_table3([ROWS[0], ROWS[0]], INPUTS)
    with pytest.raises(ValueError, match="at least one"):
        format_table3([], INPUTS)
    with pytest.raises(ValueError, match="lacks metrics"):
        MethodResult("X", {"mean_se": (1.0, 0.0)}, 1, 1, 1)


def test_figures_are_written(tmp_path):
    rng = np.random.default_rng(0)
    curves = {n: {m: rng.normal(size=(2, 5)) for m in METRICS} for n in ("DQN", "PPO", "SAC")}
    p2 = plot_fig2(tmp_path / "fig2.png", curves, [ROWS[1], ROWS[3]])
    iters = [{"rewards/chosen": list(zip(range(4 * i + 1, 4 * i + 5), rng.normal(size=4))),
              "rewards/rejected": list(zip(range(4 * i + 1, 4 * i + 5), rng.normal(size=4)))}
             for i in range(3)]  # fmt: skip
    p3 = plot_fig3(tmp_path / "fig3.png", iters, {"mean_se": (1.0, 1.2), "violations": (3, 2)})
    for p in (p2, p3):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


@pytest.mark.filterwarnings("error::UserWarning")
def test_fig2_without_curves_or_llm_rows_draws_no_empty_legend(tmp_path):
    """A table3 run of reference rows only has nothing to plot in fig. 2: matplotlib warned
    'No artists with labels found to put in legend' into every such run's output."""
    p2 = plot_fig2(tmp_path / "fig2.png", {}, [])
    assert p2.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fig3_plots_each_curve_at_its_logged_steps_one_unit_per_axis(tmp_path, monkeypatch):
    import matplotlib.figure

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    # step 2's micro-batches held desirable examples only: chosen has a point, rejected not
    iters = [
        {"rewards/chosen": [(1, 0.1), (2, 0.2), (3, 0.3)], "rewards/rejected": [(1, -0.1), (3, -0.3)]},
        {"rewards/chosen": [(4, 0.4), (5, 0.5)], "rewards/rejected": [(5, -0.5)]},
    ]  # fmt: skip
    plot_fig3(tmp_path / "fig3.png", iters, {"mean_se": (5.0, 5.2), "violations": (6.0, 5.0)})
    (fig,) = saved
    axes = [ax for ax in fig.axes if ax.axison]
    # (a1) SE, (a2) violations, (b) (c) KTO iterations, (d) means: one unit per y axis
    assert len(axes) == 5
    assert axes[0].get_ylabel() == "Avg. SE [bit/s/Hz]"
    assert axes[1].get_ylabel() == "PQoS violations [steps per trajectory]"
    chosen, rejected = axes[2].get_lines()[:2]
    assert list(chosen.get_xdata()) == [1, 2, 3] and list(rejected.get_xdata()) == [1, 3]
    assert list(axes[3].get_lines()[0].get_xdata()) == [4, 5]
    for ax in axes[2:]:
        assert ax.get_xlabel() and ax.get_ylabel() == "KTO reward β·log(πθ/πref)"


def test_table3_heading_names_the_preset_and_a_random_actor():
    text = format_table3(ROWS, INPUTS)
    assert text.splitlines()[0] == "# Table III (reproduced, preset `smoke`)"
    assert "tiny randomly" not in text
    note = tiny_actor_note(sf=True, reflexion=True)
    text = format_table3(ROWS, dataclasses.replace(INPUTS, preset="", actor_note=note))
    lines = text.splitlines()
    assert lines[0] == "# Table III (reproduced, custom config)"
    assert lines[2] == f"**{note}**" and "SF and Reflexion rows use a tiny randomly" in note
    assert tiny_actor_note(sf=False, reflexion=False) == ""
    assert preset_of(["smoke", "--run-dir", "x"], {"smoke": 1}) == "smoke"
    assert preset_of(["--help"], {"smoke": 1}) == ""


def test_event_reader_splits_kto_iterations_by_logged_step(tmp_path):
    from tensorboardX import SummaryWriter

    w = SummaryWriter(str(tmp_path / "tb"))
    expected = []
    step = 0
    for it, n in enumerate((3, 2)):
        chosen = []
        for _ in range(n):
            step += 1
            chosen.append((step, 0.5 * step))
            w.add_scalar("train/rewards/chosen", 0.5 * step, step)
            if step != 2:  # a step without undesirable examples logs no rejected reward
                w.add_scalar("train/rewards/rejected", -0.25 * step, step)
            w.add_scalar("train/loss", 1.0, step)
        w.add_scalar("kto_iter/num_steps", n, it)
        expected.append(chosen)
    # a late point of iteration 0 (e.g. flushed after the marker): split by step, not order
    w.add_scalar("train/rewards/rejected", -0.5, 2)
    w.close()
    events = read_scalar_events(tmp_path / "tb")
    assert ("train/loss", 1, 1.0) in events
    iters = kto_iteration_curves(events)
    assert [it["rewards/chosen"] for it in iters] == expected
    assert sorted(iters[0]["rewards/rejected"]) == [(1, -0.25), (2, -0.5), (3, -0.75)]
    assert iters[1]["rewards/rejected"] == [(4, -1.0), (5, -1.25)]


def test_event_reader_checks_record_crcs(tmp_path):
    from tensorboardX import SummaryWriter

    w = SummaryWriter(str(tmp_path / "tb"))
    for step in range(1, 4):
        w.add_scalar("train/loss", float(step), step)
    w.close()
    (path,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # corrupt the payload of the last record
    path.write_bytes(bytes(data))
    values = [v for tag, _, v in read_scalar_events(tmp_path / "tb") if tag == "train/loss"]
    assert values == [1.0, 2.0]  # the corrupted record is not read as data
