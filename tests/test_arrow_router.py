"""Arrow as a router: the library's LoRA experts mixed token by token by PEFT, the mixing mass recorded as the
decision's weighted votes, the adapter pool clean afterwards. Real tiny experts, real PostgreSQL and S3."""

from __future__ import annotations

import json

import numpy as np
import pytest
import test_routers
import torch
from click.testing import CliRunner
from conftest import lab_environ
from sqlalchemy import text

from elmreg.cli.main import cli
from elmreg.inference.arrow import ARROW_ADAPTER, _layer_mass, routing_mass
from elmreg.inference.router import MIN_RECORDED_MASS, Router
from elmreg.registry.errors import UserError

# The routers tests' fixture: two tiny LoRA experts trained on the real services.
trained = test_routers.trained


def _logits(model, backbone, texts):
    encoded = backbone.tokenizer(texts, return_tensors="pt", padding=True).to(backbone.device)
    with torch.no_grad():
        return model(**encoded).logits


def test_arrow_mixes_the_library_as_peft_computes_and_records_its_mass(trained, tmp_path):
    experts = sorted(trained.experts(status="ready"), key=lambda e: e.id)
    pool = trained._pool(trained.settings.backbone)
    texts = ["what colour is the sky ?", "i really love this movie ."]
    base = _logits(pool.backbone.model, pool.backbone, texts)

    # A mixture of one expert is that expert: Arrow's coefficient is 1 and its delta is the LoRA delta.
    with pool.use(experts[0]) as model:
        alone = _logits(model, pool.backbone, texts)
    with pool.use_arrow(experts[:1], top_k=3, temperature=1.0) as model:
        torch.testing.assert_close(_logits(model, pool.backbone, texts), alone, rtol=1e-4, atol=1e-5)

    with pool.use_arrow(experts, top_k=2, temperature=1.0) as model:
        mixed = _logits(model, pool.backbone, texts)
        # The mass we record is what PEFT mixes: one layer's output minus its base layer's is the coefficient-
        # weighted sum of the experts' scaled LoRA deltas.
        layer = next(m for m in model.modules() if hasattr(m, "lora_arrow"))
        x = torch.randn(1, 3, layer.in_features)
        delta = layer(x) - layer.base_layer(x)
        coefficients = _layer_mass(layer, x)
        names = layer.lora_arrow[ARROW_ADAPTER].task_adapter_names
        expected = sum(
            coefficients[:, i : i + 1]
            * layer.scaling[name]
            * (x.view(-1, layer.in_features) @ layer.lora_A[name].weight.T @ layer.lora_B[name].weight.T)
            for i, name in enumerate(names)
        )
        torch.testing.assert_close(delta.view(3, -1), expected, rtol=1e-4, atol=1e-5)
        mass = routing_mass(model, pool.backbone, trained.examples("colours", split="all", limit=5))
    assert mass.shape == (5, 2)
    np.testing.assert_allclose(mass.sum(axis=1), 1.0, rtol=1e-5)
    assert not torch.allclose(mixed, alone)
    # Nothing is left on the backbone: the pool is empty and the backbone computes what it did before.
    assert pool.resident == []
    torch.testing.assert_close(_logits(pool.backbone.model, pool.backbone, texts), base)

    # Recorded like any decision: router 'arrow', no embedder, one weighted vote per (instance, expert).
    queries = trained.examples("colours", split="all", limit=6)
    decision = trained.route(queries, task="colours", router="arrow", q=6)
    assert decision.router == "arrow" and decision.embedder is None
    assert decision.mixture == tuple(e.id for e in experts)
    assert decision.router_params == {"top_k": 3, "temperature": 1.0}
    with trained.context.engine.begin() as c:
        row = c.execute(
            text("SELECT router, embedder_id, chosen_expert_id FROM routing_decisions WHERE id = :d"),
            {"d": decision.decision_id},
        ).one()
        sums = dict(
            c.execute(
                text(
                    "SELECT expert_id, sum(weight) FROM routing_votes WHERE decision_id = :d "
                    "AND library_entry_id IS NULL GROUP BY expert_id"
                ),
                {"d": decision.decision_id},
            ).all()
        )
    assert row.router == "arrow" and row.embedder_id is None
    assert row.chosen_expert_id == max(sums, key=sums.get) == decision.chosen_expert_id
    assert sum(sums.values()) == pytest.approx(6, abs=6 * len(experts) * MIN_RECORDED_MASS)
    assert {t.expert_id: t.strength for t in decision.tallies} == pytest.approx(sums)

    # Answered by the mixture, through the API and the CLI.
    rows = trained.predict(queries, route="arrow")
    assert len(rows) == 6 and rows[0]["mixture"] and rows[0]["expert"] in {e.name for e in experts}
    env, runner = lab_environ(trained), CliRunner()
    routed = runner.invoke(
        cli,
        ["route", "--dataset", "bigbench:colours", "--split", "all", "--router", "arrow"]
        + ["--router-option", "top_k=1"],
        env=env,
    )
    assert routed.exit_code == 0, routed.output
    assert "router arrow" in routed.output
    evaluated = runner.invoke(
        cli,
        ["eval", "--dataset", "bigbench:sizes/small_things", "--split", "all", "--limit", "8"]
        + ["--route", "arrow", "--json"],
        env=env,
        catch_exceptions=False,
    )
    assert evaluated.exit_code == 0, evaluated.output
    result = json.loads(evaluated.stdout)[0]
    assert result["n_examples"] == 8 and set(result["details"]["mass"]) <= {e.name for e in experts}


def test_arrow_refuses_what_it_cannot_mix(trained):
    queries = trained.examples("colours", split="all", limit=4)
    with pytest.raises(UserError, match="mixes LoRA experts only"):
        trained.route(queries, router="arrow", kinds=["ffn_adapter"], q=4)
    with pytest.raises(UserError, match="runs the backbone"):
        Router(trained.context).route(queries, router="arrow", q=4)
    with pytest.raises(UserError, match="at least 1"):
        trained.route(queries, router="arrow", router_options={"top_k": 0}, q=4)
