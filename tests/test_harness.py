"""Selection records in lm-evaluation-harness's shapes: per-item samples and the stderr."""

from __future__ import annotations

import numpy as np
import pytest
from lm_eval.api.metrics import mean_stderr as lm_eval_mean_stderr

from actcache.data import Example, Task
from actcache.experiment import _items
from actcache.harness import lm_eval_block, mean_stderr, run_key


@pytest.mark.parametrize("vals", [[1, 0, 1, 1, 0], [1.0, 1.0, 0.0], [0, 0, 0, 1, 1, 1, 1, 0, 1]])
def test_stderr_is_the_harness_own(vals):
    assert mean_stderr(vals) == pytest.approx(lm_eval_mean_stderr(vals))


def test_stderr_of_fewer_than_two_is_not_available():
    assert mean_stderr([1.0]) == "N/A" and mean_stderr([]) == "N/A"


def _mc():
    task = Task(name="mc", kind="multiple_choice", template="Q: {q}\nA:")
    evals = [Example("e0", (("q", "sky?"),), 1, ("red", "blue", "green")),
             Example("e1", (("q", "grass?"),), 0, ("green", "a very long purple")),]
    demo = Example("d0", (("q", "sun?"),), 0, ("yellow", "black"))
    scores = np.array([[-3.0, -2.0, -9.0], [-6.0, -5.0, -np.inf]])  # e1 has two choices: padded
    norm_pred = np.array([1, 0])  # by length in characters, " a very long purple" loses
    m = {"scores": scores, "pred": scores.argmax(1), "correct": (scores.argmax(1) == [1, 0]).astype(float),
         "norm_pred": norm_pred, "prompts": [["Q: sun?\nA: yellow\n\n", "Q: sky?\nA:"], ["Q: grass?\nA:"]]}
    return task, evals, [[demo], []], m


def test_multiple_choice_items_have_one_resp_per_choice_and_acc_norm():
    task, evals, demos, m = _mc()
    items = _items(task, evals, demos, m, np.array([1, 0]))
    a, b = items
    assert a["arguments"] == [["Q: sun?\nA: yellow\n\nQ: sky?\nA:", " " + c] for c in ("red", "blue", "green")]
    assert a["filtered_resps"] == [[-3.0, None], [-2.0, None], [-9.0, None]]
    assert a["resps"] == [[r] for r in a["filtered_resps"]] and a["demo_ids"] == ["d0"]
    assert len(b["arguments"]) == len(b["resps"]) == len(b["filtered_resps"]) == 2  # no padded slot
    assert (a["acc"], a["acc_norm"], b["acc"], b["acc_norm"]) == (1.0, 1.0, 0.0, 1.0)
    assert a["metrics"] == ["acc", "acc_norm"] and a["target"] == 1 and a["doc"] == {"q": "sky?"}
    assert [a["doc_id"], b["doc_id"]] == [0, 1] and a["id"] == "e0" and a["pred"] == 1 and a["gold"] == 1


def test_lm_eval_block_has_the_harness_shape():
    task, evals, demos, m = _mc()
    items = _items(task, evals, demos, m, np.array([1, 0]))
    block = lm_eval_block("mc", [{"strategy": "knn", "seed": 3, "items": items}], {"num_fewshot": 1}, "0.1.0")
    key = run_key("mc", "knn", 3)
    assert block["results"][key] == {"alias": key, "acc,none": 0.5, "acc_stderr,none": lm_eval_mean_stderr([1, 0]),
                                     "acc_norm,none": 1.0, "acc_norm_stderr,none": 0.0}
    assert block["n-samples"][key] == {"original": 2, "effective": 2} and block["versions"][key] == "0.1.0"
    assert block["config"] == {"num_fewshot": 1}
