"""One answer path: every router returns an assignment (who answers each instance), and every entry point that
answers (predict, eval, the benchmark, the experiment harness, the server) hands it to the registry's one engine.
Real tiny LoRA experts, real PostgreSQL and S3."""

from __future__ import annotations

import threading

import test_routers

from elmreg.inference.assignment import Answerer
from elmreg.inference.engine import PeftEngine, Prompt
from elmreg.inference.routers import router_names
from elmreg.serve.service import ServingService

# The routers tests' fixture: two tiny LoRA experts trained on the real services.
trained = test_routers.trained


def test_every_router_returns_one_answerer_per_instance(trained):
    queries = trained.examples("colours", split="all", limit=6)
    ready = {e.id for e in trained.experts(status="ready")}
    # 'trained' needs a trained retriever first: tests/test_trained_router.py checks its assignment.
    names = [n for n in router_names() if n != "trained"]
    for name in names:
        assignment = trained.assign(queries, router=name, q=4, caller_label=f"shapes:{name}")
        assert len(assignment) == len(queries), name
        assert all(a.expert is not None and a.expert.id in ready for a in assignment.answerers), name
        decisions = assignment.decisions
        if name == "per-instance":
            assert len(decisions) == len(queries)
            pairs = zip(assignment.answerers, decisions, strict=True)
            assert all(a.decision_id == d.decision_id and a.expert.id == d.chosen_expert_id for a, d in pairs)
        else:
            (decision,) = decisions
            assert all(a.decision_id == decision.decision_id for a in assignment.answerers), name
            assert all(a.expert.id == decision.chosen_expert_id for a in assignment.answerers), name
        mixtures = {a.mixture.key if a.mixture else None for a in assignment.answerers}
        if name == "arrow":
            mixture = assignment.answerers[0].mixture
            assert [e.id for e in mixture.experts] == list(decisions[0].mixture) and len(mixtures) == 1
        else:
            assert mixtures == {None}, name
        recorded = trained.audit("decisions", limit=50, caller_label=f"shapes:{name}")
        assert sorted(r["decision_id"] for r in recorded) == sorted(d.decision_id for d in decisions)


class _Waiting:
    cancelled = False

    def __init__(self):
        self.done, self.answer, self.error = threading.Event(), None, None

    def delta(self, text):
        pass

    def finish(self, answer):
        self.answer = answer
        self.done.set()

    def fail(self, error):
        self.error = error
        self.done.set()


def test_every_entry_point_answers_through_the_registrys_one_engine(trained, tmp_path, monkeypatch):
    engine = trained.engine()
    runs: list[PeftEngine] = []
    run = PeftEngine.run

    def counted(self, batch):
        runs.append(self)
        return run(self, batch)

    monkeypatch.setattr(PeftEngine, "run", counted)
    queries = trained.examples("colours", split="all", limit=4)

    def answers_through_the_engine(action) -> None:
        before = len(runs)
        action()
        assert len(runs) > before and all(e is engine for e in runs[before:])

    answers_through_the_engine(lambda: trained.predict(queries, expert="colours"))
    answers_through_the_engine(lambda: trained.predict(queries, route="per-instance"))
    answers_through_the_engine(lambda: trained.predict(queries, route="arrow", q=4))
    answers_through_the_engine(lambda: trained.predict(queries))  # the base backbone
    answers_through_the_engine(lambda: trained.evaluate("moods", "roe", split="all", limit=4, q=4))
    answers_through_the_engine(lambda: trained.benchmark(limit=4, out_dir=tmp_path))
    # The routers' in-model method (Arrow) loads on the same pool the engine answers on.
    assert trained.router().pool_for(trained.expert("colours").backbone_id) is engine.pool

    service = ServingService(trained, auth=False, device="cpu")
    try:
        assert service.engine.engine is engine
        sink = _Waiting()

        def served() -> None:
            service.engine.submit([Prompt(Answerer(trained.expert("moods")), queries[0], sink=sink)])
            assert sink.done.wait(120) and sink.error is None and sink.answer.text

        answers_through_the_engine(served)
    finally:
        service.close()
