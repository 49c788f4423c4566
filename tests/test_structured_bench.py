"""bench/bench_structured.py on the CPU, as a smoke test: both runs, their figures in the JSON, the table last."""

from __future__ import annotations

import json

import jsonschema
import pytest
from click.testing import CliRunner

from bench.bench_structured import long_schema, main


def test_bench_structured_runs_on_the_cpu(checkpoints, tmp_path) -> None:
    out = tmp_path / "structured.json"
    result = CliRunner().invoke(main, ["--model", str(checkpoints("qwen3-tiny")), "--device", "cpu",
                                       "--num-requests", "6", "--scale", "32", "--json", str(out)])
    assert result.exit_code == 0, result.output
    free, constrained = json.loads(out.read_text())
    assert free["constrained_requests"] == 0 and free["masked_steps"] == 0 and free["mask_ms_per_step"] == 0
    assert constrained["constrained_requests"] == 3 and constrained["masked_steps"] > 0
    assert constrained["mask_ms_per_step"] > 0 and constrained["constrained_output_tokens"] > 0
    # the schemas cannot complete before max_tokens: both runs write the same number of tokens
    assert constrained["output_tokens"] == free["output_tokens"] and constrained["constrained_invalid"] == 0
    assert "constrained / unconstrained output tok/s" in result.output.splitlines()[-1]


def test_long_schemas_need_their_items() -> None:
    for kind, item in enumerate(["a", 5, {"id": 1, "tag": "red"}]):
        schema = long_schema(kind, 3)
        jsonschema.validate([item] * 3, schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate([item] * 2, schema)
