"""RunLog: rank 0 appends one JSON line per record and mirrors its numbers as TensorBoard scalars; other ranks
write nothing; a log that cannot be appended to stops the run naming the file."""

from __future__ import annotations

import json

import pytest

import seg.engine.run_log as run_log
from seg.engine.errors import TrainingError
from seg.engine.run_log import RunLog


class RecordingWriter:
    """Stands in for TensorBoard's SummaryWriter."""

    def __init__(self) -> None:
        self.scalars, self.flushes, self.closed = [], 0, False

    def add_scalar(self, tag, value, step) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def writers(monkeypatch):
    made = []

    def make(output_dir):
        made.append(RecordingWriter())
        return made[-1]

    monkeypatch.setattr(run_log, "tensorboard_writer", make)
    return made


def test_records_are_appended_as_json_lines_and_numbers_as_scalars(tmp_path, writers):
    log = RunLog(tmp_path)
    (tmp_path / "log.jsonl").write_text('{"iteration": 0, "earlier": "run"}\n')  # a resumed run appends
    log.write({"iteration": 1, "loss": 0.5, "lr": 0.01})
    log.write({"iteration": 2, "skipped_file": "a.png: truncated", "skipped_files": 1})
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines == [{"iteration": 0, "earlier": "run"}, {"iteration": 1, "loss": 0.5, "lr": 0.01},
                     {"iteration": 2, "skipped_file": "a.png: truncated", "skipped_files": 1}]
    assert len(writers) == 1  # created once, on the first record
    assert writers[0].scalars == [("loss", 0.5, 1), ("lr", 0.01, 1), ("skipped_files", 1, 2)]
    assert writers[0].flushes == 2
    log.close()
    assert writers[0].closed


def test_a_disabled_log_writes_nothing(tmp_path, writers):
    log = RunLog(tmp_path, enabled=False)
    log.write({"iteration": 1, "loss": 0.5})
    log.close()
    assert not (tmp_path / "log.jsonl").exists() and writers == []


def test_without_tensorboard_only_the_file_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(run_log, "tensorboard_writer", lambda output_dir: None)
    log = RunLog(tmp_path)
    log.write({"iteration": 1, "loss": 0.5})
    log.write({"iteration": 2, "loss": 0.25})
    log.close()
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2


def test_an_unwritable_log_stops_the_run_naming_the_file(tmp_path, writers):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(TrainingError) as raised:
        RunLog(blocker).write({"iteration": 1, "loss": 0.5})
    assert str(raised.value) == f"cannot append to {blocker / 'log.jsonl'}: Not a directory"
