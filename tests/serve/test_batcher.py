import numpy as np
import pytest

from bulkinfer.serve.batcher import DynamicBatcher


def test_a_model_returning_the_wrong_row_count_fails_the_request_not_the_batcher():
    def predict(values):
        if "short" in values:
            return np.zeros((len(values) - 1, 2), np.float32)  # one row missing
        return np.ones((len(values), 2), np.float32)

    batcher = DynamicBatcher(predict, max_queue_delay_s=0)
    try:
        with pytest.raises(RuntimeError, match="returned 1 rows for 2 inputs"):
            batcher.submit(["short", "x"]).result(10)
        np.testing.assert_array_equal(batcher.submit(["a", "b", "c"]).result(10), np.ones((3, 2)))
    finally:
        batcher.close(10)


def test_a_model_returning_none_does_not_strand_later_requests():
    calls = []

    def predict(values):
        calls.append(list(values))
        return None if len(calls) == 1 else np.ones((len(values), 1))

    batcher = DynamicBatcher(predict, max_queue_delay_s=0)
    try:
        with pytest.raises(RuntimeError, match="returned NoneType rows"):
            batcher.submit(["a"]).result(10)
        assert batcher.submit(["b", "c"]).result(10).shape == (2, 1)
    finally:
        batcher.close(10)
