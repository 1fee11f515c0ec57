"""SkippedFiles in one process: each replaced file is reported once (stderr and the log, with the running count),
however often it is met, and not again after a resume; nothing happens without skip_bad_samples. (Across ranks:
test_collaborators_across_ranks.py; a real bad file through seg.train: test_faults.py.)"""

from __future__ import annotations

from seg.engine.skipped_files import SkippedFiles


def test_each_file_is_reported_once_with_the_running_count(capsys):
    records = []
    skipped = SkippedFiles(enabled=True, world_size=1, is_main=True, log=records.append)
    skipped.met(["b.png: truncated"])
    skipped.met(["b.png: truncated", "c.png: not an image"])  # met again in the same interval
    skipped.report(iteration=4)
    skipped.met(["b.png: truncated"])  # the next epoch meets it again
    skipped.report(iteration=8)
    assert skipped.reported == ["b.png: truncated", "c.png: not an image"] and len(skipped) == 2
    assert records == [{"iteration": 4, "skipped_file": "b.png: truncated", "skipped_files": 1},
                       {"iteration": 4, "skipped_file": "c.png: not an image", "skipped_files": 2}]
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == ["warning: skipped an unreadable training sample: b.png: truncated",
                        "warning: skipped an unreadable training sample: c.png: not an image"]


def test_files_reported_before_a_resume_are_not_reported_again(capsys):
    records = []
    skipped = SkippedFiles(enabled=True, world_size=1, is_main=True, log=records.append)
    skipped.reported = ["b.png: truncated"]  # from the checkpoint
    skipped.met(["b.png: truncated"])
    skipped.report(iteration=9)
    assert records == [] and capsys.readouterr().err == "" and len(skipped) == 1


def test_only_the_main_rank_warns(capsys):
    records = []
    skipped = SkippedFiles(enabled=True, world_size=1, is_main=False, log=records.append)
    skipped.met(["b.png: truncated"])
    skipped.report(iteration=1)
    assert capsys.readouterr().err == ""
    assert skipped.reported == ["b.png: truncated"] and len(records) == 1  # the log itself writes on rank 0 only


def test_without_skip_bad_samples_nothing_is_reported(capsys):
    records = []
    skipped = SkippedFiles(enabled=False, world_size=1, is_main=True, log=records.append)
    skipped.met([])
    skipped.report(iteration=1)
    assert records == [] and skipped.reported == [] and capsys.readouterr().err == ""
