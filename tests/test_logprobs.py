"""The fast log-prob path (every batch layout, LM head on scored positions only) against TRL 1.16's code.

The model runs in float64 on CPU; the LM head (TRL's kernel, and seqdpo's CPU path) accumulates in
float32, so sums of ~100 nats agree to float32 rounding of the summation order: checked to 1e-5 abs.
One test repeats the comparison with the model in float32.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
import torch

from seqdpo import logprobs as lp
from seqdpo.config import LoraSettings, ModelConfig
from seqdpo.modeling import load_model_and_tokenizer, make_lora_config
from seqdpo.packing import PACKINGS

ATOL = 1e-5
MAX_LENGTH = 20  # short enough that many completions are truncated, and one prompt is dropped


def _rows(n: int, seed: int = 0) -> dict[str, list]:
    rng = random.Random(seed)
    words = ["apples", "rivers", "tea", "please", "thanks", "it", "is", "a", "thing", "bread", "music"]
    rows = {"pair_id": [], "prompt": [], "chosen": [], "rejected": []}
    for i in range(n):
        n_prompt = 30 if i == 3 else rng.randint(1, 6)  # row 3: prompt alone exceeds MAX_LENGTH -> dropped
        say = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
        rows["pair_id"].append(f"p{i}")
        rows["prompt"].append([{"role": "user", "content": say(n_prompt)}])
        rows["chosen"].append([{"role": "assistant", "content": say(rng.randint(1, 12))}])
        rows["rejected"].append([{"role": "assistant", "content": say(rng.randint(1, 12))}])
    return rows


@pytest.fixture(scope="module")
def setup():
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tok = load_model_and_tokenizer(ModelConfig(name="tiny"))
    model = model.to(torch.float64)
    ds = Dataset.from_dict(_rows(14))
    args = DPOConfig(
        output_dir="/tmp/seqdpo-test-logprobs",
        per_device_train_batch_size=4,
        max_length=MAX_LENGTH,
        report_to="none",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        save_strategy="no",
    )
    lora = make_lora_config(LoraSettings(dropout=0.0))
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
    trainer.model.eval()
    return trainer, tok, ds


def _randomise_adapter(peft_model, seed: int) -> None:
    # a "trained" adapter: LoRA B is zero at init, which would make policy == base
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)


def test_tokenize_pairs_matches_trl(setup):
    trainer, tok, ds = setup
    ours = lp.tokenize_pairs(ds, tok, MAX_LENGTH)
    theirs = trainer.train_dataset
    assert ours["pair_id"] == theirs["pair_id"]
    assert "p3" not in ours["pair_id"] and len(ours) == len(ds) - 1
    assert ours["prompt_ids"] == theirs["prompt_ids"]
    # TRL truncates in the collator; ours is stored truncated: the collated sequences must be the same
    feats = [theirs[i] for i in range(len(theirs))]
    trl_batch = trainer.data_collator(feats)
    ours_batch = lp.PairCollator(packing="padded", pad_token_id=tok.pad_token_id)([ours[i] for i in range(len(ours))])
    width = trl_batch["input_ids"].shape[1]
    assert torch.equal(ours_batch["input_ids"][:, :width], trl_batch["input_ids"])
    assert torch.equal(ours_batch["completion_mask"][:, :width], trl_batch["completion_mask"])
    truncated = [len(p) + len(c) for p, c in zip(theirs["prompt_ids"], theirs["chosen_ids"])]
    assert max(truncated) > MAX_LENGTH, "the data must exercise truncation"


@pytest.mark.parametrize("packing", PACKINGS)
def test_base_reference_matches_trl(setup, packing):
    trainer, tok, _ = setup
    feats = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    ref_c, ref_r = trainer.compute_ref_log_probs(trainer.model, trainer.data_collator(feats))
    with trainer.model.disable_adapter():
        ours = lp.sequence_logps(trainer.model, lp.PairCollator(packing=packing, max_length=MAX_LENGTH)(feats))
    np.testing.assert_allclose(ours["chosen_logps"].numpy(), ref_c.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(ours["rejected_logps"].numpy(), ref_r.numpy(), rtol=0, atol=ATOL)
    trl_mask = trainer.data_collator(feats)["completion_mask"][:, 1:].sum(1)
    assert torch.equal(torch.cat([ours["chosen_len"], ours["rejected_len"]]), trl_mask)


@pytest.mark.parametrize("packing", PACKINGS)
def test_trained_adapter_and_gradients_match_trl(setup, packing):
    """The "previous" reference and the policy: TRL scores a stored copy named "ref"; we score the adapter
    as it stands. Gradients of every layout equal those of TRL's fused forward."""
    trainer, tok, _ = setup
    model = trainer.model
    _randomise_adapter(model, seed=1)
    model.add_adapter("ref", make_lora_config(LoraSettings(dropout=0.0)))
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, p in params.items():
            if ".ref." in name:
                p.copy_(params[name.replace(".ref.", ".default.")])
    model.set_adapter("default")
    try:
        feats = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
        trl_batch = trainer.data_collator(feats)
        ref_c, ref_r = trainer.compute_ref_log_probs(model, trl_batch)
        ours = lp.sequence_logps(model, lp.PairCollator(packing=packing, max_length=MAX_LENGTH)(feats))
        np.testing.assert_allclose(ours["chosen_logps"].detach().numpy(), ref_c.numpy(), rtol=0, atol=ATOL)
        np.testing.assert_allclose(ours["rejected_logps"].detach().numpy(), ref_r.numpy(), rtol=0, atol=ATOL)
        with torch.no_grad(), model.disable_adapter():
            base = lp.sequence_logps(model, lp.PairCollator(packing=packing, max_length=MAX_LENGTH)(feats))
        assert (base["chosen_logps"] - ours["chosen_logps"]).abs().max() > 1e-3, "adapter must change the log-probs"

        weights = torch.linspace(0.5, 1.5, len(feats), dtype=torch.float64)
        trainable = [p for p in model.parameters() if p.requires_grad]
        model.zero_grad()
        ((ours["chosen_logps"] - 0.7 * ours["rejected_logps"]) * weights).sum().backward()
        g_ours = [p.grad.clone() for p in trainable]
        model.zero_grad()
        labels = trl_batch["input_ids"].masked_fill(trl_batch["completion_mask"] == 0, -100)
        out = model(
            input_ids=trl_batch["input_ids"],
            attention_mask=trl_batch["attention_mask"],
            labels=labels,
            fused_lm_head=True,
            use_cache=False,
        )
        c, r = out.log_probs.sum(1).chunk(2)
        ((c - 0.7 * r) * weights).sum().backward()
        for a, p in zip(g_ours, trainable):
            # The LM head's logits gradient is float32 in both, but made in another order (TRL's kernel
            # recomputes the logits, seqdpo's CPU path keeps them; shared_prompt also sums the two
            # gradients of the prompt's last position in one hidden state): equal to float32 rounding
            # of the largest entry
            torch.testing.assert_close(a, p.grad, rtol=1e-7, atol=1e-6 * float(p.grad.abs().max()))
        model.zero_grad()
    finally:
        model.set_adapter("default")
        model.delete_adapter("ref")


