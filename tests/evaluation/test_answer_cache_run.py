"""``eval.answer_cache`` in a real training run: same accuracies, and a second run answers from the store."""

import json

import pytest

from leverplus.pipeline import load_data, train_and_evaluate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _run(compose_cfg, tmp, out, *overrides):
    cfg = compose_cfg(["data=sim_tiny", f"data.cache_dir={tmp}/world", "tracking.enabled=false", "sft.epochs=2",
                       "rce.epochs=1", *overrides])
    return train_and_evaluate(cfg, load_data(cfg), tmp / out, say=lambda s: None)


def test_cached_answers_give_the_same_run_and_the_second_run_generates_nothing(compose_cfg, tiny):
    store = tiny / "answers.sqlite"
    plain = _run(compose_cfg, tiny, "plain")
    first = _run(compose_cfg, tiny, "first", "eval.answer_cache=true", f"eval.answer_cache_path={store}")
    second = _run(compose_cfg, tiny, "second", "eval.answer_cache=true", f"eval.answer_cache_path={store}")
    acc = {k: v for k, v in plain.metrics.items() if "downstream" in k}
    assert acc and all(first.metrics[k] == v and second.metrics[k] == v for k, v in acc.items())
    assert json.dumps(plain.per_query, default=float) == json.dumps(second.per_query, default=float)
    assert first.metrics["answer_cache/generated"] > 0
    assert second.metrics["answer_cache/generated"] == 0
    assert second.metrics["answer_cache/cached"] == first.metrics["answer_cache/generated"] + \
        first.metrics["answer_cache/cached"]
    assert "answer_cache/generated" not in plain.metrics
