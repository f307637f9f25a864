"""The KTO trainer's TensorBoard writer: opened on a log directory with the process id in the
event file's name (tensorboardX names files by the second and opens them "wb": a trainer
restarted within the same second would otherwise erase the last one's events)."""

from __future__ import annotations

import os

from sfjax.train.kto_logging import open_writer


def test_writer_on_a_directory_is_owned_and_named_by_pid(tmp_path):
    writer, owned = open_writer(tmp_path / "tb")
    assert owned
    writer.add_scalar("train/loss", 1.0, 0)
    writer.close()
    (event_file,) = os.listdir(tmp_path / "tb")
    assert event_file.startswith("events.out.tfevents.") and event_file.endswith(f".{os.getpid()}")


def test_given_writer_or_none_is_not_owned(tmp_path):
    assert open_writer(None) == (None, False)
    writer, _ = open_writer(tmp_path / "tb")
    assert open_writer(writer) == (writer, False)
    writer.close()
