"""defenses.explain: the training samples behind an adversarial failure, against brute-force leave-one-out
retraining and the exact harm formula; dropped inputs, the LDS lookup, the files written, bad input."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F

import defenses
from attacks import PGD
from defenses.attribution import trust_text

from conftest import flat_grad

WEIGHT_DECAY = 1e-2
PLANTED = 40  # the training sample planted in class 0's region with label 1


def _fit(model: torch.nn.Linear, X, y) -> torch.nn.Linear:
    """Full-batch L-BFGS to the unique minimum of the mean cross-entropy + weight decay (strongly convex)."""
    optimiser = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = F.cross_entropy(model(X), y) + WEIGHT_DECAY / 2 * sum(p.pow(2).sum() for p in model.parameters())
        loss.backward()
        return loss

    optimiser.step(closure)
    return model.eval()


@pytest.fixture(scope="module")
def problem():
    """Logistic regression on two 2-D blobs (class 0 left, class 1 right) with one class-1 sample planted on
    the left, near the input explained; three test inputs: one the attack flips, one already misclassified,
    one too far from the boundary to flip."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 2
    X = torch.randn(40, 2, generator=g, dtype=torch.float64) * 0.3
    X[:, 0] += 2.0 * y - 1.0
    X = torch.cat([X, torch.tensor([[-0.7, 0.0]], dtype=torch.float64)])
    y = torch.cat([y, torch.tensor([1])])
    torch.manual_seed(0)
    model = _fit(torch.nn.Linear(2, 2).double(), X, y)
    inputs = torch.tensor([[-0.4, 0.0], [1.0, 0.0], [-3.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0])
    return model, (X, y), inputs, labels


def _explain(problem, **keywords):
    model, train, inputs, labels = problem
    return defenses.explain(model, train, inputs, labels, eps=0.8, bounds=None, **keywords)


def test_the_top_sample_is_the_one_whose_removal_most_lowers_the_adversarial_loss(problem):
    model, (X, y), inputs, labels = problem
    explanation = _explain(problem, top=3)
    [entry] = explanation.explained
    x_adv = explanation.adversarial
    assert entry["input"] == 0 and model(x_adv).argmax(1).item() == 1

    def adversarial_loss(m):
        return F.cross_entropy(m(x_adv), labels[:1]).item()

    full = adversarial_loss(model)
    keep = torch.ones(len(X), dtype=torch.bool)
    drops = []
    for i in range(len(X)):  # brute force: retrain without each sample, the adversarial point held fixed
        keep[i] = False
        retrained = torch.nn.Linear(2, 2).double()
        retrained.load_state_dict(model.state_dict())
        drops.append(full - adversarial_loss(_fit(retrained, X[keep], y[keep])))
        keep[i] = True
    assert max(range(len(X)), key=drops.__getitem__) == PLANTED
    assert entry["top"][0]["index"] == PLANTED and entry["top"][0]["label"] == 1
    exact = defenses.explain(model, (X, y), inputs, labels, eps=0.8, bounds=None, method="if-exact",
                             damping=WEIGHT_DECAY, top=1)
    assert exact.explained[0]["top"][0]["index"] == PLANTED

    # the exact ip harm formula: -<grad of the loss at the adversarial point, grad of the training loss>
    params = list(model.parameters())
    target = flat_grad(F.cross_entropy(model(x_adv), labels[:1]), params)
    harms = torch.stack([-target @ flat_grad(F.cross_entropy(model(X[i:i + 1]), y[i:i + 1]), params)
                         for i in range(len(X))])
    torch.testing.assert_close(explanation.scores[:, 0], harms)
    torch.testing.assert_close(explanation.aggregate_scores, harms)
    assert [t["index"] for t in entry["top"]] == harms.argsort(descending=True)[:3].tolist()


def test_inputs_not_flipped_are_reported_with_the_reason(problem):
    explanation = _explain(problem)
    assert [d["input"] for d in explanation.dropped] == [1, 2]
    assert "misclassified before the attack" in explanation.dropped[0]["reason"]
    assert "did not flip" in explanation.dropped[1]["reason"]
    assert "input 1 (label 0) dropped: misclassified" in explanation.to_markdown()
    named = _explain(problem, ids=[10, 11, 12])
    assert [d["input"] for d in named.dropped] == [11, 12] and named.explained[0]["input"] == 10
    with pytest.raises(ValueError, match=r"^inputs: the attack flips none of the 2 input\(s\) \(1 misclassified"):
        defenses.explain(problem[0], problem[1], problem[2][1:], problem[3][1:], eps=0.8, bounds=None)


def test_per_input_rows_average_to_the_set_and_a_set_only_method_says_so(problem):
    model, train, inputs, labels = problem
    two = torch.tensor([[-0.4, 0.0], [-0.3, 0.2]], dtype=torch.float64)
    explanation = defenses.explain(model, train, two, torch.tensor([0, 0]), eps=0.8, bounds=None)
    assert explanation.scores.shape == (41, 2) and len(explanation.explained) == 2
    torch.testing.assert_close(explanation.aggregate_scores, explanation.scores.mean(1))
    exact = defenses.explain(model, train, two, torch.tensor([0, 0]), eps=0.8, bounds=None, method="if-exact",
                             damping=WEIGHT_DECAY)
    assert exact.per_input and exact.scores.shape == (41, 2)
    torch.testing.assert_close(exact.aggregate_scores, exact.scores.mean(1))
    pooled = defenses.explain(model, train, two, torch.tensor([0, 0]), eps=0.8, bounds=None, method="self")
    assert pooled.scores is None and all(entry["top"] is None for entry in pooled.explained)
    assert "gives one score per training sample over the set" in pooled.to_markdown()


def test_seeded(problem):
    model, train, _, _ = problem
    inputs, labels = torch.tensor([[-0.4, 0.0]], dtype=torch.float64), torch.tensor([0])
    first = defenses.explain(model, train, inputs, labels, attack=PGD(0.8, bounds=None, seed=3), seed=5)
    again = defenses.explain(model, train, inputs, labels, attack=PGD(0.8, bounds=None, seed=3), seed=5)
    assert first.to_dict() == again.to_dict() and torch.equal(first.adversarial, again.adversarial)


def _reference(tmp_path, entries):
    path = tmp_path / "lds_reference.json"
    path.write_text(json.dumps({"protocol": "per-example LDS, alpha 0.5", "source": "experiments/lds.py",
                                "entries": entries}))
    return path


ENTRY = {"data": "mnist", "model": "SmallCNN", "objective": "robust", "method": "ip", "models": 1, "lds": 0.087,
         "ci": [0.061, 0.113], "seeds": 3, "cost_vs_training": 0.31}


def test_lds_lookup_present_missing_and_not_measured(problem, tmp_path):
    path = _reference(tmp_path, [{**ENTRY, "objective": "utility", "lds": 0.098}, ENTRY,
                                 {**ENTRY, "method": "trak", "models": 10, "lds": 0.3},
                                 {**ENTRY, "method": "tracin", "lds": None}])
    trust = _explain(problem, lds_file=path).trust
    assert trust["measured"] and trust["lds"] == 0.087 and trust["ci"] == [0.061, 0.113]
    text = trust_text(trust)
    assert "+0.087" in text and "mnist + SmallCNN" in text and "3 seeds" in text
    assert "may differ" in text
    assert "+0.087" in _explain(problem, lds_file=path).to_markdown()

    unmeasured = defenses.lds_reference("trak", lds_file=path)  # only a 10-model ensemble was measured
    assert unmeasured == {"measured": False, "reason": f"no entry for method 'trak' on the robust objective "
                                                       f"(one model) in {path}"}
    assert trust_text(unmeasured).startswith("not measured")
    assert not defenses.lds_reference("tracin", lds_file=path)["measured"]  # an entry without a number
    missing = defenses.lds_reference("ip", lds_file=tmp_path / "absent.json")
    assert not missing["measured"] and "no benchmark file" in missing["reason"]
    assert "lds" not in missing
    bad = tmp_path / "bad.json"
    bad.write_text('{"entries": [["ip", 0.1]]}')
    with pytest.raises(ValueError, match="^lds_file: "):
        _explain(problem, lds_file=bad)


def test_lds_lookup_reads_the_package_data_file_by_default(monkeypatch):
    module = importlib.import_module("defenses.attribution")
    monkeypatch.setattr(module, "LDS_REFERENCE_FILE", "absent_reference.json")
    assert defenses.lds_reference("ip") == {
        "measured": False, "reason": "no benchmark file defenses/absent_reference.json; run experiments/lds.py"}


def test_lds_lookup_prefers_the_explained_model(tmp_path):
    path = _reference(tmp_path, [ENTRY, {**ENTRY, "data": "digits", "model": "MLP", "lds": 0.15}])
    assert defenses.lds_reference("ip", model="MLP", lds_file=path)["lds"] == 0.15
    assert defenses.lds_reference("ip", model="Linear", lds_file=path)["lds"] == 0.087


def test_files_written_png_for_images_tables_only_otherwise(problem, tmp_path):
    paths = defenses.write_explanation(_explain(problem), tmp_path / "flat")
    assert set(paths) == {"json", "markdown"} and not (tmp_path / "flat" / "explanation.png").exists()
    assert "not images: tables only" in paths["markdown"].read_text()
    assert json.loads(paths["json"].read_text())["explained"][0]["top"][0]["index"] == PLANTED

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2)).eval()
    g = torch.Generator().manual_seed(1)
    X, y = torch.rand(30, 1, 4, 4, generator=g), torch.randint(0, 2, (30,), generator=g)
    clean = model(X).argmax(1)
    images = defenses.explain(model, (X, y), X[:6], clean[:6], eps=0.5, top=3)
    paths = defenses.write_explanation(images, tmp_path / "images")
    png = paths["png"].read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert images.explained and all(len(e["top"]) == 3 for e in images.explained)


