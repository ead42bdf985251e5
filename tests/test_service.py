"""The serving loop (mpillm.serving.service) in-process on the bundled model, one rank: what a
request's sink sees when its request ends. The HTTP server around it is tested in test_serve.py."""
from __future__ import annotations

import pytest
from mpi4py import MPI


@pytest.fixture(scope="module")
def service_parts(tmp_path_factory):
    from convert.__main__ import convert
    from mpillm.formats.tokenizer import load_tokenizer
    from mpillm.runtime.engine import Engine
    from mpillm.startup import bundled_gguf

    out = tmp_path_factory.mktemp("bundled-service")
    convert(bundled_gguf(), out, [1], progress=False)
    engine = Engine(out, max_seq_len=64, max_batch=8, comm=MPI.COMM_SELF, verbose=False, n_slots=2)
    return engine, load_tokenizer(out)


def _ended_with(svc, sink_log: list):
    """A sink that records, at the moment a request's last output is delivered, the service's slot
    and request counters: what a client reading /metrics right after its reply would see."""
    def sink(out):
        if out.finish_reason is not None:
            m = svc.metrics()
            sink_log.append((out.finish_reason, m["slots_busy"], m["requests_finished"]))
    return sink


def test_last_output_is_given_after_the_slot_is_free(service_parts):
    """A request that ends (its length, a stop string, a cancel) frees its slot before its last output
    goes out, so a client that reads /metrics when its reply is complete never sees its own request
    still holding a slot (test_serve's test_health_and_metrics failed that way on a loaded machine).
    Control: delivering before freeing (the old order in Service._end) gives busy 1 for each."""
    from mpillm.serving.sampling import SamplingParams
    from mpillm.serving.service import Service

    engine, tok = service_parts
    svc = Service(engine, tok, parallel=2)
    log: list = []
    ids = tok.encode("The capital of France is")
    svc.submit(ids, SamplingParams(max_tokens=3, ignore_eos=True), sink=_ended_with(svc, log))
    while svc.step():
        pass
    first = svc.submit(ids, SamplingParams(max_tokens=40, ignore_eos=True), sink=_ended_with(svc, log))
    svc.step()
    svc.cancel(first.request_id)
    while svc.step():
        pass
    assert log == [("length", 0, 1), ("cancelled", 0, 2)], log
