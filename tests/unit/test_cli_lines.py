"""What `pgml-tuned wait` and `status` print of a job: the live line, the final line, the key metric."""

from __future__ import annotations

import datetime
import decimal
import io
from typing import Any

from pgml_tuned.cli.output import LiveLines, final_line, key_metric, progress_line


def job(**kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": 12, "task": "text-classification", "status": "running", "step": None, "max_steps": None,
        "progress_pct": None, "last_loss": None, "eta": None, "error": None, "metrics": None, "model_id": 7,
        "last_eval": None,
    }  # fmt: skip
    return {**row, **kw}


def test_key_metric_per_task() -> None:
    metrics = {"eval_accuracy": 0.9, "eval_f1": 0.8, "eval_loss": 0.3, "eval_runtime": 1.0}
    assert key_metric("text-classification", metrics) == ("eval_accuracy", 0.9)
    assert key_metric("text-pair-classification", {"eval_f1": 0.8, "eval_loss": 0.3}) == ("eval_f1", 0.8)
    assert key_metric("conversation", metrics) == ("eval_loss", 0.3)
    assert key_metric("noop", {"slept": 2}) is None and key_metric("conversation", None) is None


def test_progress_line() -> None:
    assert progress_line(job(status="queued")) == "job 12 queued"
    line = progress_line(
        job(
            step=40, max_steps=120, progress_pct=decimal.Decimal("33.3"), eta=datetime.timedelta(seconds=65.4),
            last_loss=0.412345, last_eval={"eval_loss": 0.39, "eval_accuracy": 0.8125, "eval_runtime": 2.5, "step": 30},
        )
    )  # fmt: skip
    assert line == "job 12 running  step 40/120  33.3%  ETA 0:01:05  loss 0.4123  eval_accuracy 0.8125 eval_loss 0.39"


def test_final_line() -> None:
    done = job(status="succeeded", metrics={"eval_accuracy": 0.91, "eval_loss": 0.31, "eval_runtime": 3.0})
    assert (
        final_line(done)
        == "job 12 succeeded: eval_accuracy 0.91 eval_loss 0.31; model 7: pgml-tuned download 7 ./model-7"
    )
    assert (
        final_line(job(status="failed", error="CUDA out of memory\ntraceback")) == "job 12 failed: CUDA out of memory"
    )
    assert final_line(job(status="cancelled")) == "job 12 cancelled"


def test_live_lines_plain_when_not_a_terminal() -> None:
    out = io.StringIO()
    live = LiveLines(out, interval=10)
    live.update({1: "job 1 queued"}, now=0)
    live.update({1: "job 1 running  step 1/9"}, now=0)  # a new status: at once
    live.update({1: "job 1 running  step 2/9"}, now=5)  # changed, but too soon
    live.update({1: "job 1 running  step 3/9"}, now=11)
    live.update({1: "job 1 running  step 3/9"}, now=30)  # unchanged
    live.finish(1, "job 1 succeeded")
    assert out.getvalue().splitlines() == [
        "job 1 queued",
        "job 1 running  step 1/9",
        "job 1 running  step 3/9",
        "job 1 succeeded",
    ]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def render(text: str) -> list[str]:
    """The screen lines after `text`: enough of a terminal for the three sequences LiveLines writes."""
    screen: list[str] = [""]
    row = 0
    i = 0
    while i < len(text):
        if text.startswith("\x1b[2K", i):
            screen[row] = ""
            i += 4
        elif text[i] == "\x1b":
            end = text.index("F", i)
            row -= int(text[i + 2 : end])
            i = end + 1
        elif text[i] == "\n":
            row += 1
            if row == len(screen):
                screen.append("")
            i += 1
        else:
            screen[row] += text[i]
            i += 1
    return screen[:-1] if screen[-1] == "" else screen


def test_live_lines_in_place_on_a_terminal() -> None:
    out = Terminal()
    live = LiveLines(out)
    live.update({1: "job 1 running  step 1/9", 2: "job 2 queued"}, now=0)
    live.update({1: "job 1 running  step 2/9", 2: "job 2 running  step 1/4"}, now=1)
    assert render(out.getvalue()) == ["job 1 running  step 2/9", "job 2 running  step 1/4"]
    live.finish(2, "job 2 succeeded")
    live.update({1: "job 1 running  step 3/9"}, now=2)
    assert render(out.getvalue()) == ["job 2 succeeded", "job 1 running  step 3/9"]
    live.finish(1, "job 1 failed: out of memory")
    assert render(out.getvalue()) == ["job 2 succeeded", "job 1 failed: out of memory"]
