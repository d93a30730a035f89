"""One engine per process: DoFn threads set up concurrently share one loaded model."""

import threading

from bulkinfer.beam.transform import _InferDoFn
from bulkinfer.testing import CountingModel


def test_dofns_set_up_on_many_threads_share_one_loaded_model():
    model = CountingModel(name="shared-by-threads")
    before = CountingModel.loads
    fns = [_InferDoFn(model, input_field=None, id_field="id", output_field=None, keep_fields=None, flush_rows=8,
                      allow_missing_ids=False, processes_per_accelerator=1) for _ in range(8)]
    start = threading.Barrier(len(fns))

    def setup(fn):
        start.wait()  # all threads enter setup together
        fn.setup()

    threads = [threading.Thread(target=setup, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert CountingModel.loads - before == 1
    assert len({id(fn._loaded) for fn in fns}) == 1
