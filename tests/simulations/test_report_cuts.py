"""The run summary reports the share of text cut to fit the window (fedasls.lm.cuts), summed over device
rounds, and the ROUGE-L recall uplift; the terminal table prints both."""

from __future__ import annotations

import json
import math

from server.checkpoint import DEVICE_ROUNDS_FILE, ROUNDS_FILE
from simulations.report import format_summary, summarize


def _device(device_id: int, prompts: int, prompts_cut: int, answer_tokens: int, answer_tokens_cut: int) -> dict:
    return {"device_id": device_id, "status_code": 0, "rouge1": 0.3, "base_rouge1": 0.2, "rougeL": 0.3,
            "base_rougeL": 0.2, "rougeL_recall": 0.4, "base_rougeL_recall": 0.25, "perplexity": 2.0,
            "base_perplexity": 3.0, "accept_rate": 0.5, "base_accept_rate": 0.4, "epsilon": math.nan,
            "prompts": prompts, "prompts_cut": prompts_cut, "answers": 2, "answers_cut": 1,
            "answer_tokens": answer_tokens, "answer_tokens_cut": answer_tokens_cut}


def test_the_summary_sums_cut_counts_over_device_rounds(tmp_path) -> None:
    rounds = [{"round": 1, "stragglers": 0, "dropped": 0, "failed": 0, "virtual_round_s": 10.0}]
    devices = [_device(0, 10, 1, 100, 0), _device(1, 30, 9, 300, 100)]
    (tmp_path / ROUNDS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rounds))
    (tmp_path / DEVICE_ROUNDS_FILE).write_text("".join(json.dumps(r) + "\n" for r in devices))
    summary = summarize(tmp_path, 1.0)
    # ratio of sums (10 of 40 prompts), not the mean of the devices' shares (0.1 and 0.3 -> 0.2)
    assert summary["cuts"] == {"prompts": 0.25, "answers": 0.5, "answer_tokens": 0.25}
    assert abs(summary["uplift_rougeL_recall"][0] - 0.15) < 1e-9
    table = format_summary(summary)
    assert "25.0% / 50.0% / 25.0%" in table and "ROUGE-L recall uplift" in table