@pytest.mark.parametrize("keywords, error, message", [
    (dict(top=0), ValueError, "^top: "),
    (dict(method="nope"), ValueError, "^method: must be one of "),
    (dict(seed=-1), ValueError, "^seed: "),
    (dict(progress=1), TypeError, "^progress: "),
    (dict(attack="cw"), ValueError, "^attack: unknown name 'cw'"),
    (dict(attack=PGD(0.1), eps=0.2), ValueError, "^eps: only used with a named attack"),
    (dict(attack=3), TypeError, "^attack: expected a name or a callable"),
    (dict(options={}), TypeError, "^options: "),
    (dict(lds_file=3), TypeError, "^lds_file: "),
    (dict(ids=[0, 0, 1]), ValueError, r"^ids: must be 3 distinct integers, one per input, got \[0, 0, 1\]"),
    (dict(ids=[7, 8]), ValueError, "^ids: must be 3 distinct"),
    (dict(renorm=True), TypeError, "^method_options: method 'ip' does not accept"),
])
def test_bad_arguments_name_themselves(problem, keywords, error, message):
    model, train, inputs, labels = problem
    with pytest.raises(error, match=message):
        defenses.explain(model, train, inputs, labels, **keywords)


def test_bad_inputs_name_themselves(problem):
    model, train, inputs, labels = problem
    with pytest.raises(ValueError, match=r"^inputs: samples of shape \(3,\) do not match"):
        defenses.explain(model, train, torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2), bounds=None)
    with pytest.raises(ValueError, match="^inputs: X and y have different lengths"):
        defenses.explain(model, train, inputs, labels[:2])
    with pytest.raises(ValueError, match=r"^inputs: labels must lie in \[0, 1\]"):
        defenses.explain(model, train, inputs, torch.tensor([0, 5, 0]))
    with pytest.raises(TypeError, match="^train: "):
        defenses.explain(model, "data", inputs, labels)
    with pytest.raises(TypeError, match="^model: "):
        defenses.explain("model", train, inputs, labels)
