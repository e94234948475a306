"""Each analysis metric against a hand computation on a small constructed example."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from seqdpo.analysis import gradients as G
from seqdpo.analysis import likelihood as L
from seqdpo.analysis import movement as M
from seqdpo.analysis import pairs as P
from seqdpo.analysis import transfer as T
from seqdpo.analysis.diagnostics import job_analysis, report_tables, wandb_payload
from seqdpo.analysis.recorder import DiagnosticsRecorder

# ---------------------------------------------------------------------------------------- transfer


def test_transfer_two_stages_matches_gem_formulas():
    R = [[0.5, 0.5], [0.8, 0.6], [0.7, 0.9]]  # rows: base, after A, after B
    t = T.transfer_metrics(np.array(R), ["base", "A", "B"], ["A", "B"])
    assert t["BWT"] == pytest.approx(0.7 - 0.8)
    assert t["FWT"] == pytest.approx(0.6 - 0.5)
    assert t["forgetting"] == pytest.approx(0.1)
    assert t["ACC"] == pytest.approx(0.8)
    a, b = t["per_objective"]["A"], t["per_objective"]["B"]
    assert a["learning"] == pytest.approx(0.3) and b["learning"] == pytest.approx(0.3)
    assert a["forward"] is None and b["forward"] == pytest.approx(0.1)
    assert b["forgetting"] is None  # trained in the last stage: nothing after it
    assert a["delta_from_base"] == pytest.approx([0.0, 0.3, 0.2])


def test_transfer_three_stages_max_forgetting_and_untrained_objective():
    # stages: base, A, B, C; objective D is evaluated only
    R = np.array([
        [0.5, 0.5, 0.5, 0.5],
        [0.9, 0.4, 0.5, 0.6],
        [0.95, 0.8, 0.3, 0.6],
        [0.6, 0.7, 0.9, 0.55],
    ])
    t = T.transfer_metrics(R, ["base", "A", "B", "C"], ["A", "B", "C", "D"])
    a = t["per_objective"]["A"]
    assert a["forgetting"] == pytest.approx(0.9 - 0.6)
    assert a["forgetting_max"] == pytest.approx(0.95 - 0.6)  # Chaudhry: the best value after training
    assert t["BWT"] == pytest.approx(((0.6 - 0.9) + (0.7 - 0.8)) / 2)
    assert t["FWT"] == pytest.approx(((0.4 - 0.5) + (0.3 - 0.5)) / 2)
    assert t["ACC"] == pytest.approx((0.6 + 0.7 + 0.9) / 3)
    d = t["per_objective"]["D"]
    assert d["trained_in"] == [] and d["forward"] == pytest.approx(0.05) and d["learning"] is None


def test_transfer_repeated_objective_uses_its_last_stage_and_checks_shape():
    R = np.array([[0.0, 0.0], [1.0, 0.2], [0.5, 2.0], [3.0, 1.0]])
    t = T.transfer_metrics(R, ["base", "A", "B", "A"], ["A", "B"])
    assert t["per_objective"]["A"]["trained_in"] == [1, 3]
    assert t["per_objective"]["A"]["learning"] == pytest.approx(2.5)
    assert t["per_objective"]["B"]["forgetting"] == pytest.approx(1.0)
    assert t["BWT"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="does not match"):
        T.transfer_metrics(R, ["base", "A"], ["A", "B"])
    m = {"stages": ["base", "A", "B"], "objectives": ["A", "B"],
         "metrics": {"accuracy": [[0.5, 0.5], [1, 0.5], [0.5, 1]], "margin_mean": [[0, 0], [2, 1], [1, 3]]}}
    both = T.matrix_transfer(m)
    assert both["margin_mean"]["BWT"] == pytest.approx(-1.0) and both["accuracy"]["BWT"] == pytest.approx(-0.5)
    rows = T.transfer_rows(both)
    assert {"metric": "margin_mean", "objective": "B", "quantity": "forward", "value": 1.0} in rows


# ---------------------------------------------------------------------------------------- pairs


def _series(values, prefix="p"):
    return pd.Series(values, index=[f"{prefix}{i}" for i in range(len(values))], dtype=float)


def test_quartiles_known_fractions_flips_and_redistribution():
    before = _series([-1.5, -0.5, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0])
    # Q1 improves by 1, Q2/Q3 stay, Q4 degrades by 1: flat aggregate, pairs moving both ways.
    after = before + _series([1, 1, 0, 0.1, 0, -0.1, -1, -1])
    res = P.quartile_decomposition(before, after, threshold=0.5, tie_tolerance=0.0, min_fraction=0.2)
    q = {r["quartile"]: r for r in res["quartiles"]}
    assert [q[k]["n"] for k in P.QUARTILES] == [2, 2, 2, 2]
    assert q["Q1"]["frac_improved"] == 1.0 and q["Q1"]["delta_mean"] == pytest.approx(1.0)
    assert q["Q2"]["frac_stayed"] == 1.0 and q["Q3"]["frac_stayed"] == 1.0
    assert q["Q4"]["frac_degraded"] == 1.0 and q["Q4"]["delta_mean"] == pytest.approx(-1.0)
    assert q["Q1"]["flips_wrong_to_correct"] == 1  # -0.5 -> 0.5
    assert res["all"]["flips_correct_to_wrong"] == 0
    assert res["all"]["frac_improved"] == 0.25 and res["all"]["frac_degraded"] == 0.25
    assert res["all"]["delta_mean"] == pytest.approx(0.0)
    assert res["redistribution"] and res["q4_down_q1_up"]
    # The same movement all in one direction is not redistribution.
    res2 = P.quartile_decomposition(before, before - 1.0, threshold=0.5)
    assert not res2["redistribution"] and res2["all"]["frac_degraded"] == 1.0
    assert res2["all"]["flips_correct_to_wrong"] == 2  # 0.5 and 1.0 fall to <= 0


def test_quartile_assignment_ties_by_pair_id_and_uneven_sizes():
    v = pd.Series([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], index=["f", "e", "d", "c", "b", "a"])
    q = P.assign_quartiles(v)
    assert list(q.loc[["a", "b", "c", "d", "e", "f"]]) == ["Q1", "Q1", "Q2", "Q3", "Q3", "Q4"]


def test_pair_decomposition_from_table_uses_sd_threshold_and_joins_on_pair_id():
    rows = []
    before = [1.0, 2.0, 3.0, 4.0]
    after = [1.0, 2.5, 2.0, 4.0]
    for stage, vals in ((1, before), (2, after)):
        for i, v in enumerate(vals):
            rows.append({"stage": stage, "objective": "A", "pair_id": f"x{i}", "margin": v})
            rows.append({"stage": stage, "objective": "B", "pair_id": f"x{i}", "margin": 0.0})
    decomp = P.pair_decomposition(pd.DataFrame(rows), ["base", "A", "B"], "margin", stay_threshold=0.1)
    assert len(decomp) == 1  # B is trained last: nothing after it
    d = decomp[0]
    assert (d["objective"], d["from_stage"], d["to_stage"]) == ("A", 1, 2)
    assert d["threshold"] == pytest.approx(0.1 * np.std(before))
    assert d["all"]["frac_improved"] == 0.25 and d["all"]["frac_degraded"] == 0.25 and d["all"]["frac_stayed"] == 0.5
    flat = P.decomposition_rows(decomp)
    assert [r["quartile"] for r in flat] == ["Q1", "Q2", "Q3", "Q4", "all"]


# ---------------------------------------------------------------------------------------- gradients

Q0A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
Q0B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
V1A = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight"
D1B = "base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight"


def test_name_parsing():
    assert G.normalize_key(Q0A) == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert G.layer_of(Q0A) == "0" and G.module_type_of(Q0A) == "q"
    assert G.layer_of(D1B) == "1" and G.module_type_of(D1B) == "down"
    assert G.module_type_of(G.normalize_key(V1A)) == "v"


def test_grouped_cosine_known_vectors():
    g = {Q0A: torch.tensor([1.0, 0.0]), V1A: torch.tensor([0.0, 2.0])}
    h = {Q0A: torch.tensor([3.0, 0.0]), V1A: torch.tensor([0.0, -1.0])}
    res = G.grouped_cosine(g, h)
    # <g,h> = 3 - 2 = 1, |g| = sqrt(5), |h| = sqrt(10)
    assert res["total"] == pytest.approx(1 / math.sqrt(50))
    assert res["per_layer"] == pytest.approx({"0": 1.0, "1": -1.0})
    assert res["per_module"] == pytest.approx({"q": 1.0, "v": -1.0})
    assert G.cosine(g, g) == pytest.approx(1.0)
    assert math.isnan(G.cosine(g, {k: torch.zeros(2) for k in g}))
    al = G.update_alignment({k: -0.1 * v for k, v in g.items()}, g)  # a plain SGD step on g
    assert al["cos_update_neg_grad"] == pytest.approx(1.0)
    assert al["first_order_loss_change"] == pytest.approx(-0.1 * 5)


def test_objective_gradient_of_linear_losses_is_known_and_chunk_independent():
    params = {"w": torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))}
    feats = [{"c": [1.0, 0.0, 0.0]}, {"c": [0.0, 2.0, 0.0]}, {"c": [0.0, 0.0, 3.0]}]

    def loss(chunk):  # mean over the chunk of <c, w>: gradient = mean of the c's
        return torch.stack([torch.tensor(f["c"]) @ params["w"] for f in chunk]).mean()

    for chunk in (1, 2, 3):
        g = G.objective_gradient(loss, params, feats, chunk_size=chunk)
        assert torch.allclose(g["w"], torch.tensor([1 / 3, 2 / 3, 1.0]))


# ---------------------------------------------------------------------------------------- movement


def _state(A, B, name="base_model.model.model.layers.0.self_attn.q_proj"):
    return {f"{name}.lora_A.weight": torch.tensor(A, dtype=torch.float32), f"{name}.lora_B.weight": torch.tensor(B, dtype=torch.float32)}


def test_movement_known_norms():
    s0 = _state([[1.0, 0.0]], [[0.0], [0.0]])  # B = 0 at init
    s1 = _state([[1.0, 0.0]], [[2.0], [0.0]])
    mv = M.movement(s0, s1, scaling=2.0)
    assert mv["raw_norm"] == pytest.approx(2.0)
    # dW = 2 * [[2, 0], [0, 0]]
    assert mv["effective_norm"] == pytest.approx(4.0)
    assert mv["effective_per_module_type"] == pytest.approx({"q": 4.0})
    assert mv["effective_per_layer"] == pytest.approx({"0": 4.0})


def test_movement_matches_dense_computation_and_gauge_invariance():
    torch.manual_seed(0)
    mods = ["m.layers.0.self_attn.q_proj", "m.layers.1.mlp.up_proj"]

    def rand_state():
        s = {}
        for m in mods:
            s.update(_state(torch.randn(3, 5).tolist(), torch.randn(4, 3).tolist(), m))
        return s

    s0, s1, s2 = rand_state(), rand_state(), rand_state()
    W = lambda s, m: 0.5 * s[f"{m}.lora_B.weight"] @ s[f"{m}.lora_A.weight"]  # noqa: E731
    d1 = {m: W(s1, m) - W(s0, m) for m in mods}
    d2 = {m: W(s2, m) - W(s1, m) for m in mods}
    mv = M.movement(s1, s2, scaling=0.5)
    assert mv["effective_norm"] == pytest.approx(math.sqrt(sum(float((d ** 2).sum()) for d in d2.values())), rel=1e-5)
    assert mv["effective_norm_sum"] == pytest.approx(sum(float(torch.linalg.norm(d)) for d in d2.values()), rel=1e-5)
    cos = M.movement_cosine(s0, s1, s2, scaling=0.5)
    dense = sum(float((d1[m] * d2[m]).sum()) for m in mods) / (
        math.sqrt(sum(float((d ** 2).sum()) for d in d1.values())) * math.sqrt(sum(float((d ** 2).sum()) for d in d2.values()))
    )
    assert cos["effective_cosine"] == pytest.approx(dense, rel=1e-5)
    flat = lambda a, b: torch.cat([(b[k] - a[k]).flatten() for k in sorted(a)])  # noqa: E731
    assert cos["raw_cosine"] == pytest.approx(float(torch.nn.functional.cosine_similarity(flat(s0, s1), flat(s1, s2), dim=0)), rel=1e-5)
    # B A = (B G)(G^-1 A): the raw parameters move, the effective weight does not.
    Gm = torch.tensor([[2.0, 0, 0], [0, 0.5, 0], [0, 0, 1.0]])
    s3 = {}
    for m in mods:
        s3[f"{m}.lora_A.weight"] = torch.linalg.inv(Gm) @ s2[f"{m}.lora_A.weight"]
        s3[f"{m}.lora_B.weight"] = s2[f"{m}.lora_B.weight"] @ Gm
    mv = M.movement(s2, s3, scaling=0.5)
    assert mv["raw_norm"] > 0.1 and mv["effective_norm"] < 1e-4


def test_movement_cosine_of_undone_update_is_minus_one():
    s0 = _state([[1.0, 0.0]], [[0.0], [0.0]])
    s1 = _state([[1.0, 0.0]], [[1.0], [1.0]])
    cos = M.movement_cosine(s0, s1, s0, scaling=1.0)
    assert cos["effective_cosine"] == pytest.approx(-1.0) and cos["raw_cosine"] == pytest.approx(-1.0)


# ---------------------------------------------------------------------------------------- likelihood


def _pair_rows(stage, obj, d_chosen, d_rejected, n=4, length=10):
    return [
        {"stage": stage, "objective": obj, "pair_id": f"{obj}{i}",
         "policy_chosen_logps": -20.0 + d_chosen, "ref_chosen_logps": -20.0,
         "policy_rejected_logps": -30.0 + d_rejected, "ref_rejected_logps": -30.0,
         "chosen_len": length, "rejected_len": length}
        for i in range(n)
    ]


def test_likelihood_labels_and_untrained_dispersion():
    df = pd.DataFrame(_pair_rows(1, "A", -1.0, -5.0) + _pair_rows(1, "B", 2.0, 1.0)
                      + _pair_rows(2, "A", 1.0, -1.0) + _pair_rows(2, "B", 0.0, 0.0))
    rows = {(r["stage"], r["objective"]): r for r in L.likelihood_shifts(df, ["base", "A", "B"])}
    a1 = rows[(1, "A")]
    assert a1["d_chosen"] == pytest.approx(-1.0) and a1["d_rejected_tok"] == pytest.approx(-0.5)
    assert a1["drop_share"] == pytest.approx(5 / 6)
    assert a1["suppression"] and a1["drastic_drop"] and a1["regime"] == "suppression"
    assert a1["frac_chosen_down"] == 1.0
    b1 = rows[(1, "B")]
    assert not b1["trained"] and b1["regime"] == "both_up" and not b1["drastic_drop"]
    a2 = rows[(2, "A")]
    assert a2["regime"] == "separation" and not a2["suppression"] and not a2["drastic_drop"]  # share 1/2
    assert rows[(2, "B")]["regime"] == "flat" and rows[(2, "B")]["trained"]
    disp = L.untrained_dispersion(list(rows.values()))
    assert disp[1] == pytest.approx((0.2 + 0.1) / 2) and disp[2] is None


def test_offprompt_features_shift_and_truncate():
    rows = [{"pair_id": f"p{i}", "prompt_ids": [i] * 3, "chosen_ids": [10 + i] * 4, "rejected_ids": [20 + i] * 2} for i in range(3)]
    f = L.offprompt_features(rows, max_length=5)
    assert f[0]["prompt_ids"] == [0, 0, 0] and f[0]["chosen_ids"] == [11, 11] and f[0]["rejected_ids"] == [21, 21]
    assert f[2]["chosen_ids"] == [10, 10] and f[2]["pair_id"] == "p2<-p0"
    with pytest.raises(ValueError):
        L.offprompt_features(rows[:1])
    pol = {"chosen_logps": np.array([-8.0, -6.0]), "rejected_logps": np.array([-10.0, -10.0]),
           "chosen_len": np.array([2, 2]), "rejected_len": np.array([4, 4])}
    base = {"chosen_logps": np.array([-10.0, -10.0]), "rejected_logps": np.array([-10.0, -12.0]),
            "chosen_len": np.array([2, 2]), "rejected_len": np.array([4, 4])}
    s = L.dispersion_summary(pol, base)
    assert s["d_logp"] == pytest.approx((2 + 4 + 0 + 2) / 4)
    assert s["d_logp_tok"] == pytest.approx((1 + 2 + 0 + 0.5) / 4)
    assert s["frac_up"] == 0.75


# ---------------------------------------------------------------------------------------- recorder


class _Lora(torch.nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 1, bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(1, 2, bias=False)})
        with torch.no_grad():
            self.lora_A["default"].weight.copy_(torch.tensor([a]))
            self.lora_B["default"].weight.copy_(torch.tensor(b))


class _Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = _Lora([1.0, 0.0], [[0.0], [0.0]])
        self.v_proj = _Lora([0.0, 1.0], [[0.0], [0.0]])


class _FakeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Layer()])


class _FakeTrainer:
    """batch_loss = mean over features of <c, theta>: the gradient of an objective is its c vector."""

    def __init__(self):
        self.model = _FakeModel()
        self.callbacks = []

    def params(self):
        return [p for _, p in sorted(self.model.named_parameters())]

    def batch_loss(self, features):
        theta = torch.cat([p.flatten() for p in self.params()])
        return torch.stack([torch.tensor(f["c"], dtype=torch.float32) @ theta for f in features]).mean()

    def add_callback(self, cb):
        self.callbacks.append(cb)

    def remove_callback(self, cb):
        self.callbacks.remove(cb)


def _recorder(out, objs, **diag):
    """A recorder of a two-stage job (objectives A then B) with a rank-1 adapter at alpha 2."""
    from seqdpo.config import DiagnosticsConfig, EvalConfig, ModelConfig

    return DiagnosticsRecorder(DiagnosticsConfig(**diag), out, objs, stage_objectives=["A", "B"], lora_scaling=2.0,
                               max_length=ModelConfig.max_length, batch_size=EvalConfig.batch_size,
                               tie_tolerance=EvalConfig.tie_tolerance)


def test_recorder_hooks_on_a_linear_model(tmp_path):
    # Parameter order (sorted names): q.A(2), q.B(2), v.A(2), v.B(2). A's loss only touches q.B, B's
    # loss touches q.B (against A) and v.B.
    cA = [0, 0, 1, 0, 0, 0, 0, 0]
    cB = [0, 0, -1, 0, 0, 0, 1, 0]
    objs = {"A": [{"c": cA}] * 2, "B": [{"c": cB}] * 2}
    rec = _recorder(tmp_path, objs, likelihood=False, probe_pairs=2)
    tr = _FakeTrainer()
    rec.on_stage_start(1, tr)
    with torch.no_grad():  # "train" stage 1: one SGD step of size 1 on A's loss
        tr.model.layers[0].q_proj.lora_B["default"].weight -= torch.tensor([[1.0], [0.0]])
    d1 = rec.on_stage_end(1, tr)
    # A and B gradients: cos = -1 / sqrt(2) overall; q only: -1; v: A has no v gradient -> NaN -> None
    c = d1["grad_cosine"]["A__B"]
    assert c["total"] == pytest.approx(-1 / math.sqrt(2)) and c["per_module"]["q"] == pytest.approx(-1.0)
    assert c["per_module"]["v"] is None and c["earlier"] is False
    assert d1["movement"]["raw_norm"] == pytest.approx(1.0)
    # dW_q = (alpha/r) * B A = 2 * [[-1], [0]] @ [[1, 0]]: Frobenius 2
    assert d1["movement"]["effective_norm"] == pytest.approx(2.0)
    assert d1["update_alignment"]["A"]["cos_update_neg_grad"] == pytest.approx(1.0)
    assert d1["update_alignment"]["B"]["cos_update_neg_grad"] == pytest.approx(-1 / math.sqrt(2))
    json.dumps(d1)  # the runner writes it as JSON

    rec.on_stage_start(2, tr)
    with torch.no_grad():  # stage 2 undoes stage 1 and moves v
        tr.model.layers[0].q_proj.lora_B["default"].weight += torch.tensor([[1.0], [0.0]])
        tr.model.layers[0].v_proj.lora_B["default"].weight -= torch.tensor([[0.0], [1.0]])
    d2 = rec.on_stage_end(2, tr)
    assert d2["grad_cosine"]["B__A"]["earlier"] is True
    mc = d2["movement_cosine"]["stage_1"]
    # stage-1 dW lives in q only, stage-2 dW is -dW1 in q plus a v part of the same size
    assert mc["effective_cosine"] == pytest.approx(-1 / math.sqrt(2))
    assert mc["effective_cosine_per_module_type"]["q"] == pytest.approx(-1.0)
    payload = wandb_payload(d2)
    assert payload["diag/grad_cosine/B__A/total"] == pytest.approx(-1 / math.sqrt(2))
    assert payload["diag/movement_cosine/stage_1/effective_cosine"] == pytest.approx(-1 / math.sqrt(2))
    assert not any("per_module/" in k and "lora" in k for k in payload)


def test_recorder_traces_cosines_at_points_spread_over_the_stage(tmp_path):
    pytest.importorskip("transformers")
    # B's two blocks disagree on v: its split-half cosine is cos([0,0,1,0,0,0,1,0], [0,0,1,0,0,0,-1,0]) = 0, so its
    # reliability 2 f / (1 + f) is 0 and the disattenuated cosine is withheld
    objs = {"A": [{"c": [0, 0, 1, 0, 0, 0, 0, 0]}] * 2, "B": [{"c": [0, 0, 1, 0, 0, 0, 1, 0]}, {"c": [0, 0, 1, 0, 0, 0, -1, 0]}]}
    rec = _recorder(tmp_path, objs, likelihood=False, grad_cosine_points=3, probe_pairs=2, probe_blocks=2)
    tr = _FakeTrainer()
    rec.on_stage_start(1, tr)
    (cb,) = tr.callbacks
    state = type("S", (), {})()
    state.max_steps = 4
    cb.on_train_begin(None, state, None)
    for step in (1, 2, 3, 4):
        state.global_step = step
        cb.on_step_end(None, state, None)
    tr.state = state
    d = rec.on_stage_end(1, tr)
    trace = d["grad_cosine_trace"]
    assert [p["step"] for p in trace] == [0, 2, 4] and [p["progress"] for p in trace] == [0.0, 0.5, 1.0]
    ab = trace[1]["grad_cosine"]["A__B"]
    assert ab["total"] == pytest.approx(1.0)  # B's mean gradient is [0,0,1,0,...]: A's direction
    assert ab["reliability"] == {"A": pytest.approx(1.0), "B": pytest.approx(0.0)}
    assert ab["corrected"] is None and ab["corrected_status"] == "unreliable"
    assert ab["ci_low"] <= ab["total"] <= ab["ci_high"] == 1.0
    assert tr.callbacks == []
    # every point is on disk as it is taken: a resumed stage keeps them
    lines = (tmp_path / "stage_1" / "grad_cosine_trace.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 2, 4]
def test_job_analysis_and_tables():
    rows = []
    for stage, (ma, mb) in enumerate([(0.0, 0.0), (2.0, 0.5), (1.0, 3.0)]):
        for r in _pair_rows(stage, "A", ma, 0.0) + _pair_rows(stage, "B", mb, 0.0):
            r["margin"] = 0.3 * (r["policy_chosen_logps"] - r["ref_chosen_logps"])
            r["norm_margin"] = r["margin"]
            rows.append(r)
    df = pd.DataFrame(rows)
    matrix = {"stages": ["base", "A", "B"], "objectives": ["A", "B"],
              "metrics": {"accuracy": [[0.5, 0.5], [1, 1], [1, 1]], "margin_mean": [[0, 0], [0.6, 0.15], [0.3, 0.9]]}}
    out = job_analysis(df, matrix)
    assert out["transfer"]["margin_mean"]["BWT"] == pytest.approx(-0.3)
    q = [d for d in out["quartiles"] if d["column"] == "margin"][0]
    assert q["all"]["delta_mean"] == pytest.approx(-0.3) and q["all"]["frac_degraded"] == 1.0
    tables = report_tables({**out, "stages": {"1": {"grad_cosine": {"A__B": {"total": 0.5, "per_layer": {"0": 0.4}}}}}})
    assert set(tables) == {"transfer", "quartiles", "likelihood", "grad_cosine"}
    assert list(tables["grad_cosine"]["group"]) == ["total", "layer:0"]


def test_probe_gram_cosine_reliability_and_interval_on_a_known_case():
    from seqdpo.analysis import gradient_probes as GP
    from seqdpo.analysis.gradients import cosine

    gen = torch.Generator().manual_seed(0)
    u = torch.randn(50, generator=gen)

    def blocks(sign, noise, k=8):
        return [{"layers.0.q_proj.lora_B.weight": sign * u + noise * torch.randn(50, generator=gen)} for _ in range(k)]

    sizes = {"A": np.full(8, 8.0), "B": np.full(8, 8.0), "C": np.full(8, 8.0)}
    grads = {"A": blocks(1, 0.1), "B": blocks(-1, 0.1), "C": blocks(1, 30.0)}
    gram = GP.ProbeGram(grads, sizes, per_group=True)
    means = {n: GP.mean_gradient(g, sizes[n]) for n, g in grads.items()}
    assert gram.cosine("A", "B") == pytest.approx(cosine(means["A"], means["B"]), abs=1e-9)
    assert gram.cosine("A", "B", "module:q") == pytest.approx(gram.cosine("A", "B"))
    assert gram.norm("A") == pytest.approx(float(means["A"]["layers.0.q_proj.lora_B.weight"].norm()), rel=1e-6)
    # low noise: halves agree (reliability near 1) and the interval is tight around -1; noise 30x the signal: near 0
    assert gram.reliability("A") > 0.99 and abs(gram.reliability("C")) < 0.5
    assert gram.reliability("A") == pytest.approx(2 * gram.split_half("A") / (1 + gram.split_half("A")))
    lo, hi = gram.interval("A", "B")
    assert -1.0 <= lo <= gram.cosine("A", "B") <= hi < -0.99
    lo_c, hi_c = gram.interval("A", "C")
    assert lo_c <= gram.cosine("A", "C") <= hi_c and hi_c - lo_c > 0.3
    out = GP.pair_cosines(gram, "A", {"B"}, 0.5, per_group=True)
    assert set(out) == {"A__B", "A__C"} and out["A__B"]["earlier"] and not out["A__C"]["earlier"]
    assert out["A__B"]["per_module"]["q"] == pytest.approx(out["A__B"]["total"])


def test_disattenuated_cosine_is_bounded_and_withheld_when_unreliable():
    from seqdpo.analysis.gradient_probes import corrected

    # |cos| / sqrt(r_a r_b) = 0.9 / 0.6 = 1.5 > 1: the noisy reliabilities overshoot; bounded and flagged
    assert corrected(0.9, 0.6, 0.6, 0.5) == (1.0, "clipped")
    assert corrected(-0.9, 0.6, 0.6, 0.5) == (-1.0, "clipped")
    assert corrected(0.3, 0.6, 0.6, 0.5) == (pytest.approx(0.5), "ok")
    # a reliability below the threshold (or none: fewer than 2 blocks) suppresses it, whatever the cosine
    assert corrected(0.3, 0.6, 0.4, 0.5) == (None, "unreliable")
    assert corrected(0.3, 0.6, 0.4, 0.3) == (pytest.approx(0.3 / math.sqrt(0.24)), "ok")
    assert corrected(0.3, None, 0.9, 0.5) == (None, "unreliable")
    assert corrected(float("nan"), 0.9, 0.9, 0.5) == (None, "unreliable")


def test_probe_with_a_noisy_objective_withholds_its_disattenuated_cosine():
    from seqdpo.analysis import gradient_probes as GP

    rng = np.random.default_rng(3)
    u = rng.standard_normal(200)
    # A: signal only; C: noise 10x the signal per block. A cross cosine exists; its disattenuation does not.
    grads = {"A": [{"w": torch.tensor(u + 0.01 * rng.standard_normal(200))} for _ in range(8)],
             "C": [{"w": torch.tensor(u + 10 * rng.standard_normal(200))} for _ in range(8)]}
    gram = GP.ProbeGram(grads, {"A": np.ones(8), "C": np.ones(8)})
    out = GP.pair_cosines(gram, "A", set(), 0.5)["A__C"]
    assert out["reliability"]["C"] < 0.5 and math.isfinite(out["total"])
    assert out["corrected"] is None and out["corrected_status"] == "unreliable"
    assert GP.pair_cosines(gram, "A", set(), out["reliability"]["C"] / 2)["A__C"]["corrected_status"] in ("ok", "clipped")


def test_trace_steps_spread_over_the_stage():
    from seqdpo.analysis.gradient_probes import trace_steps

    assert trace_steps(32, 5) == [0, 8, 16, 24, 32]
    assert trace_steps(3, 5) == [0, 1, 2, 3]
    assert trace_steps(32, 1) == [0]


def test_jackknife_interval_covers_the_true_cosine():
    from seqdpo.analysis import gradient_probes as GP

    rng = np.random.default_rng(0)
    d, k = 400, 8
    u = rng.standard_normal(d)
    w = rng.standard_normal(d)
    w -= (w @ u) / (u @ u) * u
    v = -0.5 * u / np.linalg.norm(u) + math.sqrt(0.75) * w / np.linalg.norm(w)  # cos(u, v) = -0.5 exactly
    v *= np.linalg.norm(u)
    # Noise of norm^2 4 |u|^2 per block, |u|^2 / 2 over 8 blocks: the expected cosine is shrunk by 1 / 1.5
    shrunk = -0.5 / 1.5
    covered, corrected, reliabilities = 0, [], []
    for _ in range(200):
        grads = {n: [{"w": torch.tensor(c + 2.0 * rng.standard_normal(d))} for _ in range(k)] for n, c in (("A", u), ("B", v))}
        gram = GP.ProbeGram(grads, {"A": np.ones(k), "B": np.ones(k)})
        lo, hi = gram.interval("A", "B")
        covered += lo <= shrunk <= hi
        out = GP.pair_cosines(gram, "A", set(), 0.5)["A__B"]
        assert out["corrected_status"] == "ok"
        corrected.append(out["corrected"])
        reliabilities.append(out["reliability"]["A"])
    assert 0.88 <= covered / 200 <= 1.0
    # halves: noise |u|^2 against signal |u|^2 (split-half 0.5); the full probe: |u|^2 / 2, reliability 2/3
    assert np.mean(reliabilities) == pytest.approx(2 / 3, abs=0.05)
    assert np.mean(corrected) == pytest.approx(-0.5, abs=0.03)  # the attenuation correction recovers the truth
