"""A seeded sample of the GGUF fuzz campaign (``tests/fuzz_gguf.py``; the full campaign's
figures are in the README): mutants of a tiny Gemma 3 GGUF are accepted or refused cleanly, in
process and through `gemma run`, never an abort, a hang or a traceback."""

from __future__ import annotations

import pytest
from conftest import GEMMA
from fuzz_gguf import campaign


def test_in_process_sample(tmp_path):
    report = campaign(seed=20261201, mutants=500, cli=0, gemma=str(GEMMA), folder=tmp_path)
    assert report["bugs"] == []
    outcomes = report["outcomes"]
    assert outcomes["in-process refused"] > 100 and outcomes["in-process accepted"] > 50


@pytest.mark.slow
def test_through_the_command_line_sample(tmp_path):
    report = campaign(seed=20261202, mutants=300, cli=30, gemma=str(GEMMA), folder=tmp_path)
    assert report["bugs"] == [], report["bugs"]
    assert report["cli"] == 30
    assert report["outcomes"].get("cli ran", 0) > 0 and report["outcomes"].get("cli refused", 0)
