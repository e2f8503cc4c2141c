"""The final table a simulation prints leads with what each organisation serves, not the last round."""

from __future__ import annotations

from rich.console import Console

from fedembed.cli import _print_final


def test_the_final_table_shows_the_served_state_beside_the_last_round():
    final = {
        "lab-a": {"score": 0.70, "val_score": 0.60, "loss": 0.5, "best_score": 0.81, "best_val_score": 0.66, "best_round": 4.0},
        "mean": {"score": 0.70, "val_score": 0.60, "loss": 0.5, "best_score": 0.81, "best_val_score": 0.66, "best_round": 4.0},
    }
    console = Console(record=True, width=120)
    _print_final({"config": {"mode": "fedembed"}, "final": final}, console)
    text = console.export_text()
    header = next(line for line in text.splitlines() if "organisation" in line)
    assert header.index("served") < header.index("last")  # the served state first
    row = next(line for line in text.splitlines() if "lab-a" in line)
    assert [c.strip() for c in row.strip("│ ").split("│")] == ["lab-a", "0.8100", "0.6600", "4.0", "0.7000", "0.6000", "0.5000"]
    assert "best-validation state" in text
