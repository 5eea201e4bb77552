"""The chaos verifier reads producer logs the way a killed producer leaves them."""

from __future__ import annotations

from pathlib import Path

from verify import read_producer_logs

SHA = "a" * 64


def test_a_torn_line_completed_by_the_next_run_is_not_a_logged_put(tmp_path: Path) -> None:
    whole, torn = "01a224dc947d00345919d4ff92226fab", "01a224dc947d00355919d4ff92226fab"
    log = tmp_path / "producer-0.log"
    # Killed inside the write of the second line; the restarted producer's
    # first line ("I 400") completes it.
    log.write_text(f"I 1\nP {whole} {SHA} audit\nP {torn} {SHA[:55]}I 400\nR 1\n")
    produced = read_producer_logs([str(log)])
    assert produced.put == {whole: (SHA, "audit")}
    assert produced.calls == 1 and produced.returned == 1