@pytest.mark.parametrize("packing", PACKINGS)
def test_dataset_logps_row_order_and_batching(setup, packing):
    trainer, tok, ds = setup
    tds = lp.tokenize_pairs(ds, tok, MAX_LENGTH)
    with trainer.model.disable_adapter():
        full = lp.dataset_logps(trainer.model, tds, batch_size=3, desc="test", packing=packing, show_progress=False)
        tiny = lp.dataset_logps(
            trainer.model, tds, batch_size=1, desc="test", max_tokens=10, packing=packing, show_progress=False
        )
        feats = [tds[i] for i in range(len(tds))]
        one = lp.sequence_logps(trainer.model, lp.PairCollator(packing="pair")(feats))
    for key in ("chosen_logps", "rejected_logps"):
        np.testing.assert_allclose(full[key], one[key].numpy(), rtol=0, atol=ATOL)
        np.testing.assert_allclose(tiny[key], one[key].numpy(), rtol=0, atol=ATOL)
    assert np.array_equal(full["chosen_len"], one["chosen_len"].numpy())
    assert full["chosen_logps"].dtype == np.float64 and full["chosen_len"].dtype == np.int64


def test_float32_layouts_match_trl(setup):
    """The model in float32, as the tiny default runs: every layout against TRL, base and trained adapter."""
    import copy

    trainer, tok, _ = setup
    model = copy.deepcopy(trainer.model).to(torch.float32)
    _randomise_adapter(model, seed=2)
    feats = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(feats)
    with torch.no_grad():
        for adapter in (False, True):
            with model.disable_adapter() if not adapter else contextlib.nullcontext():
                ref_c, ref_r = trainer.compute_ref_log_probs(model, batch)
                for packing in PACKINGS:
                    ours = lp.sequence_logps(model, lp.PairCollator(packing=packing, max_length=MAX_LENGTH)(feats))
                    np.testing.assert_allclose(ours["chosen_logps"].numpy(), ref_c.numpy(), rtol=0, atol=1e-4)
                    np.testing.assert_allclose(ours["rejected_logps"].numpy(), ref_r.numpy(), rtol=0, atol=1e-4)


