"""`fedembed server`'s exit status: a completed run is a success, whatever the race with Flower's status."""

from __future__ import annotations

import json
from pathlib import Path

from fedembed.deploy import CoordinatorProcess, ServerOptions, run_outcome


class _FakeStatus(CoordinatorProcess):
    """A coordinator whose Flower status comes from a script, with no processes."""

    def __init__(self, state_dir: Path, statuses: list[tuple[str, str]], on_poll=None) -> None:
        super().__init__(ServerOptions(state_dir=state_dir, insecure=True, poll_seconds=0.0))
        self.statuses, self.on_poll, self.polls = list(statuses), on_poll, 0

    def run_status(self, run_id: int) -> tuple[str, str]:
        self.polls += 1
        if self.on_poll is not None:
            self.on_poll(self.polls)
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]


def _event(coord: CoordinatorProcess, doc: dict) -> None:
    with open(coord.files.progress, "a", encoding="utf-8") as f:
        f.write(json.dumps(doc) + "\n")


def test_done_written_just_before_finished_status_is_a_completed_run(tmp_path):
    # the race seen in issue 11: the ServerApp writes `done` and returns between our last
    # read of progress.jsonl and Flower's status saying finished:completed
    def write_done(poll: int) -> None:
        if poll == 2:
            _event(coord, {"event": "round", "round": 1})
            _event(coord, {"event": "done", "rounds": 1})

    coord = _FakeStatus(tmp_path, [("running", ""), ("finished:completed", "N/A")], on_poll=write_done)
    events: list[dict] = []
    result = coord.follow(1, events.append, timeout=30)
    assert result["done"] and result["status"] == "finished:completed"
    assert [e["event"] for e in events] == ["round", "done"]
    assert run_outcome(result) == (True, "")


def test_done_then_stale_running_status_still_ends(tmp_path):
    # Flower may still say `running` for a moment after the ServerApp wrote `done`
    def write_done(poll: int) -> None:
        if poll == 1:
            _event(coord, {"event": "done", "rounds": 1})

    coord = _FakeStatus(tmp_path, [("running", ""), ("running", ""), ("finished:completed", "")], on_poll=write_done)
    result = coord.follow(1, timeout=30)
    assert coord.polls == 3 and run_outcome(result) == (True, "")


def test_run_that_wrote_outputs_completed_even_if_superlink_went_away():
    assert run_outcome({"status": "superlink-exited", "details": "SuperLink exited with -15", "done": True}) == (True, "")


def test_failed_run_is_a_failure_with_its_reason():
    ok, reason = run_outcome({"status": "finished:failed", "details": "ServerApp raised ValueError", "done": False})
    assert not ok and "finished:failed" in reason and "ValueError" in reason


def test_completed_status_without_outputs_is_a_failure_that_says_so():
    ok, reason = run_outcome({"status": "finished:completed", "details": "N/A", "done": False})
    assert not ok and "never wrote its outputs" in reason


def test_timeout_is_a_failure():
    ok, reason = run_outcome({"status": "timeout", "details": "", "done": False})
    assert not ok and "waiting" in reason
