"""Prompt construction and the Actor-output parser: round trips and adversarial outputs."""

from __future__ import annotations

import random

import pytest

from sfjax.agents import prompts as P

STATE = {
    "prev_action": 7,
    "se": 5.4321,
    "arrival_rate_bps": 6.5e6,
    "queue_delta_bytes": -1024.0,
    "dropped_bytes": 0.0,
}
FEEDBACK = {
    "se": 5.1,
    "violation": 1.0,
    "reconfiguration": 0.0,
    "arrival_rate_bps": 6.1e6,
    "queue_delta_bytes": 2048.0,
    "dropped_bytes": 512.0,
}


def _history(n):
    return [
        P.HistoryEntry(
            state={**STATE, "prev_action": i + 1},
            reflection=f"reflection number {i}",
            action=i + 2,
            analysis=f"analysis number {i}",
            feedback=FEEDBACK,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("order", ["reflection_first", "action_first"])
def test_round_trip_both_orders(order):
    cfg = P.PromptConfig(field_order=order, action_lo=1, action_hi=13)
    rng = random.Random(0)
    for _ in range(200):
        a = rng.randint(1, 13)
        refl = " ".join(
            rng.choice(["queue", "grew", "SE", "was", "fine", "3", "Action"]) for _ in range(6)
        )
        ana = " ".join(
            rng.choice(["keep", "raise", "lower", "traffic", "7", "drops"]) for _ in range(5)
        )
        out = P.format_output(refl, a, ana, cfg)
        parsed = P.parse_output(out, cfg)
        assert parsed.ok, (out, parsed.error)
        assert parsed.action == a
        assert parsed.reflection == " ".join(refl.split())
        assert parsed.analysis == " ".join(ana.split())


@pytest.mark.parametrize("style", ["full", "compact"])
def test_field_order_in_format_and_system_prompt(style):
    r = P.PromptConfig(field_order="reflection_first", style=style)
    a = P.PromptConfig(field_order="action_first", style=style)
    assert P.format_output("x", 3, "y", r).splitlines()[0].startswith("Reflection:")
    assert P.format_output("x", 3, "y", a).splitlines()[0].startswith("Action:")
    sr, sa = P.system_prompt(r), P.system_prompt(a)
    assert sr.index("Reflection: <") < sr.index("Action: <")
    assert sa.index("Action: <") < sa.index("Reflection: <")
    # objectives in words, no reward
    for s in (sr, sa):
        assert "spectral efficiency" in s and "QoS" in s and "reconfiguration" in s
        assert "reward" not in s.lower() and "utility" not in s.lower()
        assert "from 1 to 12" in s  # the default env's range


def test_user_prompt_window_and_state():
    cfg = P.PromptConfig(history_window=3)
    text = P.user_prompt(STATE, _history(6), cfg, step=6)
    # only the last 3 of 6 steps, oldest first, with their step indices
    assert "reflection number 2" not in text
    assert text.index("reflection number 3") < text.index("reflection number 5")
    assert "[t=3]" in text and "[t=5]" in text and "[t=2]" not in text
    cur = text.split("Current state [t=6]:")[1]
    assert "allocation 7 RBGs" in cur and "SE 5.43" in cur and "6.50 Mb/s" in cur
    assert "queue change -1.0 kB" in cur and "dropped 0.0 kB" in cur
    assert "QoS violation" in text and "dropped 0.5 kB" in text
    assert "No previous steps" in P.user_prompt(STATE, [], cfg, step=0)
    assert "Recent steps" not in P.user_prompt(
        STATE, _history(4), P.PromptConfig(history_window=0), step=4
    )
    msgs = P.build_messages(STATE, _history(2), cfg, step=2)
    assert [m["role"] for m in msgs] == ["system", "user"]


@pytest.mark.parametrize("style", ["full", "compact"])
def test_history_text_cut_or_left_out(style):
    """max_field_chars cuts the Actor's past reflections and analyses (with "..."); 0 leaves
    them out ("-"); a negative value is refused."""
    cut = P.user_prompt(STATE, _history(2), P.PromptConfig(max_field_chars=8, style=style), step=2)
    assert "reflection number" not in cut and "reflection: refle..." in cut
    assert "analysis: analy..." in cut
    none = P.user_prompt(STATE, _history(2), P.PromptConfig(max_field_chars=0, style=style),
                         step=2)  # fmt: skip
    assert "reflection number" not in none and "analysis number" not in none
    assert none.count("reflection: -") == 2 and none.count("analysis: -") == 2
    with pytest.raises(ValueError, match="max_field_chars must be >= 0"):
        P.PromptConfig(max_field_chars=-5)


def test_state_missing_key_is_clear():
    with pytest.raises(KeyError, match="queue_delta_bytes"):
        P.format_state(
            {k: v for k, v in STATE.items() if k != "queue_delta_bytes"}, P.PromptConfig()
        )


def test_config_validation():
    with pytest.raises(ValueError, match="action_lo"):
        P.PromptConfig(action_lo=5, action_hi=2)
    with pytest.raises(ValueError, match="field_order"):
        P.PromptConfig(field_order="sideways")


CFG = P.PromptConfig(action_lo=1, action_hi=13)


@pytest.mark.parametrize(
    "text,action",
    [
        ("Reflection: ok\nAction: 5\nAnalysis: fine", 5),
        ("reflection: ok\naction: 5\nanalysis: fine", 5),
        ("**Reflection:** ok\n**Action:** 6 RBGs\n**Analysis:** fine", 6),
        ("**Action**: 6\n", 6),
        ("- Action: 7.\n", 7),
        ("1. Reflection: ok\n2. Action: 8\n3. Analysis: x", 8),
        ("Action = 9", 9),
        ("Action：10", 10),
        ("Action: 11.0 RBGs", 11),
        ("<think>Action: 2 maybe? Action: 3</think>\nReflection: r\nAction: 4\nAnalysis: a", 4),
        ("Reflection: last time Action was fine\nAction: 5\nAnalysis: keep Action: steady", None),
        ("Action: 5\nAnalysis: ok\nAction: 5", 5),  # repeated but consistent
        ("Reflection: the queue grew by 3 kB\nAction: 12\nAnalysis: 4 users active", 12),
        ("  Action:   13   \n", 13),
        ("Action: [3]", 3),
    ],
)
def test_parser_accepts(text, action):
    parsed = P.parse_output(text, CFG)
    if action is None:
        # "Action:" inside a line is not a header; "keep Action: steady" is not at line start
        assert parsed.action == 5
    else:
        assert parsed.ok, parsed.error
        assert parsed.action == action


@pytest.mark.parametrize(
    "text,err",
    [
        ("", "no 'Action:' field"),
        ("Reflection: fine\nAnalysis: fine", "no 'Action:' field"),
        ("I choose 5 RBGs.", "no 'Action:' field"),
        ("Action: five", "not an integer"),
        ("Action: 5.5", "not an integer"),
        ("Action: -3", "outside"),
        ("Action: 0", "outside"),
        ("Action: 14", "outside"),
        ("Action: 1000000000", "not an integer"),
        ("Action: 5\nAction: 6", "conflicting"),
        ("Action:", "not an integer"),
        ("Action: \nAnalysis: x", "not an integer"),
        ("<think>Action: 5</think>", "no 'Action:' field"),
        ("<think>Action: 5", "no 'Action:' field"),  # unterminated thinking hides everything
        ("Action: 5-7", "not an integer"),
        ("Action: 1,5", "not an integer"),
    ],
)
def test_parser_rejects(text, err):
    parsed = P.parse_output(text, CFG)
    assert not parsed.ok
    assert parsed.action is None
    assert err in parsed.error


def test_parser_random_garbage_never_crashes():
    rng = random.Random(1)
    alphabet = "Action:Reflection:Analysis: 0123456789\n*#-<>think/.,=abcXYZ\t"
    n_ok = 0
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        parsed = P.parse_output(text, CFG)
        assert (parsed.action is None) == (parsed.error is not None)
        if parsed.ok:
            n_ok += 1
            assert CFG.action_lo <= parsed.action <= CFG.action_hi
    assert n_ok < 2000


@pytest.mark.parametrize(
    "value",
    ["7/2", "5e3", "5 or 6", "1 000", "0x5", "5, 6", "5 to 6", "**5** or 6", "3+1", "4:3", "5..6", "7 (or 8)"],
)
def test_parser_never_guesses_a_number(value):
    """Issue 21 item 8: these were read as their first digits (7/2 -> 7, 0x5 -> 0, ...)."""
    parsed = P.parse_output(f"Reflection: r\nAction: {value}\nAnalysis: a", CFG)
    assert not parsed.ok and "not an integer" in parsed.error, parsed


@pytest.mark.parametrize(
    "text",
    [
        "*" * 50_000,
        "Action" + "*" * 50_000 + "x",
        "\n".join(["**" * 20 + "- 1." * 20] * 2_000),
        "Action: " + " " * 50_000 + "x",
        "Action: " + "7" * 50_000,
        "<think>" * 20_000,
    ],
)
def test_parser_runs_in_linear_time(text):
    """Issue 21 item 8: 50k '*' took 62 s with the old header regex (quadratic backtracking)."""
    import time

    t0 = time.perf_counter()
    P.parse_output(text, CFG)
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("text", ["Action: 7 RBGs (14 PRBs)", "Action: 7\tkeep 2 slices", "Action: 7 x9"])
def test_parser_reads_prose_after_the_action(text):
    """Words after the value, numbers among them, are prose, not another action."""
    assert P.parse_output(text, CFG).action == 7


@pytest.mark.parametrize(
    "text,want",
    [
        ("Reflection: ok\nAction: 5\nAnalysis: fine", "Reflection: ok\nAction: 9\nAnalysis: fine"),
        ("**Action:** 6 RBGs (12 PRBs)\n", "**Action:** 9 RBGs (12 PRBs)\n"),
        ("Action: 11.0 RBGs", "Action: 9.0 RBGs"),
        ("Action: [3]", "Action: [9]"),
        ("Action:\n  4\nAnalysis: a", "Action:\n  9\nAnalysis: a"),
        ("Action: 5\nAnalysis: ok\nAction: 5", "Action: 9\nAnalysis: ok\nAction: 9"),
        # a thinking block is left as it is; the answer's field is set
        (
            "<think>Action: 2 maybe</think>\nReflection: r\nAction: 4\nAnalysis: Action was 4",
            "<think>Action: 2 maybe</think>\nReflection: r\nAction: 9\nAnalysis: Action was 4",
        ),
        ("Action: 14", "Action: 9"),  # out of range before, in range after
        ("Action: 5\nAction: 6", "Action: 9\nAction: 9"),  # conflicting before, one action after
    ],
)
def test_with_action_sets_only_the_action(text, want):
    assert P.with_action(text, 9, CFG) == want
    assert P.parse_output(want, CFG).action == 9


@pytest.mark.parametrize(
    "text,action",
    [
        ("Reflection: no action here", 9),
        ("Action: five", 9),
        ("Action: 5-7", 9),  # still two values after the rewrite: refused, not guessed
        ("<think>Action: 5</think>", 9),
        ("Action: 5", 14),  # the result would be out of range
    ],
)
def test_with_action_refuses_what_it_cannot_set(text, action):
    assert P.with_action(text, action, CFG) is None