def test_layouts_agree_on_pairs_of_one_length(setup):
    """Equal lengths take the row-per-pair shortcut in shared_prompt and the rectangle in pair."""
    trainer, _, _ = setup
    feats = [
        {"prompt_ids": f["prompt_ids"][:2], "chosen_ids": f["chosen_ids"][:3], "rejected_ids": f["rejected_ids"][:3]}
        for f in (trainer.train_dataset[i] for i in range(len(trainer.train_dataset)))
        if len(f["prompt_ids"]) >= 2 and min(len(f["chosen_ids"]), len(f["rejected_ids"])) >= 3
    ]
    assert len(feats) >= 3
    with torch.no_grad():
        got = {p: lp.sequence_logps(trainer.model, lp.PairCollator(packing=p)(feats)) for p in PACKINGS}
    assert got["shared_prompt"]["chosen_logps"].shape == (len(feats),)
    for p in ("shared_prompt", "pair"):
        for key in ("chosen_logps", "rejected_logps"):
            np.testing.assert_allclose(got[p][key].numpy(), got["padded"][key].numpy(), rtol=0, atol=ATOL)


def test_pair_layout_never_crosses_sequences_and_passes_reference_columns():
    feats = [
        {"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9], "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.5},
        {"prompt_ids": [10], "chosen_ids": [11, 12], "rejected_ids": [13], "ref_chosen_logps": -3.0, "ref_rejected_logps": -4.0},
    ]
    b = lp.PairCollator(packing="pair")(feats)
    assert b["input_ids"].tolist() == [[5, 6, 7, 10, 11, 12, 5, 6, 8, 9, 10, 13]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 0, 1]]
    # (position, token it scores, sequence): chosen 0, 1 then rejected 2, 3
    assert list(zip(b["score_pos"].tolist(), b["score_target"].tolist(), b["score_seq"].tolist())) == [
        (1, 7, 0), (3, 11, 1), (4, 12, 1), (7, 8, 2), (8, 9, 2), (10, 13, 3),
    ]
    assert b["ref_chosen_logps"].tolist() == [-1.5, -3.0] and b["ref_rejected_logps"].tolist() == [-2.5, -4.0]
    # a prompt-less row: its first completion token has no context inside the sequence and is not scored
    b = lp.PairCollator(packing="pair")([{"prompt_ids": [], "chosen_ids": [3, 4], "rejected_ids": [5]}])
    assert b["score_pos"].tolist() == [0] and b["score_target"].tolist() == [4]


def test_shared_prompt_layout_and_mask():
    from seqdpo.packing import attention_mask_4d

    feats = [
        {"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9]},
        {"prompt_ids": [10], "chosen_ids": [11, 12], "rejected_ids": [13]},
    ]
    b = lp.PairCollator(packing="shared_prompt", pad_to_multiple_of=4)(feats)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 0, 0, 0]]
    # rejected continues from the prompt's end, as if chosen were not there
    assert b["position_ids"].tolist() == [[0, 1, 2, 2, 3, 0, 1, 2, 1, 0, 1, 2]]
    # the prompt's last position (1, then 5) scores the first token of both chosen and rejected
    assert list(zip(b["score_pos"].tolist(), b["score_target"].tolist(), b["score_seq"].tolist())) == [
        (1, 7, 0), (1, 8, 2), (3, 9, 2), (5, 11, 1), (6, 12, 1), (5, 13, 3),
    ]
    m = attention_mask_4d(b["pair_index"], b["branch"], "sdpa", torch.float32)[0, 0]
    sees = {q: [k for k in range(12) if m[q, k]] for q in range(12)}
    assert sees[2] == [0, 1, 2]  # chosen: the prompt and itself
    assert sees[4] == [0, 1, 3, 4]  # rejected: the prompt and itself, never chosen
    assert sees[7] == [5, 6, 7] and sees[8] == [5, 8]  # the second pair sees nothing of the first
    assert sees[9] == [9] and sees[11] == [9, 10, 11]  # padding stays among itself
    eager = attention_mask_4d(b["pair_index"], b["branch"], "eager", torch.float32)[0, 0]
    assert torch.equal(eager == 0, m)
    # pairs of one length: one row each, the same scores
    same = [{"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9]}, {"prompt_ids": [10], "chosen_ids": [11, 12], "rejected_ids": [13, 14]}]
    r = lp.PairCollator(packing="shared_prompt")(same)
    assert r["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    assert r["position_ids"].tolist() == [[0, 1, 2, 2, 3], [0, 1, 2, 1, 2]]
    assert r["score_pos"].tolist() == [1, 1, 3, 5, 6, 5, 8]
    m = attention_mask_4d(r["pair_index"], r["branch"], "sdpa", torch.float32)
    assert m.shape == (2, 1, 5, 5) and m[0, 0, 4].tolist() == [True, True, False, True, True]
    with pytest.raises(ValueError, match="model.packing=pair"):
        attention_mask_4d(b["pair_index"], b["branch"], "flash_attention_2", torch.float32)
    with pytest.raises(ValueError, match="packing 'tree'"):
        lp.PairCollator(packing="tree")


@pytest.mark.parametrize("scaling", [{}, {"final_logit_softcapping": 3.0}, {"logit_scale": 0.5}])
@pytest.mark.parametrize("wrapped", [False, True])
def test_cpu_lm_head_matches_trl_kernel(scaling, wrapped):
    """The CPU LM head (token tiles, logits held for the backward) gives TRL's kernel's log-probs and
    hidden-state gradients, with the logit scalings TRL applies, for a plain Linear head and a wrapped
    one (which used to ignore softcapping)."""
    from trl.kernels import ChunkedLogProbFunction

    model, _ = load_model_and_tokenizer(ModelConfig(name="tiny"))
    for key, value in scaling.items():
        setattr(model.config, key, value)
    head = model.get_output_embeddings()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g))  # logits of ~10: softcap 3 bites
    n = 1500  # more than one token tile of lp._CPU_TILE_ELEMENTS below
    hidden = torch.randn(n, head.in_features, generator=g)
    targets = torch.randint(0, head.out_features, (n,), generator=g)
    grad_out = torch.randn(n, generator=g)

    h_trl = hidden.clone().requires_grad_()
    want, *_ = ChunkedLogProbFunction.apply(
        h_trl, head.weight, None, targets, 1.0, 256, scaling.get("final_logit_softcapping"),
        scaling.get("logit_scale", 1.0), (),
    )
    want.backward(grad_out)
    if wrapped:
        model.set_output_embeddings(torch.nn.Sequential(head))
    h_ours = hidden.clone().requires_grad_()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lp, "_CPU_TILE_ELEMENTS", 512 * head.out_features)
        got = lp._token_logps(model, h_ours, targets)
    got.backward(grad_out)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h_ours.grad, h_trl.grad, rtol=1e-5, atol=1e-6 * float(h_trl.grad.abs().max()))
